"""``label(..., sam=...)`` and ``label --masks sam2``: every record's boxes get SAM 2 masks,
written run-length encoded, exported as COCO segmentations, named in the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from florence_helpers import TaskInputError
from florence_helpers.labelling import LabelFileError, export_coco, label, read_labels
from florence_helpers.masks import load_sam
from florence_helpers.masks.prompts import predict_masks
from florence_helpers.masks.results import from_rle
from florence_helpers.testing import build_tiny_sam, force_answers

ANSWER = "car<loc_31><loc_55><loc_312><loc_500>person<loc_468><loc_111><loc_937><loc_944>"


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    return build_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny")


@pytest.fixture(scope="module")
def sam(sam_dir, device):
    return load_sam(sam_dir, device=device)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for name, size in (("a.png", (160, 120)), ("b.png", (90, 140))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            images / name
        )
    return images


def _forced(florence):
    return {"num_beams": 1, "logits_processor": force_answers(florence.processor, ANSWER)}


def test_each_box_gets_its_mask_and_the_coco_export_holds_it(florence, sam, folder, tmp_path):
    out = tmp_path / "labels.jsonl"
    summary = label(florence, folder, "OD", out, sam=sam, progress=False, **_forced(florence))
    assert summary.written == 2 and summary.errors == 0
    records = read_labels(out)
    for record in records:
        assert len(record["masks"]) == len(record["result"]["boxes"]) == 2
        assert len(record["mask_scores"]) == 2
        image = Image.open(record["image"]).convert("RGB")
        expected, _ = predict_masks(sam, image, np.asarray(record["result"]["boxes"]))
        for rle, mask in zip(record["masks"], expected, strict=True):
            assert rle["size"] == [record["height"], record["width"]]
            np.testing.assert_array_equal(from_rle(rle), mask)
    dataset = export_coco(out, tmp_path / "coco.json")
    assert len(dataset["annotations"]) == 4
    for annotation in dataset["annotations"]:
        pixels = from_rle(annotation["segmentation"])
        assert annotation["area"] == int(pixels.sum())


def test_masks_are_part_of_the_job(florence, sam, folder, tmp_path):
    out = tmp_path / "labels.jsonl"
    label(florence, folder, "OD", out, sam=sam, progress=False, **_forced(florence))
    job = json.loads(out.read_text().splitlines()[0])["job"]
    assert job["masks"]["kind"] == "sam2" and job["masks"]["model"] == str(sam.model_id)
    again = label(florence, folder, "OD", out, sam=sam, progress=False, **_forced(florence))
    assert again.written == 0 and again.skipped == 2  # the same job resumes
    with pytest.raises(LabelFileError):  # without masks it is another job
        label(florence, folder, "OD", out, progress=False, **_forced(florence))


def test_a_task_without_boxes_is_refused_before_anything_is_written(
    florence, sam, folder, tmp_path
):
    out = tmp_path / "labels.jsonl"
    with pytest.raises(TaskInputError, match="Masks are drawn from boxes"):
        label(florence, folder, "CAPTION", out, sam=sam, progress=False)
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda r: r["masks"][0].update(size=[1, 1]), "not a run-length encoding of the image"),
        (lambda r: r["masks"][0].update(counts=5), "counts are not"),
        (lambda r: r.update(mask_scores=["high", 0.5]), "mask_scores are not numbers"),
        (lambda r: r.update(mask_scores=[0.5]), "two lists of one length"),
        # Thirteenth review: runs that do not cover the image, and fewer masks than boxes.
        (lambda r: r["masks"][0].update(counts=_counts([10**9, 1])), "image's pixels"),
        (lambda r: r["masks"][0].update(counts=_counts([0, 1])), "image's pixels"),
        (lambda r: r["masks"][0].update(counts="0"), "image's pixels"),
        (lambda r: r.update(masks=r["masks"][:1], mask_scores=[0.5]), "1 masks for 2 boxes"),
    ],
)
def test_damaged_masks_in_a_label_file_are_named_by_line(
    florence, sam, folder, tmp_path, change, problem
):
    out = tmp_path / "labels.jsonl"
    label(florence, folder, "OD", out, sam=sam, progress=False, **_forced(florence))
    lines = out.read_text().splitlines()
    record = json.loads(lines[1])
    change(record)
    lines[1] = json.dumps(record)
    out.write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelFileError, match=f"line 2: .*{problem}"):
        read_labels(out)
    with pytest.warns(UserWarning, match="Skipped"):
        assert len(read_labels(out, on_error="skip")) == 1


def _counts(runs: list[int]) -> str:
    """pycocotools' compressed counts text for these runs (its rleToString, in Python)."""
    text = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        more = True
        while more:
            code = value & 0x1F
            value >>= 5
            more = not ((code & 0x10 == 0 and value == 0) or (code & 0x10 and value == -1))
            text.append(chr(code + (0x20 if more else 0) + 48))
    return "".join(text)


def _cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "florence_helpers", "label", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_the_command_line_writes_masks_and_refuses_wrong_options_before_loading(
    tiny_model_dir, sam_dir, folder, tmp_path
):
    env = {**os.environ, "FLORENCE_MODEL": str(tiny_model_dir)}
    out = tmp_path / "labels.jsonl"
    wrong = _cli(str(folder), "--task", "CAPTION", "--out", str(out), "--masks", "sam2", env=env)
    assert wrong.returncode == 2 and "Masks are drawn from boxes" in wrong.stderr
    alone = _cli(str(folder), "--task", "OD", "--out", str(out), "--sam", str(sam_dir), env=env)
    assert alone.returncode == 2 and "--sam names the SAM 2 model" in alone.stderr
    assert not out.exists()
    done = _cli(
        str(folder), "--task", "OD", "--out", str(out), "--masks", "sam2", "--sam", str(sam_dir),
        "--max-new-tokens", "20", "--coco", str(tmp_path / "coco.json"), env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = json.loads(out.read_text().splitlines()[0])["job"]
    assert job["masks"]["model"] == str(sam_dir)
    for record in read_labels(out):
        assert len(record["masks"]) == len(record["result"]["boxes"])
