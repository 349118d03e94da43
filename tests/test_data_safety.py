"""A labelling job never damages, skips or duplicates work, and bad input gets a clear answer.

Each case here is something a careless (or hostile) user did: pointing ``--out`` at a file
that is not a label file, resuming with another task, two jobs on one file, file names that
are not UTF-8, a full disk, odd settings, damaged checkpoints, slow or lying web servers.
"""

import errno
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from florence_helpers import (
    ImageLoadError,
    ModelNotAvailableError,
    TaskInputError,
    load_image,
    run,
)
from florence_helpers.boundary import outputs
from florence_helpers.boundary.inputs import InputLimits
from florence_helpers.drawing.conversions import from_coco
from florence_helpers.labelling import LabelFileError, read_labels
from florence_helpers.labelling.jobs import find_images, label
from florence_helpers.language.regions import RegionError
from florence_helpers.model.adapters import AdapterError, add_lora, load_adapter, save_adapter
from florence_helpers.training.coco import read_coco
from florence_helpers.training.grounding import read_grounding_jsonl
from florence_helpers.training.qa import read_qa
from florence_helpers.training.samples import AnnotationError

REPO = Path(__file__).resolve().parents[1]
FAST = {"max_new_tokens": 4, "num_beams": 1, "progress": False}


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("astronaut.jpg", "cat.jpg", "coffee.jpg"):
        shutil.copy(REPO / "images" / name, folder / name)
    return folder


def records(path: Path) -> list[dict]:
    return read_labels(path)


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "florence_helpers", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# --- The label file knows what it holds ------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b'{"images": [], "annotations": [], "categories": []}',  # COCO JSON, no newline
        (REPO / "images" / "poster.png").read_bytes()[:4000],  # a PNG
        b"image,caption\na.jpg,a cat\n",  # a CSV
    ],
    ids=["coco-json", "png", "csv"],
)
def test_a_file_that_is_not_a_label_file_is_never_written(florence, photos, tmp_path, content):
    out = tmp_path / "precious.file"
    out.write_bytes(content)
    with pytest.raises(LabelFileError, match="not a label file"):
        label(florence, photos, "CAPTION", out, **FAST)
    assert out.read_bytes() == content


def test_the_cli_refuses_a_wrong_out_before_the_model_loads(photos, tmp_path):
    out = tmp_path / "annotations.json"
    out.write_text('{"images": []}')
    # No model at that path: a refusal that came after loading would say so and exit 3.
    done = cli("label", str(photos), "--task", "OD", "--out", str(out), "--model", "/nowhere")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "not a label file" in done.stderr and "Traceback" not in done.stderr
    assert out.read_text() == '{"images": []}'
    for bad in (tmp_path, tmp_path / "annotations.json" / "x.jsonl"):  # a folder; under a file
        done = cli("label", str(photos), "--task", "OD", "--out", str(bad), "--model", "/nowhere")
        assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


def test_another_job_on_the_same_file_is_refused_unless_added(florence, photos, tmp_path):
    out = tmp_path / "labels.jsonl"
    label(florence, photos, "CAPTION", out, **FAST)
    before = out.read_bytes()
    with pytest.raises(LabelFileError, match=r"another job .*task: '<CAPTION>' there, '<OD>' now"):
        label(florence, photos, "OD", out, **FAST)
    with pytest.raises(LabelFileError, match=r"max_new_tokens: 4 there, 5 now"):
        label(florence, photos, "CAPTION", out, **{**FAST, "max_new_tokens": 5})
    assert out.read_bytes() == before
    summary = label(florence, photos, "OD", out, add=True, **FAST)
    assert summary.written == 3 and summary.skipped == 0
    tasks = [r["task"] for r in records(out)]
    assert sorted(tasks) == ["<CAPTION>"] * 3 + ["<OD>"] * 3
    # The same job again, with the other one in the file: nothing to do, nothing written.
    again = label(florence, photos, "OD", out, add=True, **FAST)
    assert (again.written, again.skipped) == (0, 3) and len(records(out)) == 6


