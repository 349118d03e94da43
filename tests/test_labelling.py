"""Labelling a folder: JSON lines, resume after a kill, error records, COCO, Ray Data."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from florence_helpers import BoxesResult, TaskInputError
from florence_helpers.labelling import export_coco, read_labels
from florence_helpers.labelling.jobs import find_images, label
from florence_helpers.testing import force_answers

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg"]


@pytest.fixture
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    (images / "more").mkdir(parents=True)
    for name in PHOTOS[:2]:
        shutil.copy(REPO / "images" / name, images / name)
    for name in PHOTOS[2:]:
        shutil.copy(REPO / "images" / name, images / "more" / name)
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    (images / "notes.txt").write_text("not an image")
    return images


def lines(path: Path) -> list[dict]:
    """The records of a label file (every line must parse; the job line is left out)."""
    entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [entry for entry in entries if "florence_labels" not in entry]


def test_folder_is_labelled_with_errors_recorded(florence, folder, tmp_path):
    out = tmp_path / "labels.jsonl"
    summary = label(florence, folder, "OD", out, max_new_tokens=20, num_beams=1, progress=False)
    records = lines(out)
    assert summary.written == 5 and summary.errors == 1 and summary.skipped == 0
    assert sorted(Path(r["image"]).name for r in records) == sorted([*PHOTOS, "broken.jpg"])
    broken = next(r for r in records if r["image"].endswith("broken.jpg"))
    assert broken["result"] is None and "Could not read" in broken["error"]
    good = [r for r in records if r["error"] is None]
    assert all(
        r["task"] == "<OD>" and len(r["result"]["boxes"]) == len(r["result"]["labels"])
        for r in good
    )
    astronaut = next(r for r in good if r["image"].endswith("astronaut.jpg"))
    assert (astronaut["width"], astronaut["height"]) == (512, 512)


def png_header(width: int, height: int) -> bytes:
    """The first bytes of an RGB PNG of the given size: enough for Pillow to read its size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_huge_image_becomes_one_error_record_and_the_job_goes_on(florence, folder, tmp_path):
    (folder / "panorama.png").write_bytes(png_header(60000, 60000))
    out = tmp_path / "labels.jsonl"
    summary = label(
        florence, folder, "OD", out, max_new_tokens=8, num_beams=1, batch_size=2, progress=False
    )
    records = lines(out)
    assert summary.written == len(records) == 6 and summary.errors == 2
    huge = next(r for r in records if r["image"].endswith("panorama.png"))
    assert huge["result"] is None
    assert "panorama.png" in huge["error"] and "3,600 megapixels" in huge["error"]
    assert "MAX_IMAGE_PIXELS" in huge["error"]
    assert sum(r["error"] is None for r in records) == len(PHOTOS)


def test_an_image_the_model_fails_on_becomes_an_error_record(
    florence, folder, tmp_path, monkeypatch
):
    import florence_helpers.model.inference as inference

    parse = inference._parse

    def fails_on_the_cat(florence, sequences, logprobs, specs, sizes, *rest):
        if (451, 300) in sizes:  # cat.jpg
            raise RuntimeError("the parser broke")
        return parse(florence, sequences, logprobs, specs, sizes, *rest)

    monkeypatch.setattr(inference, "_parse", fails_on_the_cat)
    out = tmp_path / "labels.jsonl"
    summary = label(
        florence, folder, "CAPTION", out, max_new_tokens=4, batch_size=4, progress=False
    )
    records = lines(out)
    assert summary.written == 5 and summary.errors == 2  # broken.jpg and cat.jpg
    cat = next(r for r in records if r["image"].endswith("cat.jpg"))
    assert cat["error"] == "RuntimeError: the parser broke" and cat["width"] == 451
    assert sum(r["error"] is None for r in records) == 3


def test_a_mistake_in_the_settings_stops_the_job(florence, folder, tmp_path):
    with pytest.raises(TaskInputError, match="needs text"):
        label(florence, folder, "OPEN_VOCABULARY_DETECTION", tmp_path / "x.jsonl", progress=False)
    assert lines(tmp_path / "x.jsonl") == []


def test_classes_label_every_image_with_the_given_names(florence, folder, tmp_path):
    answers = [
        "car<loc_10><loc_10><loc_500><loc_500>",
        "person<loc_600><loc_100><loc_900><loc_990>",
    ]
    out = tmp_path / "classes.jsonl"
    summary = label(
        florence,
        folder,
        "OPEN_VOCABULARY_DETECTION",
        out,
        classes=["car", "person"],
        num_beams=1,
        progress=False,
        logits_processor=force_answers(florence.processor, answers),
    )
    assert (summary.written, summary.errors) == (5, 1)
    results = [r for r in read_labels(out, as_results=True) if r["error"] is None]
    assert len(results) == 4
    for record in results:
        assert record["result"].labels == ["car", "person"]
        assert record["result"].boxes.shape == (2, 4)


def test_classes_need_open_vocabulary_detection(florence, folder, tmp_path):
    with pytest.raises(TaskInputError, match="OPEN_VOCABULARY_DETECTION"):
        label(florence, folder, "OD", tmp_path / "x.jsonl", classes=["car"], progress=False)
    with pytest.raises(TaskInputError, match="empty"):
        label(florence, folder, "OPEN_VOCABULARY_DETECTION", tmp_path / "x.jsonl", classes=[])


