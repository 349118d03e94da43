"""Reading fine-tuning data: targets in Florence-2's grammar, bad annotations never silent."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from florence_helpers import Task, dequantize, parse_answer, quantize
from florence_helpers.training.coco import read_coco
from florence_helpers.training.grounding import read_grounding_jsonl
from florence_helpers.training.sample_data import SHAPES, make_shapes_dataset
from florence_helpers.training.samples import AnnotationError


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


# ms-swift's grounding format today, quoted from its custom-dataset guide, section "Grounding"
# (lines 310-312 and 325 at commit 3602360a562313afbf2ef6065fdf61f271a2c5b9):
# https://github.com/modelscope/ms-swift/blob/main/docs/source_en/Customization/Custom-dataset.md
# The first three are "ms-swift's grounding data format"; the last its QWENVL_BBOX_FORMAT='new'
# example, where the labels in the answer are placeholders too.
SWIFT_GUIDE = r"""
{"messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "<image>Describe the image."}, {"role": "assistant", "content": "<ref-object><bbox> and <ref-object><bbox> are playing on the beach"}], "images": ["/xxx/x.jpg"], "objects": {"ref": ["a dog", "a woman"], "bbox": [[331.5, 761.4, 853.5, 1594.8], [676.5, 685.8, 1099.5, 1427.4]]}}
{"messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "<image>Find the <ref-object> in the image"}, {"role": "assistant", "content": "<bbox><bbox>"}], "images": ["/xxx/x.jpg"], "objects": {"ref": ["sheep"], "bbox": [[90.9, 160.8, 135, 212.8], [360.9, 480.8, 495, 532.8]]}}
{"messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "<image>Help me open Google Chrome"}, {"role": "assistant", "content": "Action: click(start_box='<bbox>')"}], "images": ["/xxx/x.jpg"], "objects": {"ref": [], "bbox": [[615, 226]]}}
{"messages": [{"role": "user", "content": "<image>Locate the <ref-object> in the image"}, {"role": "assistant", "content": "[\n\t{\"bbox_2d\": <bbox>, \"label\": \"<ref-object>\"},\n\t{\"bbox_2d\": <bbox>, \"label\": \"<ref-object>\"}\n]"}], "images": ["cat.png"], "objects": {"ref": ["sheep", "sheep", "sheep"], "bbox": [[90.9, 160.8, 135, 212.8], [360.9, 480.8, 495, 532.8]]}}
"""  # noqa: E501

# The form of ms-swift's 2024 Florence-2 guide, quoted from (lines 166-167):
# https://github.com/modelscope/ms-swift/blob/d3e9df0b98f5edee79a249aabe3a3286bcf5d979/docs/source_en/Multi-Modal/florence-best-pratice.md
SWIFT_FLORENCE_GUIDE = r"""
{"query": "Find <bbox>", "response": "<ref-object>", "images": ["/coco2014/train2014/COCO_train2014_000000001507.jpg"], "objects": "[[\"bottom right sandwich\", [331, 266, 612, 530]]]" }
{"query": "Find <ref-object>", "response": "<bbox>", "images": ["/coco2014/train2014/COCO_train2014_000000001507.jpg"], "objects": "[[\"bottom right sandwich\", [331, 266, 612, 530]]]" }
"""  # noqa: E501
# On a 2000x2000 image a pixel value v falls in bin floor(v / 2).
SHEEP = "sheep<loc_45><loc_80><loc_67><loc_106><loc_180><loc_240><loc_247><loc_266>"
SANDWICH = "<loc_165><loc_133><loc_306><loc_265>"


def _swift(tmp_path, text, change=None):
    """The records of ``text`` on one 2000x2000 image instead of the guide's /xxx/x.jpg."""
    Image.new("RGB", (2000, 2000)).save(tmp_path / "x.png")
    records = [json.loads(line) for line in text.strip().splitlines()]
    path = tmp_path / "swift.jsonl"
    path.write_text(
        "".join(json.dumps({**r, "images": ["x.png"], **(change or {})}) + "\n" for r in records)
    )
    return path


def test_the_ms_swift_guides_grounding_records(tmp_path):
    with pytest.warns(UserWarning, match="Skipped 2"):
        data = read_grounding_jsonl(_swift(tmp_path, SWIFT_GUIDE), on_error="skip")
    # "Find the <ref-object> in the image" -> "<bbox><bbox>": one phrase, both its boxes.
    for sample in data:
        assert sample.task is Task.OPEN_VOCABULARY_DETECTION
        assert (sample.prompt, sample.target) == ("<OPEN_VOCABULARY_DETECTION>sheep", SHEEP)
        assert sample.boxes == ((90.9, 160.8, 135, 212.8), (360.9, 480.8, 495, 532.8))
    assert [s.sample_id for s in data] == ["swift.jsonl line 2", "swift.jsonl line 4"]
    # A caption with boxes in it, and a click at a point, have no Florence-2 task.
    first, third = data.problems
    assert first.sample_id == "swift.jsonl line 1" and "neither <ref-object> nor <bbox>" in str(
        first
    )
    assert third.sample_id == "swift.jsonl line 3" and "[615, 226] is a point" in str(third)


@pytest.mark.parametrize(
    ("bbox_type", "scale"), [("real", 1), ("norm1", 1 / 2000), ("norm1000", 1 / 2)]
)
def test_ms_swift_bbox_types_are_read_as_ms_swift_reads_them(tmp_path, bbox_type, scale):
    # ms-swift's Template.normalize_bbox: "norm1" is a share of the image side; "norm1000" is what
    # its templates write for Florence-2 (round(v / side * 1000)), thousandths of the side.
    sheep = json.loads(SWIFT_GUIDE.strip().splitlines()[1])
    boxes = [[v * scale for v in box] for box in sheep["objects"]["bbox"]]
    objects = {"ref": ["sheep"], "bbox": boxes, "bbox_type": bbox_type}
    (sample,) = read_grounding_jsonl(_swift(tmp_path, json.dumps(sheep), {"objects": objects}))
    assert sample.target == SHEEP


def test_ms_swift_region_questions_and_unknown_bbox_types(tmp_path):
    # RefCOCOPreprocessor('caption') in ms-swift's swift/dataset/dataset/mllm.py builds lines from
    # GroundingMixin's prompts, e.g. ("What is the object at <bbox>", "<ref-object>").
    line = {
        "query": "What is the object at <bbox>",
        "response": "<ref-object>",
        "objects": {"ref": ["bottom right sandwich"], "bbox": [[331, 266, 612, 530]]},
    }
    (sample,) = read_grounding_jsonl(_swift(tmp_path, json.dumps(line)))
    assert sample.prompt == "<REGION_TO_CATEGORY>" + SANDWICH
    assert sample.target == "bottom right sandwich" + SANDWICH
    line["objects"]["bbox_type"] = "norm_1000"  # the 2024 spelling: ms-swift reads it as pixels
    with pytest.raises(AnnotationError, match="bbox_type must be 'real' .* got 'norm_1000'"):
        read_grounding_jsonl(_swift(tmp_path, json.dumps(line)))


def test_the_ms_swift_florence_guides_records(tmp_path):
    region, find = read_grounding_jsonl(_swift(tmp_path, SWIFT_FLORENCE_GUIDE))
    assert (region.prompt, region.target) == (
        "<REGION_TO_CATEGORY>" + SANDWICH,
        "bottom right sandwich" + SANDWICH,
    )
    assert (find.prompt, find.target) == (
        "<OPEN_VOCABULARY_DETECTION>bottom right sandwich",
        "bottom right sandwich" + SANDWICH,
    )


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


@pytest.mark.parametrize("kind", ["shapes", "receipts"])
def test_sample_data_never_replaces_a_dataset_it_did_not_write(tmp_path, kind):
    import os

    from florence_helpers.boundary.outputs import OutputError
    from florence_helpers.training.sample_data import make_receipts

    make, index = (
        (make_shapes_dataset, "annotations.json")
        if kind == "shapes"
        else (make_receipts, "qa.jsonl")
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / index).write_text('{"images": ["my 5000 hand labels"]}\n')
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(mine / index, linked / index)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for folder in (mine, linked, other):
        with pytest.raises(OutputError, match="could replace a dataset of yours"):
            make(folder, num_images=1)
    assert (mine / index).read_text() == '{"images": ["my 5000 hand labels"]}\n'
    names = ["linked", index, index, "mine", "notes.txt", "other"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(names)
    ours = tmp_path / "ours"
    first = make(ours, num_images=2, seed=1).read_bytes()
    again = make(ours, num_images=2, seed=2)  # a re-run replaces what it wrote before
    assert again.read_bytes() != first and not list(ours.glob(".*"))
