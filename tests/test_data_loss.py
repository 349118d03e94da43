"""Nothing the user had is lost: the cases a hostile reviewer found, each as a test.

Outputs that resolve to inputs are refused before the model loads (the environment points the
model at a folder that does not exist, so a command that got that far would exit 3, not 2).
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from florence_helpers import ImageLoadError, TaskInputError, cli
from florence_helpers.boundary.outputs import OutputError, write_atomically
from florence_helpers.labelling import (
    LabelFileError,
    check_label_file,
    export_coco,
    job_settings,
    read_labels,
)
from florence_helpers.labelling.jobs import label

REPO = Path(__file__).resolve().parents[1]
FAST = {"max_new_tokens": 4, "num_beams": 1, "progress": False}


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("astronaut.jpg", "cat.jpg", "coffee.jpg"):
        shutil.copy(REPO / "images" / name, folder / name)
    return folder


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """A model that cannot load: a command that reaches loading exits 3."""
    monkeypatch.setenv("FLORENCE_MODEL", str(tmp_path / "no-such-model"))


def main(capsys, *args: str) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_out_that_is_the_input_photo_is_refused_before_the_model_loads(
    photos, no_model, capsys, monkeypatch
):
    monkeypatch.chdir(photos)
    before = (photos / "cat.jpg").read_bytes()
    os.link(photos / "cat.jpg", photos / "hard.jpg")
    (photos / "soft.jpg").symlink_to(photos / "cat.jpg")
    for out in ("cat.jpg", "./cat.jpg", photos / "cat.jpg", "hard.jpg", "soft.jpg"):
        code, err = main(capsys, "cat.jpg", "--task", "OD", "--out", out)
        assert code == 2 and "would overwrite the input" in err, err
    assert (photos / "cat.jpg").read_bytes() == before
    code, err = main(capsys, "cat.jpg", "--out", "cat.result")
    assert code == 2 and "extension of an image format" in err


def test_label_out_and_coco_may_not_be_one_file_or_an_image(photos, no_model, capsys, tmp_path):
    labels = tmp_path / "x.jsonl"
    labels.write_text("")
    code, err = main(capsys, "label", photos, "--task", "OD", "--out", labels, "--coco", labels)
    assert code == 2 and "are the same file" in err
    code, err = main(capsys, "label", photos, "--task", "OD", "--out", photos / "cat.jpg")
    assert code == 2 and "would overwrite the input" in err
    assert labels.read_text() == ""


def test_export_coco_never_writes_over_its_label_file(florence, photos, tmp_path):
    out = tmp_path / "labels.jsonl"
    label(florence, photos, "OD", out, **FAST)
    before = out.read_bytes()
    with pytest.raises(OutputError):
        export_coco(out, tmp_path / "." / "labels.jsonl")
    assert out.read_bytes() == before


def test_retry_errors_touches_exactly_the_records_it_retries(florence, tmp_path):
    folders = {name: tmp_path / "data" / name for name in ("a", "b")}
    for folder in folders.values():
        folder.mkdir(parents=True)
        shutil.copy(REPO / "images" / "cat.jpg", folder / "good.jpg")
        (folder / "late.jpg").write_bytes(b"half a download")
    real = tmp_path / "store" / "labels.jsonl"
    real.parent.mkdir()
    out = tmp_path / "labels.jsonl"
    out.symlink_to(real)
    first = label(florence, tmp_path / "data", "CAPTION", out, **FAST)
    assert (first.written, first.errors) == (4, 2)
    real.chmod(0o640)
    for folder in folders.values():  # both downloads finished
        shutil.copy(REPO / "images" / "coffee.jpg", folder / "late.jpg")
    again = label(florence, folders["a"], "CAPTION", out, retry_errors=True, **FAST)
    assert (again.retried, again.written, again.errors, again.skipped) == (1, 1, 0, 1)
    records = read_labels(out)
    assert len(records) == 4
    errors = [r["image"] for r in records if r["error"] is not None]
    assert errors == [str(folders["b"] / "late.jpg")]  # the other folder's record is kept
    assert out.is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o640


@pytest.mark.parametrize(
    "content",
    [
        b'{"image": "x.jpg", "caption": "a cat"}',  # one JSON line, not ours, no newline
        b'{"image": "x.jpg", "task": ["<OD>"]}',
        b'{"image": "x.jpg", "task": "<OD>", "path": ["a", "b"]}\n',
        b"null\n",
    ],
)
def test_a_file_that_is_not_a_label_file_is_never_repaired(florence, photos, tmp_path, content):
    out = tmp_path / "notes.jsonl"
    out.write_bytes(content)
    with pytest.raises(LabelFileError, match="not a label file"):
        label(florence, photos, "OD", out, **FAST)
    assert out.read_bytes() == content


def test_a_whole_last_record_without_its_newline_is_kept(florence, photos, tmp_path):
    out = tmp_path / "labels.jsonl"
    label(florence, [photos / "cat.jpg"], "CAPTION", out, **FAST)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))  # an editor dropped the final newline
    summary = label(florence, photos, "CAPTION", out, **FAST)
    assert (summary.written, summary.skipped) == (2, 1)
    assert len(read_labels(out)) == 3


def test_a_refused_run_writes_nothing_and_the_corrected_one_runs(florence, photos, tmp_path):
    out = tmp_path / "labels.jsonl"
    with pytest.raises(TaskInputError, match="decoder can write"):
        label(florence, photos, "CAPTION", out, **{**FAST, "max_new_tokens": 100_000})
    assert not out.exists()
    assert label(florence, photos, "CAPTION", out, **FAST).written == 3


def test_one_model_folder_spelled_two_ways_is_one_job(florence, photos, tmp_path, monkeypatch):
    import dataclasses

    model_dir = Path(florence.model_id)
    monkeypatch.chdir(model_dir.parent)
    out = tmp_path / "labels.jsonl"
    spelled = dataclasses.replace(florence, model_id=f"{model_dir.name}/")
    label(spelled, photos, "CAPTION", out, **FAST)
    again = dataclasses.replace(florence, model_id=f"./{model_dir.name}")
    summary = label(again, photos, "CAPTION", out, **FAST)
    assert (summary.written, summary.skipped) == (0, 3)
    job = job_settings(f"./{model_dir.name}", "CAPTION", dtype="float32", **FAST)
    check_label_file(out, job)  # the CLI's check before loading agrees


def test_a_typo_in_the_folder_is_an_error_not_a_record(florence, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageLoadError, match="No folder or image file at imgz"):
        label(florence, "imgz", "CAPTION", "labels.jsonl", **FAST)
    assert not (tmp_path / "labels.jsonl").exists()


def test_a_folder_that_cannot_be_read_stops_the_job_before_anything_is_written(
    florence, photos, tmp_path, monkeypatch
):
    hidden = photos / "private"
    hidden.mkdir()
    shutil.copy(REPO / "images" / "cat.jpg", hidden / "x.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(hidden):
            raise PermissionError(13, "Permission denied", str(hidden))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "labels.jsonl"
    with pytest.raises(ImageLoadError, match=r"private \(Permission denied\)"):
        label(florence, photos, "CAPTION", out, **FAST)
    assert not out.exists()


FULL_DISK = """
import json, resource, signal, sys
from florence_helpers import load_model
from florence_helpers.labelling.jobs import label
florence = load_model(sys.argv[1], device="cpu", dtype="float32")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), int(sys.argv[4])))
try:
    label(florence, sys.argv[2], "CAPTION", sys.argv[3], batch_size=1, progress=False,
          max_new_tokens=4, num_beams=1)
