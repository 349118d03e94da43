"""The one way out: outputs never overwrite inputs, whole files are all-or-nothing, appends
are whole lines, and a file keeps its mode, owner and links."""

import os
import stat
import subprocess
import sys

import pytest

from florence_helpers.boundary import outputs
from florence_helpers.boundary.outputs import (
    Appender,
    OutputError,
    check_folder_output,
    check_outputs,
    write_atomically,
)


def test_an_output_that_is_an_input_is_refused_however_it_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(b"photo")
    (tmp_path / "link.jpg").symlink_to(photo)
    os.link(photo, tmp_path / "hard.jpg")
    for spelling in ("cat.jpg", "./cat.jpg", str(photo), "link.jpg", "hard.jpg", "sub/../cat.jpg"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(OutputError, match="would overwrite the input"):
            check_outputs({"--out": spelling}, [photo])
    check_outputs({"--out": "other.jpg"}, [photo])  # a new file is fine


def test_two_outputs_of_one_command_may_not_be_one_file(tmp_path):
    labels = tmp_path / "x.jsonl"
    with pytest.raises(OutputError, match="--coco and --out are the same file"):
        check_outputs({"--out": labels, "--coco": tmp_path / "." / "x.jsonl"})
    with pytest.raises(OutputError, match="is a folder"):
        check_outputs({"--out": tmp_path})


def test_a_folder_output_may_not_be_or_hold_an_input(tmp_path):
    old = tmp_path / "models" / "old"
    old.mkdir(parents=True)
    for new in (old, tmp_path / "models", tmp_path):
        with pytest.raises(OutputError, match="would destroy the input"):
            check_folder_output(new, [old])
    check_folder_output(tmp_path / "models" / "new", [old])
    check_folder_output(old / "inside", [old])  # a new folder inside the input is allowed


def test_a_rewritten_file_keeps_its_mode_owner_and_symbolic_link(tmp_path):
    target = tmp_path / "real.jsonl"
    target.write_bytes(b"old\n")
    target.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(target, 1234, 5678)
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    write_atomically(link, b"new\n")
    assert link.is_symlink() and target.read_bytes() == b"new\n"
    info = target.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640
    if os.geteuid() == 0:
        assert (info.st_uid, info.st_gid) == (1234, 5678)


def test_a_new_file_gets_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomically(tmp_path / "new.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.json"
    target.write_bytes(b"precious")

    def half_then_fail(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


def test_an_interrupted_append_is_cut_back_to_the_last_whole_write(tmp_path, monkeypatch):
    path = tmp_path / "labels.jsonl"
    real_write = os.write

    def half_then_interrupt(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise KeyboardInterrupt

    with Appender.open(path) as out:
        out.write(b'{"a": 1}\n')
        monkeypatch.setattr(outputs.os, "write", half_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            out.write(b'{"b": 2}\n')
    assert path.read_bytes() == b'{"a": 1}\n'


FULL_DISK = """
import resource, signal, sys
from florence_helpers.boundary.outputs import Appender
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (30, 30))
try:
    with Appender.open(sys.argv[1]) as out:
        out.write(b"0123456789\\n")
        out.write(b"0123456789\\n")
        out.write(b"0123456789\\n")  # bytes 22-32: the limit is hit part-way
except OSError as error:
    print("refused:", error)
"""


def test_a_full_disk_part_way_through_an_append_leaves_no_torn_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, timeout=60
    )
    assert "refused: " in done.stdout and "File too large" in done.stdout
    assert path.read_bytes() == b"0123456789\n" * 2


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "sparse"])
def test_what_an_output_holds_is_judged_from_a_bounded_read(tmp_path, kind):
    # A folder or file to be replaced is first read to see what it holds: NEW/config.json ->
    # /dev/zero grew to 3 GB, a FIFO blocked for ever, and an existing --coco file of 100 GB
    # (sparse) was read whole (tenth hostile review). Each is now judged "not ours" at once.
    def make(path):
        if kind == "dev-zero":
            path.symlink_to("/dev/zero")
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            with open(path, "wb") as handle:
                handle.truncate(100 * 2**30)

    folder = tmp_path / "new"
    folder.mkdir()
    make(folder / "config.json")
    with pytest.raises(OutputError, match="not a Florence-2 checkpoint"):
        outputs.check_folder_replaceable(folder)
    if kind == "sparse":  # the COCO check meets only regular files
        make(tmp_path / "export.json")
        with pytest.raises(OutputError):
            outputs.check_replaceable(tmp_path / "export.json", holds="COCO JSON")


def test_sample_data_written_again_replaces_a_planted_link_not_its_target(tmp_path):
    # A link planted in a sample folder led the re-run to overwrite the user's photo
    # elsewhere (twelfth hostile review).
    from florence_helpers.training.sample_data import make_shapes_dataset

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_text("precious")
    folder = tmp_path / "shapes"
    make_shapes_dataset(folder, num_images=2, image_size=(64, 64), seed=1)
    planted = folder / "shapes_001.jpg"
    planted.unlink()
    planted.symlink_to("../mine/photo.jpg")
    make_shapes_dataset(folder, num_images=2, image_size=(64, 64), seed=1)
    assert (mine / "photo.jpg").read_text() == "precious"
    assert not planted.is_symlink() and planted.stat().st_size > 0
