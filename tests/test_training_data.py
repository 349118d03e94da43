"""Reading fine-tuning data: targets in Florence-2's grammar, bad annotations never silent."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from florence_helpers import Task, dequantize, parse_answer, quantize
from florence_helpers.sample_data import SHAPES, make_shapes_dataset
from florence_helpers.training_data import (
    AnnotationError,
    read_coco,
    read_grounding_jsonl,
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_images=6, seed=3)


def _coco(tmp_path, annotations, size=(200, 100)):
    Image.new("RGB", size).save(tmp_path / "a.png")
    Image.new("RGB", size).save(tmp_path / "b.png")
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": size[0], "height": size[1]},
            {"id": 2, "file_name": "b.png", "width": size[0], "height": size[1]},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": annotations,
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    return path


def test_od_targets_parse_back_to_the_labelled_boxes(shapes, processor):
    data = read_coco(shapes)
    coco = json.loads(shapes.read_text())
    assert len(data) == len(coco["images"])
    for sample in data:
        assert sample.prompt == "<OD>"
        parsed = parse_answer(processor, sample.target, Task.OD, sample.image_size)
        # The native parser reads every labelled box back, as the centre of its location bin.
        truth = np.asarray(sample.boxes)
        order = np.lexsort((truth[:, 0], truth[:, 1]))
        expected = dequantize(quantize(truth[order], sample.image_size), sample.image_size)
        assert parsed.boxes.tolist() == expected.tolist()
        assert parsed.labels == [sample.labels[i] for i in order]
        assert set(sample.labels) <= set(SHAPES)


def test_targets_use_the_processors_quantization(tmp_path):
    # 199.99 px of 200 is bin 999; the ms-swift guide's int(v / size * 999) would give 998.
    path = _coco(
        tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.5, 0, 199.49, 100]}]
    )
    sample = read_coco(path)[0]
    assert sample.target == "cat<loc_2><loc_0><loc_999><loc_999>"


def test_grounding_samples_are_one_per_category_and_image(tmp_path):
    path = _coco(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 50, 20, 20]},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [50, 0, 20, 20]},
        ],
    )
    data = read_coco(path, task="OPEN_VOCABULARY_DETECTION")
    prompts = [s.prompt for s in data]
    assert prompts == ["<OPEN_VOCABULARY_DETECTION>cat", "<OPEN_VOCABULARY_DETECTION>dog"]
    assert (
        data[0].target == "cat<loc_0><loc_0><loc_100><loc_200><loc_500><loc_500><loc_600><loc_700>"
    )
    assert data[0].labels == ("cat", "cat") and data[1].boxes == ((50.0, 0.0, 70.0, 20.0),)


def test_images_without_objects_teach_an_empty_answer(tmp_path):
    path = _coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20]}])
    data = read_coco(path)
    assert [s.target for s in data][1] == ""


BAD = [
    ({"id": 7, "image_id": 1, "category_id": 1, "bbox": [150, 0, 100, 20]}, "outside"),
    ({"id": 7, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 20]}, "empty"),
    ({"id": 7, "image_id": 1, "category_id": 9, "bbox": [10, 10, 5, 5]}, "unknown category_id 9"),
    ({"id": 7, "image_id": 1, "category_id": 1, "bbox": [10, 10]}, "bbox must be"),
]


@pytest.mark.parametrize(("annotation", "reason"), BAD)
def test_bad_annotations_raise_with_the_sample_id(tmp_path, annotation, reason):
    path = _coco(tmp_path, [annotation])
    with pytest.raises(AnnotationError) as caught:
        read_coco(path)
    assert "coco.json image 1 (a.png)" in str(caught.value)
    assert "annotation 7" in str(caught.value) and reason in str(caught.value)


def test_skip_leaves_out_the_whole_image_and_says_so(tmp_path):
    path = _coco(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 900, 20]},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20]},
            {"id": 4, "image_id": 5, "category_id": 2, "bbox": [0, 0, 20, 20]},
        ],
    )
    with pytest.warns(UserWarning, match="Skipped 2 bad annotation"):
        data = read_coco(path, on_error="skip")
    # Image 1 would otherwise teach the model that its second cat is not there.
    assert [s.image.name for s in data] == ["b.png"]
    assert [p.sample_id for p in data.problems] == [
        "coco.json annotation 4",
        "coco.json image 1 (a.png)",
    ]


def test_missing_and_mismatched_images_are_reported(tmp_path):
    path = _coco(tmp_path, [])
    (tmp_path / "b.png").unlink()
    Image.new("RGB", (300, 100)).save(tmp_path / "a.png")
    with pytest.raises(AnnotationError) as caught:
        read_coco(path)
    message = str(caught.value)
    assert "image file not found" in message and "b.png" in message
    assert "the annotations say 200x100 but the image is 300x100" in message


def test_split_keeps_every_image_on_one_side(shapes):
    data = read_coco(shapes, task="OPEN_VOCABULARY_DETECTION")
    train, val = data.split(0.34, seed=1)
    assert len(train) + len(val) == len(data)
    assert not {s.image for s in train} & {s.image for s in val}
    assert len({s.image for s in val}) == 2
    assert [s.sample_id for s in data.split(0.34, seed=1)[1]] == [s.sample_id for s in val]


def test_shapes_dataset_is_reproducible(tmp_path, shapes):
    again = make_shapes_dataset(tmp_path, num_images=6, seed=3)
    assert again.read_text() == shapes.read_text()
    first = sorted(shapes.parent.glob("*.jpg"))
    assert [p.read_bytes() for p in first] == [(tmp_path / p.name).read_bytes() for p in first]


def _jsonl(tmp_path, lines):
    Image.new("RGB", (640, 480)).save(tmp_path / "photo.jpg")
    path = tmp_path / "ground.jsonl"
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    )
    return path


def test_ms_swift_grounding_lines(tmp_path):
    objects = [["bottom right sandwich", [331, 266, 612, 430]]]
    path = _jsonl(
        tmp_path,
        [
            {
                "query": "Find <ref-object>",
                "response": "<bbox>",
                "images": ["photo.jpg"],
                "objects": json.dumps(objects),
            },
            {
                "query": "Find <bbox>",
                "response": "<ref-object>",
                "images": ["photo.jpg"],
                "objects": objects,
            },
        ],
    )
    find, name = read_grounding_jsonl(path)
    assert find.task is Task.OPEN_VOCABULARY_DETECTION
    assert find.prompt == "<OPEN_VOCABULARY_DETECTION>bottom right sandwich"
    assert find.target == "bottom right sandwich<loc_517><loc_554><loc_956><loc_895>"
    assert name.task is Task.REGION_TO_CATEGORY
    assert name.prompt == "<REGION_TO_CATEGORY><loc_517><loc_554><loc_956><loc_895>"
    assert name.target == "bottom right sandwich<loc_517><loc_554><loc_956><loc_895>"
    phrase = read_grounding_jsonl(path, grounding_task="CAPTION_TO_PHRASE_GROUNDING")[0]
    assert phrase.prompt == "<CAPTION_TO_PHRASE_GROUNDING>bottom right sandwich"


def test_bad_grounding_lines_are_reported_by_line(tmp_path):
    good = {
        "query": "Find <ref-object>",
        "response": "<bbox>",
        "images": ["photo.jpg"],
        "objects": [["cat", [1, 1, 50, 50]]],
    }
    path = _jsonl(
        tmp_path,
        [
            good,
            "{not json",
            {**good, "objects": [["cat", [1, 1, 900, 50]]]},
            {**good, "images": ["gone.jpg"]},
            {**good, "query": "Describe"},
            {**good, "objects": [["cat", [5, 5, 5, 9]]]},
        ],
    )
    with pytest.warns(UserWarning, match="Skipped 5"):
        data = read_grounding_jsonl(path, on_error="skip")
    assert len(data) == 1
    reasons = {p.sample_id: p.reason for p in data.problems}
    assert list(reasons) == [f"ground.jsonl line {n}" for n in range(2, 7)]
    assert "not valid JSON" in reasons["ground.jsonl line 2"]
    assert "outside the 640x480 image" in reasons["ground.jsonl line 3"]
    assert "not found" in reasons["ground.jsonl line 4"]
    assert "neither <ref-object> nor <bbox>" in reasons["ground.jsonl line 5"]
    assert "empty" in reasons["ground.jsonl line 6"]
    with pytest.raises(AnnotationError, match="5 bad annotation"):
        read_grounding_jsonl(path)


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        read_coco(tmp_path / "nothing.json")
    (tmp_path / "x.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="no 'annotations' list"):
        read_coco(tmp_path / "x.json")
    broken = tmp_path / "broken.jpg"
    shutil.copy(__file__, broken)
    (tmp_path / "c.json").write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": "broken.jpg"}], "categories": [], "annotations": []}
        )
    )
    with pytest.raises(AnnotationError, match="image file unreadable"):
        read_coco(tmp_path / "c.json")


def test_region_samples_are_one_per_object(tmp_path):
    path = _coco(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [100, 50, 20, 20]},
        ],
    )
    first, second = read_coco(path, task="REGION_TO_CATEGORY")
    assert first.prompt == "<REGION_TO_CATEGORY><loc_0><loc_0><loc_100><loc_200>"
    assert first.target == "dog<loc_0><loc_0><loc_100><loc_200>"
    assert (second.sample_id, second.labels) == ("coco.json image 2 (b.png) object 1", ("cat",))
    with pytest.raises(ValueError, match="not OCR"):
        read_coco(path, task="OCR")