def test_the_same_images_written_another_way_are_not_labelled_twice(
    florence, photos, tmp_path, monkeypatch
):
    out = tmp_path / "labels.jsonl"
    monkeypatch.chdir(tmp_path)
    label(florence, "imgs", "CAPTION", out, **FAST)
    (tmp_path / "link").symlink_to(photos)
    for spelling in (str(photos), "./imgs/", str(tmp_path / "link")):
        summary = label(florence, spelling, "CAPTION", out, **FAST)
        assert (summary.written, summary.skipped) == (0, 3), spelling
    assert len(records(out)) == 3
    assert {r["path"] for r in records(out)} == {str(p.resolve()) for p in photos.iterdir()}


def test_error_records_are_retried_in_place(florence, photos, tmp_path):
    broken = photos / "late.jpg"
    broken.write_bytes(b"half a download")
    out = tmp_path / "labels.jsonl"
    first = label(florence, photos, "CAPTION", out, **FAST)
    assert (first.written, first.errors) == (4, 1)
    shutil.copy(REPO / "images" / "rocket.jpg", broken)  # the download finished
    again = label(florence, photos, "CAPTION", out, **FAST)
    assert (again.written, again.skipped) == (0, 4)  # errors count as done, unless retried
    retried = label(florence, photos, "CAPTION", out, retry_errors=True, **FAST)
    assert (retried.written, retried.errors, retried.retried, retried.skipped) == (1, 0, 1, 3)
    lines = records(out)
    assert len(lines) == 4 and all(r["error"] is None for r in lines)
    assert sum(r["image"].endswith("late.jpg") for r in lines) == 1