def test_running_again_skips_done_images_and_repairs_a_cut_line(florence, folder, tmp_path):
    out = tmp_path / "labels.jsonl"
    paths = find_images(folder)
    label(florence, paths[:2], "CAPTION", out, max_new_tokens=5, progress=False)
    with out.open("a") as handle:
        handle.write('{"image": "' + paths[2] + '", "width": 6')  # killed mid-write
    summary = label(florence, paths, "CAPTION", out, max_new_tokens=5, progress=False)
    assert summary.skipped == 2 and summary.written == len(paths) - 2
    records = lines(out)  # every line parses
    assert sorted(r["image"] for r in records) == sorted(paths)


def test_a_killed_run_resumes_without_losing_or_repeating_images(tiny_model_dir, tmp_path):
    images = tmp_path / "many"
    images.mkdir()
    for i in range(16):
        shutil.copy(REPO / "images" / PHOTOS[i % 4], images / f"{i:02d}.jpg")
    out = tmp_path / "labels.jsonl"
    command = [
        sys.executable,
        "-m",
        "florence_helpers",
        "label",
        str(images),
        "--task",
        "OD",
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--max-new-tokens",
        "300",
    ]
    env = {**os.environ, "FLORENCE_MODEL": str(tiny_model_dir)}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = out.read_text().count("\n")
    assert 3 <= partial < 16, "the run should have been killed part-way"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = lines(out)
    names = [Path(r["image"]).name for r in records]
    assert sorted(names) == [f"{i:02d}.jpg" for i in range(16)]  # each exactly once
    assert f"{partial} images were already there" in done.stderr or partial < len(records)


def test_read_labels_and_coco_export(florence, folder, tmp_path):
    out = tmp_path / "labels.jsonl"
    answers = [  # one per readable image, in file order: astronaut, cat, coffee, rocket
        "person<loc_40><loc_30><loc_720><loc_999>flag<loc_0><loc_0><loc_185><loc_999>",
        "cat<loc_0><loc_0><loc_999><loc_999>",
        "cup<loc_286><loc_37><loc_691><loc_762>",
        "",
    ]
    label(
        florence,
        folder,
        "OD",
        out,
        scores=True,
        progress=False,
        logits_processor=force_answers(florence.processor, answers),
    )
    records = read_labels(out)
    dataset = export_coco(out, tmp_path / "coco.json")
    assert json.loads((tmp_path / "coco.json").read_text()) == dataset
    assert len(dataset["images"]) == 4  # the broken image is left out
    assert [c["name"] for c in dataset["categories"]] == ["person", "flag", "cat", "cup"]
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    labelled = {r["image"]: r["result"] for r in records if r["result"]}
    for image in dataset["images"]:
        result = labelled[image["file_name"]]
        mine = [a for a in dataset["annotations"] if a["image_id"] == image["id"]]
        assert [names[a["category_id"]] for a in mine] == result["labels"]
        assert [a["score"] for a in mine] == pytest.approx(result["scores"])
    cat = next(a for a in dataset["annotations"] if names[a["category_id"]] == "cat")
    assert cat["bbox"] == [0.0, 0.0, 450.0, 299.0]
    typed = {r["image"]: r["result"] for r in read_labels(out, as_results=True)}
    for image, result in labelled.items():
        assert isinstance(typed[image], BoxesResult) and typed[image].labels == result["labels"]
        np.testing.assert_allclose(typed[image].scores, result["scores"], rtol=1e-6)


def test_ray_data_gives_the_same_results(florence, folder, tmp_path, tiny_model_dir):
    ray = pytest.importorskip("ray")
    from florence_helpers.labelling.ray import label_with_ray

    paths = find_images(folder)
    local = tmp_path / "local.jsonl"
    label(florence, paths, "OD", local, max_new_tokens=30, num_beams=1, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        label_with_ray(
            paths,
            "OD",
            tmp_path / "ray",
            model_id=str(tiny_model_dir),
            batch_size=2,
            concurrency=1,
            device="cpu",
            max_new_tokens=30,
            num_beams=1,
        )
    finally:
        ray.shutdown()
    by_image = {r["image"]: r for r in read_labels(local)}
    distributed = read_labels(tmp_path / "ray")
    assert sorted(r["image"] for r in distributed) == sorted(by_image)
    for record in distributed:
        assert record == by_image[record["image"]]


def test_a_coco_export_names_a_damaged_line_with_its_own_advice(tmp_path):
    from florence_helpers.labelling import LabelFileError, export_coco

    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"image": "a.jpg", "task": "<OD>", "result": {"boxes": 5}}\n')
    with pytest.raises(LabelFileError) as raised:
        export_coco(labels, tmp_path / "out.json")
    message = str(raised.value)
    assert message.startswith(f"{labels} line 1: ")
    assert message.endswith(" Fix or delete that line, then export again.")
    assert "on_error" not in message  # read_labels' advice does not apply to an export
    assert not (tmp_path / "out.json").exists()


def test_ray_refuses_an_output_folder_that_holds_files_or_inputs(folder, tmp_path, monkeypatch):
    # A second run into one folder added its block files beside the first's, and read_labels
    # then gave every image twice (eleventh hostile review). Checked before Ray starts.
    pytest.importorskip("ray")
    import ray

    from florence_helpers.boundary.outputs import OutputError
    from florence_helpers.labelling import find_images, label_with_ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    paths = find_images(folder)
    used = tmp_path / "ray_out"
    used.mkdir()
    (used / "0_000000_000000.json").write_text('{"image": "a.jpg"}\n')
    with pytest.raises(OutputError, match="already holds files"):
        label_with_ray(paths, "CAPTION", used)
    with pytest.raises(OutputError, match="is or holds the input"):
        label_with_ray(paths, "CAPTION", folder)
    assert (used / "0_000000_000000.json").read_text() == '{"image": "a.jpg"}\n'