except OSError as error:
    print("stopped:", error)
"""


def test_a_full_disk_leaves_whole_lines_and_the_job_resumes(
    florence, photos, tmp_path, tiny_model_dir
):
    out = tmp_path / "labels.jsonl"
    label(florence, [photos / "astronaut.jpg"], "CAPTION", out, batch_size=1, **FAST)
    one_record = len(out.read_bytes())
    out.unlink()
    limit = one_record + 200  # the job line and the first record fit; the second does not
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tiny_model_dir), str(photos), str(out), str(limit)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "stopped: " in done.stdout and "intact" in done.stdout, done.stdout + done.stderr
    data = out.read_bytes()
    assert data.endswith(b"\n") and len(data) <= limit
    assert all(json.loads(line) for line in data.splitlines())
    summary = label(florence, photos, "CAPTION", out, batch_size=1, **FAST)
    assert summary.written + summary.skipped == 3 and len(read_labels(out)) == 3


@pytest.mark.parametrize(("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_exits_130_saying_what_was_written(photos, tmp_path, tiny_model_dir, sent, code):
    many = tmp_path / "many"
    many.mkdir()
    for index in range(400):  # enough that the signal always comes before the end
        shutil.copy(photos / "cat.jpg", many / f"{index:03}.jpg")
    out = tmp_path / "labels.jsonl"
    command = [sys.executable, "-m", "florence_helpers", "label", str(many), "--task", "CAPTION"]
    command += ["--out", str(out), "--batch-size", "1", "--max-new-tokens", "8"]
    env = {**os.environ, "FLORENCE_MODEL": str(tiny_model_dir)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 3):
        time.sleep(0.05)
    process.send_signal(sent)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted: ") and "run the same command again" in last
    assert "Traceback" not in err
    written = int(last.split("interrupted: ")[1].split()[0])
    assert len(read_labels(out)) == written and out.read_bytes().endswith(b"\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "labels.jsonl", "many"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--device", "banana"], 2, "banana"),
        (["--num-beams", "0"], 2, "num_beams"),
        (["--task", ""], 2, "Unknown Florence-2 task ''"),
    ],
)
def test_cli_settings_fail_in_one_line(args, code, message, capsys, no_model):
    got, err = main(capsys, REPO / "images" / "cat.jpg", "--task", "OD", *args)
    assert got == code and message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_a_label_line_whose_path_is_a_list_is_named(capsys, photos, tmp_path, no_model):
    out = tmp_path / "labels.jsonl"
    out.write_text('{"image": "a.jpg", "task": "<OD>", "path": ["x"]}\n')
    code, err = main(capsys, "label", photos, "--task", "OD", "--out", out)
    assert code == 2 and "line 1 is not a label record" in err


def test_read_labels_skips_every_kind_of_bad_line(tmp_path):
    good = {"image": "a.jpg", "path": "/a.jpg", "width": 4, "height": 3, "task": "<CAPTION>"}
    good |= {"result": {"text": "a cat"}, "error": None}
    lines = [
        json.dumps(good).encode(),
        b"null",
        json.dumps({**good, "result": "{not json"}).encode(),
        json.dumps({**good, "path": ["a"]}).encode(),
        json.dumps({**good, "width": "64"}).encode(),
        b'{"image": "caf\xe9.jpg", "task": "<CAPTION>"}',  # not UTF-8
        b"[" * 50_000 + b"]" * 50_000,
        json.dumps(good).encode(),
    ]
    path = tmp_path / "labels.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(LabelFileError, match="line 2: not a label record"):
        read_labels(path)
    with pytest.warns(UserWarning) as warned:
        kept = read_labels(path, on_error="skip", as_results=True)
    assert len(kept) == 2 and len(warned) == 6


def test_labels_made_with_an_adapter_are_another_job_and_get_written(load_tiny, photos, tmp_path):
    pytest.importorskip("peft")
    from florence_helpers.model.adapters import add_lora, merge_adapter

    base = load_tiny()
    out = tmp_path / "labels.jsonl"
    label(base, photos, "CAPTION", out, **FAST)
    tuned = add_lora(base)
    with pytest.raises(LabelFileError, match=r"adapter: None there, 'sha256:"):
        label(tuned, photos, "CAPTION", out, **FAST)
    summary = label(tuned, photos, "CAPTION", out, add=True, **FAST)
    assert (summary.written, summary.skipped) == (3, 0)
    merged = merge_adapter(tuned)
    again = label(merged, photos, "CAPTION", out, add=True, **FAST)
    assert (again.written, again.skipped) == (3, 0)  # merged weights: another job again
    assert len(read_labels(out)) == 9


# --- cases from a hostile review ----------------------------------------------------------


def test_a_label_file_and_a_link_to_it_share_one_lock(florence, photos, tmp_path):
    from florence_helpers.labelling.files import locked

    real = tmp_path / "out.jsonl"
    real.write_text("")
    (tmp_path / "link.jsonl").symlink_to(real)
    os.link(real, tmp_path / "hard.jsonl")
    with locked(real):
        for name in ("link.jsonl", "hard.jsonl"):
            with pytest.raises(LabelFileError, match="being written by another labelling"):
                label(florence, photos, "CAPTION", tmp_path / name, **FAST)
    assert real.read_text() == ""


def test_retrying_errors_through_a_hard_link_is_refused(florence, photos, tmp_path):
    (photos / "late.jpg").write_bytes(b"half a download")
    out = tmp_path / "out.jsonl"
    label(florence, photos, "CAPTION", out, **FAST)
    os.link(out, tmp_path / "other-name.jsonl")
    before = out.read_bytes()
    with pytest.raises(LabelFileError, match="hard links"):
        label(florence, photos, "CAPTION", out, retry_errors=True, **FAST)
    assert out.read_bytes() == before == (tmp_path / "other-name.jsonl").read_bytes()


def test_a_file_named_like_the_lock_is_never_touched(florence, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("poetry.lock").write_text("pinned")
    label(florence, photos, "CAPTION", "poetry", **FAST)
    assert Path("poetry.lock").read_text() == "pinned"
    assert not list(tmp_path.glob(".*florence-lock"))  # the lock it made went with it


def test_a_path_with_a_scheme_like_prefix_is_a_local_file_and_never_overwritten(
    photos, no_model, capsys, monkeypatch
):
    monkeypatch.chdir(photos)
    (photos / "pics:").mkdir()
    shutil.copy(photos / "cat.jpg", photos / "pics:" / "cat.jpg")
    before = (photos / "pics:" / "cat.jpg").read_bytes()
    code, err = main(capsys, "pics://cat.jpg", "--task", "OD", "--out", "pics:/cat.jpg")
    assert code == 2 and "would overwrite the input" in err, err
    assert (photos / "pics:" / "cat.jpg").read_bytes() == before


def test_outputs_that_cannot_be_written_are_refused_before_the_model_loads(
    photos, no_model, capsys, tmp_path
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = main(
        capsys,
        "label",
        photos,
        "--task",
        "OD",
        "--out",
        tmp_path / "x.jsonl",
        "--coco",
        blocker / "coco.json",
    )
    assert code == 2 and "is a file, not a folder" in err, err


# --- Second hostile pass: outputs that name what the command reads, or what it must not replace


@pytest.mark.parametrize("extension", [".psd", ".xbm", ".h5", ".result"])
def test_an_out_pillow_cannot_write_in_colour_is_refused_before_the_model_loads(
    photos, no_model, capsys, tmp_path, extension
):
    code, err = main(capsys, photos / "cat.jpg", "--out", tmp_path / f"out{extension}")
    assert code == 2 and "extension of an image format that can be written" in err, err


def test_no_output_goes_inside_the_model_folder(photos, capsys, tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = (model / "config.json").read_bytes()
    labelling = ["label", photos, "--task", "OD", "--out"]
    for args in (
        [*labelling, tmp_path / "l.jsonl", "--coco", model / "config.json"],
        [*labelling, model / "labels.jsonl"],
        [photos / "cat.jpg", "--out", model / "x.png"],
    ):
        code, err = main(capsys, *args, "--model", model)
        assert code == 2 and f"is inside {model}" in err, err
    assert (model / "config.json").read_bytes() == config
    assert sorted(p.name for p in model.iterdir()) == sorted(
        p.name for p in tiny_model_dir.iterdir()
    )


def test_a_coco_export_replaces_only_a_coco_file(florence, photos, tmp_path, no_model, capsys):
    labels = tmp_path / "labels.jsonl"
    label(florence, photos, "OD", labels, **FAST)
    yesterday = tmp_path / "yesterday.jsonl"
    shutil.copy(labels, yesterday)
    before = yesterday.read_bytes()
    with pytest.raises(OutputError, match="is not a COCO JSON file"):
        export_coco(labels, yesterday)
    code, err = main(capsys, "label", photos, "--task", "OD", "--out", labels, "--coco", yesterday)
    assert code == 2 and "is not a COCO JSON file" in err, err
    assert yesterday.read_bytes() == before
    coco = tmp_path / "labels.coco.json"
    export_coco(labels, coco)
    export_coco(labels, coco)  # a COCO file is replaced: running the export again works
    assert json.loads(coco.read_text())["images"]


def test_an_out_that_is_not_an_image_is_not_replaced(photos, no_model, capsys, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("my notes, named .png by mistake")
    code, err = main(capsys, photos / "cat.jpg", "--out", notes)
    assert code == 2 and "is not an image" in err, err
    assert notes.read_text() == "my notes, named .png by mistake"


def test_a_file_with_another_hard_link_is_never_replaced_whole(florence, photos, tmp_path):
    labels = tmp_path / "labels.jsonl"
    label(florence, photos, "OD", labels, **FAST)
    coco = tmp_path / "labels.coco.json"
    export_coco(labels, coco)
    os.link(coco, tmp_path / "backup.coco.json")
    before = coco.read_bytes()
    with pytest.raises(OutputError, match="other hard link"):
        export_coco(labels, coco)
    with pytest.raises(OutputError, match="other hard link"):
        write_atomically(tmp_path / "backup.coco.json", b"{}")
    assert coco.read_bytes() == before == (tmp_path / "backup.coco.json").read_bytes()


def test_an_image_of_an_unknown_users_home_is_not_found_in_one_line(
    capsys, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("FLORENCE_MODEL", str(tiny_model_dir))
    code, err = main(capsys, "~no_such_user_f2/cat.png", "--device", "cpu")
    assert code == 2 and "not found" in err.lower(), err
    assert err.startswith("error: ") and "Traceback" not in err


def test_saving_a_model_or_adapter_never_replaces_what_it_did_not_write(
    load_tiny, tiny_model_dir, tmp_path, monkeypatch
):
    from florence_helpers.boundary.outputs import OutputError
    from florence_helpers.model.adapters import (
        add_lora,
        load_adapter,
        merge_adapter,
        save_adapter,
        save_model,
    )

    lora = add_lora(load_tiny(), rank=2, seed=0)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tiny_model_dir.iterdir())
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "tokenizer.json").write_text("my own tokenizer")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    merged = merge_adapter(add_lora(load_tiny(), rank=2, seed=0))
    for save, model in ((save_adapter, lora), (save_model, merged)):
        for folder, message in (
            (tiny_model_dir, "holds the input"),  # the model's own folder
            (thesis, "holds files that are not"),
            (".", "the current folder"),
        ):
            with pytest.raises(OutputError, match=message):
                save(model, folder)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_model_dir.iterdir()) == before
    assert (thesis / "tokenizer.json").read_text() == "my own tokenizer"
    folded = add_lora(load_tiny(), rank=2, seed=0)
    merge_adapter(folded)  # in place: its LoRA layers are gone
    with pytest.raises(TypeError, match="merge_adapter folds them"):
        save_adapter(folded, tmp_path / "adapter")  # it wrote an adapter of no LoRA matrices
    first = save_adapter(lora, tmp_path / "adapter")
    (first / "notes.txt").write_text("kept with the adapter")
    again = save_adapter(lora, tmp_path / "adapter")  # an earlier save is replaced whole
    assert again == first and not (again / "notes.txt").exists()
    assert (again / "adapter_config.json").is_file()
    # The folder an adapter was loaded from is an input too: a merged model saved over it
    # deleted the adapter (twelfth hostile review).
    own = save_adapter(add_lora(load_tiny(), rank=2, seed=1), tmp_path / "own")
    loaded = load_adapter(load_tiny(), own)
    merged = merge_adapter(load_adapter(load_tiny(), own))
    for save, model in ((save_adapter, loaded), (save_model, merged)):
        with pytest.raises(OutputError, match="holds the input"):
            save(model, own)
    assert (own / "adapter_config.json").is_file()


def test_a_path_starting_with_a_tilde_is_the_home_folder_everywhere(
    load_tiny, photos, tmp_path, monkeypatch
):
    """One spelling, one file: "~/x" given to any reader or writer is $HOME/x (a round found
    resume looking in ./~ while saving went to $HOME, and --retry-errors rewriting $HOME's
    file from ./~'s)."""
    from florence_helpers.training import TrainingConfig, make_shapes_dataset, read_coco, train

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (photos / "broken.jpg").write_bytes(b"not a picture")  # an error record to retry
    florence = load_tiny()
    settings = dict(progress=False, max_new_tokens=5, num_beams=1)
    first = label(florence, str(photos), "CAPTION", "~/labels.jsonl", **settings)
    again = label(florence, str(photos), "CAPTION", "~/labels.jsonl", retry_errors=True, **settings)
    assert first.written == 4 and first.errors == 1 and again.retried == 1
    assert len(read_labels("~/labels.jsonl")) == 4 == len(read_labels(home / "labels.jsonl"))
    export_coco("~/labels.jsonl", "~/labels.coco.json")
    assert (home / "labels.coco.json").is_file()

    shapes = make_shapes_dataset("~/shapes", num_images=2, image_size=(64, 48))
    assert shapes == home / "shapes" / "annotations.json"
    samples = read_coco(json.loads(shapes.read_text()), images_dir="~/shapes")
    config = dict(batch_size=2, checkpoint_dir="~/runs", mixed_precision=False)
    first_run = train(florence, samples, TrainingConfig(epochs=1, **config), progress=False)
    resumed = train(florence, samples, TrainingConfig(epochs=2, **config), progress=False)
    assert (home / "runs" / "checkpoint.pt").is_file()
    assert resumed.losses[: len(first_run.losses)] == first_run.losses  # resumed, not redone
    assert not (work / "~").exists()


@pytest.mark.parametrize("blocker", ["file", "folder"])
def test_a_checkpoint_dir_that_cannot_take_the_checkpoint_is_refused_before_training(
    load_tiny, tmp_path, blocker
):
    from florence_helpers.training import TrainingConfig, make_shapes_dataset, read_coco, train

    samples = read_coco(make_shapes_dataset(tmp_path / "shapes", num_images=2, image_size=(64, 48)))
    runs = tmp_path / "runs"
    if blocker == "file":
        runs.write_text("my notes")  # checkpoint_dir names a file
    else:
        (runs / "checkpoint.pt").mkdir(parents=True)  # a folder where the checkpoint goes
    config = TrainingConfig(epochs=1, batch_size=2, checkpoint_dir=runs, mixed_precision=False)
    with pytest.raises(OutputError, match="checkpoint_dir"):
        train(load_tiny(), samples, config, progress=False)
    assert (
        runs.read_text() == "my notes" if blocker == "file" else (runs / "checkpoint.pt").is_dir()
    )


def test_a_second_training_run_on_one_checkpoint_dir_is_refused_while_the_first_runs(
    load_tiny, tmp_path
):
    from florence_helpers.boundary.outputs import one_writer
    from florence_helpers.training import TrainingConfig, make_shapes_dataset, read_coco, train

    samples = read_coco(make_shapes_dataset(tmp_path / "shapes", num_images=2, image_size=(64, 48)))
    runs = tmp_path / "runs"
    config = TrainingConfig(epochs=1, batch_size=2, checkpoint_dir=runs, mixed_precision=False)
    train(load_tiny(), samples, config, progress=False)
    before = (runs / "checkpoint.pt").read_bytes()
    with one_writer(runs / "checkpoint.pt"):  # the first run, still training
        with pytest.raises(OutputError, match="in use by another training process"):
            train(load_tiny(), samples, config, resume=False, progress=False)
    assert (runs / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in runs.iterdir()) == ["checkpoint.pt"]  # no lock left behind


def test_bytes_paths_label_as_their_decoded_names(florence, photos, tmp_path):
    out = tmp_path / "labels.jsonl"
    summary = label(
        florence,
        os.fsencode(photos),
        "CAPTION",
        os.fsencode(out),
        progress=False,
        max_new_tokens=5,
        num_beams=1,
    )
    assert summary.written == 3 and len(read_labels(os.fsencode(out))) == 3


def test_an_out_that_is_a_link_into_a_folder_not_made_yet_is_written_through(
    florence, photos, tmp_path
):
    link = tmp_path / "labels.jsonl"
    link.symlink_to(tmp_path / "later" / "real.jsonl")
    label(florence, photos, "CAPTION", link, progress=False, max_new_tokens=5, num_beams=1)
    assert link.is_symlink() and len(read_labels(tmp_path / "later" / "real.jsonl")) == 3