def test_file_names_that_are_not_utf8_are_labelled_and_resumed(florence, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsencode(folder) + b"/caf\xe9 \xff.jpg"  # Latin-1 and a stray byte
    try:
        with open(name, "wb") as handle:
            handle.write((REPO / "images" / "cat.jpg").read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    shutil.copy(REPO / "images" / "coffee.jpg", folder / "plain.jpg")
    out = tmp_path / "labels.jsonl"
    summary = label(florence, folder, "CAPTION", out, batch_size=2, **FAST)
    assert (summary.written, summary.errors) == (2, 0)
    written = records(out)
    assert {os.fsencode(r["image"]) for r in written} == {name, os.fsencode(folder / "plain.jpg")}
    again = label(florence, folder, "CAPTION", out, batch_size=2, **FAST)
    assert (again.written, again.skipped) == (0, 2)


def test_a_second_writer_is_refused_at_once(florence, photos, tmp_path):
    out = tmp_path / "labels.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path\n"
            "from florence_helpers.labelling import files as label_files"
            "\nwith label_files.locked(Path(sys.argv[1])):\n print('held', flush=True)\n"
            " time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(LabelFileError, match="being written by another labelling process"):
            label(florence, photos, "CAPTION", out, **FAST)
        assert time.monotonic() - start < 10
        assert not out.exists() or not records(out)
    finally:
        holder.kill()
        holder.wait()
    summary = label(florence, photos, "CAPTION", out, **FAST)  # the lock went with its holder
    assert summary.written == 3
    assert not (tmp_path / ".labels.jsonl.florence-lock").exists()


def test_a_full_disk_stops_the_job_with_every_finished_record_intact(
    florence, photos, tmp_path, monkeypatch
):
    out = tmp_path / "labels.jsonl"
    real_fsync, calls = os.fsync, []

    def full_after_two_writes(fd):
        calls.append(fd)
        if len(calls) == 3:  # the job line with one batch, another batch, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(outputs.os, "fsync", full_after_two_writes)
    with pytest.raises(OSError, match=r"No space left on device\. The 2 records written before"):
        label(florence, photos, "CAPTION", out, batch_size=1, **FAST)
    assert out.read_bytes().endswith(b"\n")  # no torn line
    assert len(records(out)) == 2
    monkeypatch.setattr(outputs.os, "fsync", real_fsync)
    summary = label(florence, photos, "CAPTION", out, batch_size=1, **FAST)
    assert (summary.written, summary.skipped) == (1, 2)
    assert len(records(out)) == 3


def test_the_cli_reports_a_full_disk_in_one_line_and_exit_code_4(photos, tmp_path, tiny_model_dir):
    script = (
        "import errno, os, sys\n"
        "from florence_helpers import cli\n"
        "from florence_helpers.boundary import outputs\n"
        "def full(fd): raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "outputs.os.fsync = full\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    out = tmp_path / "labels.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", script, "label", str(photos), "--task", "CAPTION"]
        + ["--out", str(out), "--max-new-tokens", "4", "--num-beams", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FLORENCE_MODEL": str(tiny_model_dir)},
    )
    assert done.returncode == 4, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: Could not write to")
    assert "Traceback" not in done.stderr
    assert out.read_bytes() == b""  # not even the job line was left half-written


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_a_batch_size_that_is_not_a_positive_whole_number_stops_the_job(
    florence, photos, tmp_path, batch_size
):
    out = tmp_path / "labels.jsonl"
    with pytest.raises(TaskInputError, match=r"batch_size must be a whole number of at least 1"):
        label(florence, photos, "CAPTION", out, batch_size=batch_size, **FAST)
    assert not out.exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_beams": 0}, r"num_beams must be a whole number of at least 1, got 0"),
        ({"num_beams": -2}, r"num_beams must be .* got -2"),
        ({"num_beams": 1.5}, r"num_beams must be .* got 1.5"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be .* got 0"),
        ({"max_new_tokens": 5000}, r"decoder .* has 1024 positions"),
        ({"batch_size": 0}, r"batch_size must be"),
    ],
)
def test_generation_settings_are_checked_before_the_model_runs(florence, settings, message):
    with pytest.raises(TaskInputError, match=message):
        run(florence, REPO / "images" / "cat.jpg", "CAPTION", **settings)


def test_a_prompt_longer_than_the_text_encoder_reads_is_refused_with_the_limit(florence):
    with pytest.raises(TaskInputError, match=r"text encoder reads at most 1024"):
        run(florence, REPO / "images" / "cat.jpg", "OPEN_VOCABULARY_DETECTION", "cat " * 25000)
    done = cli(  # the default model is the tiny one here (conftest sets FLORENCE_MODEL)
        str(REPO / "images" / "cat.jpg"),
        "--task",
        "OPEN_VOCABULARY_DETECTION",
        "--text",
        "cat " * 25000,
    )
    assert done.returncode == 2 and "text encoder reads at most" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_region_of_three_numbers_is_named_as_such(florence):
    with pytest.raises(RegionError, match=r"four numbers .* got 3"):
        run(florence, REPO / "images" / "cat.jpg", "REGION_TO_CATEGORY", region=(1, 2, 3))


# --- Images from paths and URLs ------------------------------------------------------------


def test_file_urls_symlink_loops_and_formats_pillow_cannot_read(tmp_path, florence):
    assert load_image((REPO / "images" / "cat.jpg").as_uri()).size == (451, 300)
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(tmp_path / "loop.jpg")
    with pytest.raises(ImageLoadError, match="symbolic links form a loop"):
        load_image(loop)
    dangling = tmp_path / "gone.jpg"
    dangling.symlink_to(tmp_path / "deleted.jpg")
    with pytest.raises(ImageLoadError, match=r"symbolic link to .*deleted\.jpg, which does not"):
        load_image(dangling)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    shutil.copy(REPO / "images" / "cat.jpg", folder / "cat.jpg")
    assert [Path(p).name for p in find_images(folder)] == ["cat.jpg", "logo.svg"]
    out = tmp_path / "labels.jsonl"
    summary = label(florence, folder, "CAPTION", out, **FAST)
    assert (summary.written, summary.errors) == (2, 1)
    svg = next(r for r in records(out) if r["image"].endswith("logo.svg"))
    assert "SVG drawing" in svg["error"] and "convert it to PNG" in svg["error"]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that gave up on purpose is no news


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 that misbehaves on purpose, by path."""
    image = (REPO / "images" / "cat.jpg").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/huge":  # says 2 GB; never sends it
                self.send_response(200)
                self.send_header("Content-Length", str(2 * 10**9))
                self.end_headers()
                self.wfile.write(b"x" * 100)
            elif self.path == "/slow":  # one byte every 0.2 s
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                for byte in image[:100]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            elif self.path == "/cut":  # promises more than it sends, then hangs up
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image[:1000])
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

    httpd = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_urls_have_a_size_cap_and_a_deadline(server, florence):
    local = InputLimits(allowed_hosts=("127.0.0.1",))  # loopback is refused by default
    assert load_image(f"{server}/cat.jpg", limits=local).size == (451, 300)
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"2,000\.0 MB, above the 50 MB limit"):
        load_image(f"{server}/huge", limits=local)
    assert time.monotonic() - start < 5
    with pytest.raises(ImageLoadError, match=r"above the 0\.01 MB limit"):
        load_image(f"{server}/cat.jpg", max_mb=0.01, limits=local)
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"took more than 1 s"):
        load_image(f"{server}/slow", timeout=1, limits=local)
    assert time.monotonic() - start < 5
    with pytest.raises(ImageLoadError, match=r"closed after 1,000 of"):
        load_image(f"{server}/cut", limits=local)
    with pytest.raises(ImageLoadError, match=r"non-public address"):  # run() keeps the default
        run(florence, f"{server}/cat.jpg", "CAPTION", max_new_tokens=4, num_beams=1)


# --- Checkpoints and adapters ---------------------------------------------------------------


def _damaged(tiny_model_dir, tmp_path, change) -> Path:
    folder = tmp_path / change.__name__
    shutil.copytree(tiny_model_dir, folder)
    change(folder)
    return folder


def _half_the_weights(folder):
    state = load_file(folder / "model.safetensors")
    save_file({k: state[k] for k in sorted(state)[::2]}, folder / "model.safetensors")


def _an_extra_weight(folder):
    state = load_file(folder / "model.safetensors")
    save_file({**state, "model.extra.weight": torch.zeros(2)}, folder / "model.safetensors")


def _a_wrong_shape(folder):
    state = load_file(folder / "model.safetensors")
    state["model.language_model.encoder.layers.0.fc1.weight"] = torch.zeros(3, 3)
    save_file(state, folder / "model.safetensors")


def _cut_short(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _an_index_that_is_not_json(folder):
    (folder / "model.safetensors.index.json").write_text("<html>rate limited</html>")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/florence-pickle-ran",))


def _a_pickle_with_code(folder):
    (folder / "model.safetensors").unlink()
    torch.save({"weights": _Payload()}, folder / "pytorch_model.bin")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_half_the_weights, r"do not fit .*; \d+ missing \(would be random\): model\."),
        (_an_extra_weight, r"1 unexpected \(would be dropped\): model\.extra\.weight"),
        (_a_wrong_shape, r"wrong shape"),
        (_cut_short, r"safetensors file is damaged or cut short"),
        (_an_index_that_is_not_json, r"is not a weight index"),
        (_a_pickle_with_code, r"pickle file holding more than tensors.*weights_only=False"),
    ],
)
def test_a_damaged_checkpoint_is_refused_and_named(tiny_model_dir, tmp_path, change, message):
    marker = Path("/tmp/florence-pickle-ran")
    marker.unlink(missing_ok=True)
    folder = _damaged(tiny_model_dir, tmp_path, change)
    with pytest.raises(ModelNotAvailableError, match=message):
        load_model_quietly(folder)
    assert not marker.exists()  # the pickle's code never ran


def load_model_quietly(folder):
    from florence_helpers import load_model

    return load_model(folder, device="cpu", dtype="float32")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", r"is not valid JSON"),
        ("[1, 2]", r"holds a JSON list, not an adapter configuration"),
        ('{"peft_type": "LORA", "r": 0}', r"the rank r must be a whole number of at least 1"),
        ('{"peft_type": "SOMETHING", "r": 4}', r"describes a 'SOMETHING' adapter"),
        ('{"peft_type": "LORA", "r": 4}', r"no weights"),
    ],
)
def test_a_malformed_adapter_is_named(florence, tmp_path, config, message):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(config)
    with pytest.raises(AdapterError, match=message):
        load_adapter(florence, folder)


def test_adapter_weights_that_would_be_dropped_are_refused(load_tiny, tmp_path):
    saved = save_adapter(add_lora(load_tiny(), rank=2), tmp_path / "adapter")
    state = load_file(saved / "adapter_model.safetensors")
    key = next(iter(state))
    state[key.replace("model.language_model", "vision_tower.old_name")] = state[key].clone()
    save_file(state, saved / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"1 weights of the adapter .* match no module"):
        load_adapter(load_tiny(), saved)


# --- Readers ----------------------------------------------------------------------------------


@pytest.fixture
def coco(tmp_path) -> dict:
    shutil.copy(REPO / "images" / "cat.jpg", tmp_path / "cat.jpg")
    shutil.copy(REPO / "images" / "coffee.jpg", tmp_path / "coffee.jpg")
    return {
        "images": [
            {"id": 1, "file_name": "cat.jpg", "width": 451, "height": 300},
            {"id": 2, "file_name": "coffee.jpg"},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "cup"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100]},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 50, 50]},
        ],
    }


def _write(tmp_path, coco) -> Path:
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_entries_without_ids_are_reported_by_position(tmp_path, coco):
    coco["categories"][1].pop("id")
    coco["images"].append({"file_name": "lost.jpg"})
    with pytest.raises(AnnotationError) as raised:
        read_coco(_write(tmp_path, coco))
    text = str(raised.value)
    assert "category #1: needs an 'id' and a 'name'" in text
    assert "image #2 (lost.jpg): has no 'id'" in text
    with pytest.warns(UserWarning, match="Skipped 3"):
        data = read_coco(_write(tmp_path, coco), on_error="skip")
    assert [s.labels for s in data] == [("cat",)]  # coffee's cup lost its category


def test_a_huge_image_in_a_dataset_is_a_problem_not_a_crash(tmp_path, coco):
    from test_labelling import png_header

    (tmp_path / "panorama.png").write_bytes(png_header(60000, 60000))
    coco["images"].append({"id": 3, "file_name": "panorama.png"})
    with pytest.warns(UserWarning, match="Skipped 1"):
        data = read_coco(_write(tmp_path, coco), on_error="skip")
    assert len(data) == 2 and "MAX_IMAGE_PIXELS" in str(data.problems[0])
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"image": "panorama.png", "question": "q?", "answer": "a"}) + "\n")
    with pytest.warns(UserWarning, match="Skipped 1"):
        assert len(read_qa(qa, on_error="skip")) == 0


def test_json_that_is_not_utf8_is_named(tmp_path, coco):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(coco).replace("cat", "ch\u00e2t").encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json is not UTF-8 text"):
        read_coco(path)
    lines = tmp_path / "grounding.jsonl"
    lines.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_grounding_jsonl(lines)


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"bbox": [0, 0, -5, 10], "category_id": 1}, r"width and height of 0 or more"),
        ({"bbox": [0, 0, float("nan"), 10], "category_id": 1}, r"finite numbers"),
        ({"bbox": [0, 0, 5, 10], "category_id": 9}, r"category_id 9 is not among"),
        ({"category_id": 1}, r"bbox must be \[x, y, width, height\], got None"),
    ],
)
def test_from_coco_refuses_boxes_it_cannot_read(annotation, message):
    with pytest.raises(ValueError, match=message):
        from_coco([annotation], {1: "cat"}, (100, 100))


def test_qa_rows_that_are_not_rows_or_answers_that_are_not_text(tmp_path):
    shutil.copy(REPO / "images" / "cat.jpg", tmp_path / "cat.jpg")
    rows = [
        None,
        {"image": "cat.jpg", "question": "What?", "answer": {"text": "a cat"}},
        {"image": "cat.jpg", "question": "What?", "answer": "a cat"},
    ]
    with pytest.raises(AnnotationError) as raised:
        read_qa(rows, tmp_path)
    assert "row 1: not a row of named columns" in str(raised.value)
    assert "row 2: an answer must be text, got a dict" in str(raised.value)
    with pytest.warns(UserWarning):
        assert len(read_qa(rows, tmp_path, on_error="skip")) == 1


def test_grounding_labels_that_make_no_prompt_name_their_line(tmp_path):
    shutil.copy(REPO / "images" / "cat.jpg", tmp_path / "cat.jpg")
    lines = [
        {"query": "<ref-object>", "images": ["cat.jpg"], "objects": [["", [1, 1, 50, 50]]]},
        {"query": "<ref-object>", "images": ["cat.jpg"], "objects": [["<OD>", [1, 1, 50, 50]]]},
        {"query": "<ref-object>", "images": ["cat.jpg"], "objects": [["a cat", [1, 1, 50, 50]]]},
    ]
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(AnnotationError) as raised:
        read_grounding_jsonl(path)
    assert "refs.jsonl line 1: label ''" in str(raised.value)
    assert "refs.jsonl line 2: label '<OD>'" in str(raised.value)
    with pytest.warns(UserWarning):
        assert len(read_grounding_jsonl(path, on_error="skip")) == 1


def test_read_labels_names_a_damaged_line(florence, photos, tmp_path):
    out = tmp_path / "labels.jsonl"
    label(florence, photos, "CAPTION", out, **FAST)
    lines = out.read_text().splitlines()
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text("\n".join([lines[0], lines[1][:30], "42", *lines[2:]]) + "\n")
    with pytest.raises(LabelFileError, match=r"damaged\.jsonl line 2: not valid JSON"):
        read_labels(damaged)
    with pytest.warns(UserWarning, match=r"line 3: not a label record"):
        kept = read_labels(damaged, on_error="skip")
    assert len(kept) == 2
    # An interrupted last line is ignored, as before.
    cut = tmp_path / "cut.jsonl"
    cut.write_text(out.read_text() + lines[1][:25])
    assert len(read_labels(cut)) == 3


def test_a_huge_file_that_is_not_a_label_file_is_refused_from_its_first_line(
    florence, photos, tmp_path
):
    # A 100 GB sparse --out (no newline in it) was read whole before line 1 was judged: a
    # MemoryError (tenth hostile review). The first 16 MiB decide.
    out = tmp_path / "huge.bin"
    with open(out, "wb") as handle:
        handle.truncate(100 * 2**30)
    with pytest.raises(LabelFileError, match="line 1 is longer than any label record"):
        label(florence, photos, "CAPTION", out, **FAST)
    out.write_bytes(b"not json\n" + b"x" * 1000)
    with pytest.raises(LabelFileError, match="line 1 is not a label record"):
        label(florence, photos, "CAPTION", out, **FAST)


def test_a_label_line_followed_by_a_sparse_hole_is_refused_without_reading_it_whole(
    florence, photos, tmp_path
):
    # Eleventh hostile review: a valid first line, then 1.5 GB of sparse zeros, took 4.9 GB.
    out = tmp_path / "labels.jsonl"
    label(florence, photos, "CAPTION", out, **FAST)
    size = out.stat().st_size
    with open(out, "r+b") as handle:
        handle.truncate(size + 2**31)
    with pytest.raises(LabelFileError, match="a line is longer than any label record"):
        label(florence, photos, "CAPTION", out, **FAST)
    assert out.stat().st_size == size + 2**31
