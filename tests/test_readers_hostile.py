"""The dataset readers are an outside-input boundary: hostile files give named problems.

Every record-level problem (a wrong type, a duplicate id, an image that is garbage or a
decompression bomb, a line that is not UTF-8...) is reported with its file and line or record,
raised together with ``on_error="raise"`` and left out with ``on_error="skip"``; a problem with
the file itself raises a ``ValueError`` or ``FileNotFoundError`` naming it. The explicit tests
are the cases a reviewer found; the property-based ones put random JSON anywhere in valid records.
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
import struct
import warnings
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from florence_helpers import Task
from florence_helpers.training.coco import read_coco
from florence_helpers.training.grounding import read_grounding_jsonl
from florence_helpers.training.qa import DOCVQA, read_qa
from florence_helpers.training.samples import AnnotationError, TrainingSet

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def png_header(width: int, height: int) -> bytes:
    """The chunks of a PNG of that size without its pixels: Pillow reads the size, no more."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def png_bytes(size=(24, 16), colour="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Images every test may point at: good, garbage, and bombs that are only a header."""
    root = tmp_path_factory.mktemp("hostile")
    Image.new("RGB", (64, 48), "red").save(root / "a.png")
    Image.new("RGB", (32, 32), "blue").save(root / "b.png")
    Image.new("RGB", (1, 1)).save(root / "dot.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "bomb.png").write_bytes(png_header(60000, 60000))  # past Pillow's own limit
    (root / "large.png").write_bytes(png_header(10000, 10000))  # past the 89.5 MP training reads
    return root


def _coco(folder: Path, name: str, images, annotations, categories=None) -> Path:
    data = {
        "images": images,
        "categories": categories if categories is not None else [{"id": 1, "name": "cat"}],
        "annotations": annotations,
    }
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def _skip(reader, *args, **kwargs) -> TrainingSet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reader(*args, on_error="skip", **kwargs)


def _reasons(data: TrainingSet) -> str:
    return "\n".join(str(p) for p in data.problems)


# --- COCO ---------------------------------------------------------------------------------------


def test_coco_duplicate_image_ids_are_an_error_not_a_merge(folder):
    # Both images had id 1: a.png's cat would have been taught on b.png as well.
    path = _coco(
        folder,
        "dup_images.json",
        [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]}],
    )
    with pytest.raises(AnnotationError, match=r"id 1 is given to 2 images \(#0 \(a\.png\), #1"):
        read_coco(path)
    data = _skip(read_coco, path)
    assert len(data) == 0 and [p.sample_id for p in data.problems] == ["dup_images.json image 1"]


def test_coco_duplicate_category_and_annotation_ids_are_errors(folder):
    path = _coco(
        folder,
        "dup_ids.json",
        [
            {"id": 1, "file_name": "a.png"},
            {"id": 2, "file_name": "b.png"},
            {"id": 3, "file_name": "a.png"},
        ],
        [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
            {"id": 7, "image_id": 2, "category_id": 2, "bbox": [1, 1, 10, 10]},
            {"id": 7, "image_id": 3, "category_id": 2, "bbox": [1, 1, 10, 10]},
        ],
        categories=[{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 2, "name": "cup"}],
    )
    data = _skip(read_coco, path)
    assert len(data) == 0
    reasons = _reasons(data)
    assert "category #1: id 1 is also another category's" in reasons
    assert "image 1 (a.png): annotation 1: category_id 1 belongs to more than one" in reasons
    assert "image 2 (b.png): annotation 7: 2 annotations have this id" in reasons
    assert "image 3 (a.png): annotation 7: 2 annotations have this id" in reasons


def test_coco_ids_that_are_lists_or_dicts_are_bad_records_not_crashes(folder):
    path = _coco(
        folder,
        "odd_ids.json",
        [
            {"id": [1], "file_name": "a.png"},
            {"id": 2, "file_name": "b.png"},
            {"id": 3, "file_name": "a.png"},
        ],
        [
            {"id": 1, "image_id": {"x": 2}, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": [2], "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 3, "image_id": 3, "category_id": [1], "bbox": [1, 1, 5, 5]},
        ],
        categories=[{"id": {"a": 1}, "name": "dog"}, {"id": 1, "name": "cat"}],
    )
    with pytest.raises(AnnotationError, match="5 bad annotation"):
        read_coco(path)
    reasons = _reasons(_skip(read_coco, path))
    assert "category #0: id must be a whole number or a string, got {'a': 1}" in reasons
    assert "image #0 (a.png): id must be a whole number or a string, got [1]" in reasons
    assert "annotation 1: image_id must be a whole number or a string" in reasons
    assert "image 2 (b.png): annotation [2]: id must be a whole number" in reasons
    assert "image 3 (a.png): annotation 3: category_id must be a whole number" in reasons


@pytest.mark.parametrize("width", ["1", True, 1.0, float("nan"), None])
def test_coco_width_and_height_are_whole_numbers(folder, width):
    # A 1x1 image: True == 1 and 1.0 == 1 passed the old comparison.
    path = _coco(
        folder,
        "sizes.json",
        [{"id": 1, "file_name": "dot.png", "width": width, "height": 1}],
        [],
    )
    with pytest.raises(AnnotationError, match="width and height must be whole numbers of pixels"):
        read_coco(path)
    assert len(_skip(read_coco, path)) == 0


@pytest.mark.parametrize(
    "bbox",
    [[1, 1], ["1", "1", "5", "5"], [1, 1, True, 5], [1, 1, 10**400, 5], [1, 1, 5, None], "1,1,5,5"],
)
def test_coco_boxes_are_four_finite_numbers(folder, bbox):
    path = _coco(
        folder,
        "boxes.json",
        [{"id": 1, "file_name": "a.png"}],
        [{"id": 9, "image_id": 1, "category_id": 1, "bbox": bbox}],
    )
    with pytest.raises(
        AnnotationError, match=r"annotation 9: bbox must be \[x, y, width, height\]"
    ):
        read_coco(path)
    assert len(_skip(read_coco, path)) == 0


def test_coco_labels_that_would_be_read_as_tokens_are_refused(folder):
    path = _coco(
        folder,
        "tokens.json",
        [{"id": 1, "file_name": "a.png"}],
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
        categories=[{"id": 1, "name": "cat<loc_5>"}],
    )
    reasons = _reasons(_skip(read_coco, path))
    assert "category #0: name: label 'cat<loc_5>': <loc_5> in it would be read" in reasons


def test_coco_file_level_problems_name_the_file(folder):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        read_coco(folder / "nothing.json")
    cases = {
        "list.json": (b"[1, 2]", "holds a JSON list"),
        "cut.json": (b'{"images": [', "is not valid JSON"),
        "deep.json": (b"[" * 100_000, "is not valid JSON"),  # a RecursionError inside json
        "digits.json": (b'{"images": [' + b"9" * 5000 + b"]}", "is not valid JSON"),
        "latin1.json": ('{"images": [], "x": "caf\u00e9"}'.encode("latin-1"), "at byte offset 24"),
    }
    for name, (data, message) in cases.items():
        (folder / name).write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(name)) as raised:
            read_coco(folder / name, on_error="skip")
        assert message in str(raised.value) and not isinstance(raised.value, AnnotationError)


def test_coco_images_that_are_bombs_or_garbage_are_bad_records(folder):
    path = _coco(
        folder,
        "bombs.json",
        [
            {"id": 1, "file_name": "bomb.png"},
            {"id": 2, "file_name": "large.png"},
            {"id": 3, "file_name": "broken.png"},
            {"id": 4, "file_name": "a.png"},
            {"id": 5, "file_name": "a\x00.png"},
            {"id": 6, "file_name": "."},
        ],
        [],
    )
    data = _skip(read_coco, path)
    assert [s.image.name for s in data] == ["a.png"]
    reasons = _reasons(data)
    assert "MAX_IMAGE_PIXELS" in reasons and "10000x10000 pixels, more than the 89.5" in reasons
    assert "image 3 (broken.png): image file unreadable" in reasons
    assert "image 5" in reasons and "image 6 (.): image file unreadable" in reasons


# --- grounding ----------------------------------------------------------------------------------

GOOD_LINE = {
    "query": "Find <ref-object>",
    "response": "<bbox>",
    "images": ["a.png"],
    "objects": [["cat", [1, 1, 20, 20]]],
}


def _lines(folder: Path, name: str, lines) -> Path:
    path = folder / name
    path.write_bytes(
        b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)
    )
    return path


def test_grounding_a_line_that_is_not_utf8_is_one_bad_line(folder):
    path = _lines(folder, "latin1.jsonl", [GOOD_LINE, b'{"query": "caf\xe9"}', GOOD_LINE])
    data = _skip(read_grounding_jsonl, path)
    assert len(data) == 2
    assert str(data.problems[0]) == (
        "latin1.jsonl line 2: is not UTF-8 text (at byte offset 14 of the line: 0xe9): save "
        "the file as UTF-8"
    )
    with pytest.raises(AnnotationError, match="1 bad annotation"):
        read_grounding_jsonl(path)


def test_grounding_fewer_labels_than_boxes_is_an_error(folder):
    lines = [
        {**GOOD_LINE, "objects": [["cat", [1, 1, 20, 20], [30, 1, 40, 20]]]},  # a box too many
        {
            "messages": [
                {"role": "user", "content": "<image>Find the <ref-object>"},
                {"role": "assistant", "content": "<bbox><bbox>"},
            ],
            "images": ["a.png"],
            "objects": {"ref": [], "bbox": [[1, 1, 20, 20], [30, 1, 40, 20]]},
        },
    ]
    data = _skip(read_grounding_jsonl, _lines(folder, "fewer.jsonl", lines))
    assert len(data) == 0
    reasons = _reasons(data)
    assert "line 1: object 1 must be [label, [x1, y1, x2, y2]]" in reasons
    assert "line 2: objects has 0 ref and 2 bbox, but the messages have 1 <ref-object>" in reasons


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"query": ["Find <ref-object>"]}, "the question must be text"),
        ({"images": ["a\x00.png"]}, "image file unreadable"),
        ({"images": ["~no_such_user_4711/a.png"]}, "image file not found"),
        ({"images": [["a.png"]]}, "the image must be a file path"),
        ({"images": ["bomb.png"]}, "MAX_IMAGE_PIXELS"),
        ({"objects": [["cat", [1, 2]]]}, "is a point (x, y)"),
        ({"objects": [["cat", ["1", "1", "5", "5"]]]}, "four finite numbers"),
        ({"objects": [["cat", [1, 1, 10**400, 5]]]}, "four finite numbers"),
        ({"objects": [[{"a": 1}, [1, 1, 5, 5]]]}, "a label must be text"),
        ({"objects": [["cat</s>", [1, 1, 5, 5]]]}, "special tokens"),
        ({"objects": {"ref": "cat", "bbox": [[1, 1, 5, 5]]}}, "ref and bbox must be lists"),
        ({"objects": {"ref": ["cat"], "bbox": [[1, 1, 5, 5]], "bbox_type": 5}}, "bbox_type"),
        ({"objects": None}, "objects must be"),
    ],
)
def test_grounding_hostile_fields_are_bad_lines(folder, change, reason):
    path = _lines(folder, "fields.jsonl", [{**GOOD_LINE, **change}, GOOD_LINE])
    data = _skip(read_grounding_jsonl, path)
    assert len(data) == 1 and len(data.problems) == 1
    assert data.problems[0].sample_id == "fields.jsonl line 1" and reason in _reasons(data)


@pytest.mark.parametrize(
    "line",
    [b"null", b"[" * 50_000, b'{"query": ' + b"7" * 5000 + b"}", b"\xff\xfe", b"{\x00}"],
)
def test_grounding_lines_that_are_not_records(folder, line):
    path = _lines(folder, "records.jsonl", [line, GOOD_LINE])
    data = _skip(read_grounding_jsonl, path)
    assert len(data) == 1 and [p.sample_id for p in data.problems] == ["records.jsonl line 1"]
    with pytest.raises(AnnotationError):
        read_grounding_jsonl(path)


# --- questions and answers ----------------------------------------------------------------------


def test_qa_two_datasets_in_one_images_dir_keep_their_own_images(tmp_path):
    red = [{"image": {"bytes": png_bytes(colour="red")}, "question": "Colour?", "answer": "red"}]
    blue = [{"image": {"bytes": png_bytes(colour="blue")}, "question": "Colour?", "answer": "b"}]
    first = read_qa(red, tmp_path)
    second = read_qa(blue, tmp_path)  # used to write its row 1 over the first's row 1
    assert first[0].image != second[0].image
    assert Image.open(first[0].image).getpixel((0, 0)) == (255, 0, 0)
    assert Image.open(second[0].image).getpixel((0, 0)) == (0, 0, 255)
    again = read_qa(red, tmp_path)  # the same image: the same file, reused
    assert again[0].image == first[0].image and len(list(tmp_path.iterdir())) == 2


def test_qa_never_overwrites_a_different_file(tmp_path):
    rows = [{"image": {"bytes": png_bytes()}, "question": "Colour?", "answer": "red"}]
    written = read_qa(rows, tmp_path)[0].image
    written.write_bytes(b"someone else's file")
    with pytest.raises(AnnotationError, match="already holds another image and was not overw"):
        read_qa(rows, tmp_path)
    assert written.read_bytes() == b"someone else's file"


def test_qa_garbage_and_bomb_bytes_are_bad_rows(folder, tmp_path):
    rows = [
        {"image": {"bytes": b"garbage"}, "question": "Q?", "answer": "a"},
        {"image": {"bytes": png_header(60000, 60000)}, "question": "Q?", "answer": "a"},
        {"image": {"bytes": png_header(10000, 10000)}, "question": "Q?", "answer": "a"},
        {"image": {"bytes": "text"}, "question": "Q?", "answer": "a"},
        None,
        {"image": {"bytes": png_bytes()}, "question": "Q?", "answer": "a"},
    ]
    with pytest.raises(AnnotationError) as raised:
        read_qa(rows, tmp_path)
    message = str(raised.value)
    assert "row 1: Could not read the image of row 1" in message
    assert "row 2: " in message and "row 3: Did not decode the image of row 3" in message
    assert "row 4: the image's bytes must be bytes" in message
    assert "row 5: not a row of named columns" in message
    assert len(_skip(read_qa, rows, tmp_path)) == 1


def test_qa_a_line_that_is_not_utf8_is_one_bad_line(folder, tmp_path):
    good = {"image": str(folder / "a.png"), "question": "Q?", "answer": "a"}
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_bytes(
        json.dumps(good).encode() + b'\n{"answer": "caf\xe9"}\n' + json.dumps(good).encode()
    )
    data = _skip(read_qa, jsonl)
    assert len(data) == 2 and data.problems[0].sample_id == "qa.jsonl line 2"
    table = tmp_path / "qa.csv"
    table.write_bytes(
        b"image,question,answer\n"
        + f"{folder / 'a.png'},Q?,caf\xe9\n".encode("latin-1")
        + f"{folder / 'a.png'},Q?,a\x00b\n".encode()
        + f"{folder / 'a.png'},Q?,1,5\n".encode()
        + f'{folder / "a.png"},"Two\nlines?",a\n'.encode()
    )
    data = _skip(read_qa, table)
    assert [s.sample_id for s in data] == ["qa.csv line 3", "qa.csv line 5"]  # a NUL is text
    assert [p.sample_id for p in data.problems] == ["qa.csv line 2", "qa.csv line 4"]
    assert "not UTF-8" in str(data.problems[0]) and "4 fields" in str(data.problems[1])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"question": ["What?"]}, "a question must be text"),
        ({"answer": float("nan")}, "an answer must be text"),
        ({"answer": True}, "an answer must be text"),
        ({"answer": "\ud800"}, "not valid Unicode"),
        ({"image": 5}, "the image must be a file path"),
        ({"image": "a\x00.png"}, "image file unreadable"),
    ],
)
def test_qa_hostile_fields_are_bad_rows(folder, change, reason):
    rows = [{"image": "a.png", "question": "What?", "answer": "red", **change}]
    data = _skip(read_qa, rows, folder)
    assert len(data) == 0 and reason in _reasons(data)


# --- property-based: valid records with random JSON put in anywhere -----------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
hostile = json_values | st.sampled_from(
    [
        math.nan,
        math.inf,
        10**400,
        2**63,
        -1,
        0,
        1.0,
        True,
        "5",
        "",
        " ",
        "\ud800",
        "<loc_1>",
        "<OD>",
        "<ref-object>",
        "<bbox>",
        "norm1",
        "norm1000",
        "a\x00.png",
        "bomb.png",
        "large.png",
        "broken.png",
        "gone.png",
        "~nobody_4711/a.png",
        [0, 0],
        [1, 1, 5, 5],
        {},
        [],
    ]
)
SIZES = {"a.png": (64, 48), "b.png": (32, 32)}
image_names = st.sampled_from(sorted(SIZES))
labels = st.sampled_from(["cat", "a dog", "sheep"])
xywh = st.tuples(st.integers(0, 15), st.integers(0, 15), st.integers(1, 16), st.integers(1, 16))
xyxy = xywh.map(lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]])


def _paths(value, path=()):
    yield path
    children = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in children:
        yield from _paths(child, (*path, key))


@st.composite
def spoiled(draw, valid):
    """A valid record with up to two of its values (or keys) replaced by hostile ones."""
    record = draw(valid)
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(list(_paths(record))))
        if not path:
            record = copy.deepcopy(draw(hostile))
            continue
        parent = record
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.integers(0, 4)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(draw(hostile))
    return record


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    """``data``, sometimes with a few random bytes put in somewhere."""
    if draw(st.integers(0, 3)):
        return data
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]


def _valid(sample) -> None:
    """What every returned sample must be: boxes inside its image, a target in the grammar."""
    width, height = sample.image_size
    assert type(width) is int and type(height) is int and width > 0 and height > 0
    assert sample.image.is_file()
    for box in [*sample.boxes, *([sample.region] if sample.region else [])]:
        x1, y1, x2, y2 = box
        assert all(math.isfinite(v) for v in box)
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert len(sample.labels) == len(sample.boxes)
    (sample.prompt + sample.target).encode("utf-8")  # no lone surrogates
    if sample.answers:  # a question
        assert sample.target == sample.answers[0] == sample.target.strip() != ""
        return
    loc = r"<loc_\d{1,3}>"
    assert re.fullmatch(rf"(?:[^<>]+(?:{loc}){{4}}(?:(?:{loc}){{4}})*)*", sample.target)
    assert len(re.findall(loc, sample.target)) == 4 * len(sample.boxes)
    assert set(re.findall(rf"([^<>]+)(?={loc})", sample.target)) == set(sample.labels)


# Samples and problems per fuzz test: random data that never made both would test little.
FOUND: dict[str, Counter] = defaultdict(Counter)


def _contract(test: str, read, file: str | None = None) -> None:
    """Skip returns valid samples; raise returns the same or raises an AnnotationError. Only a
    problem of the ``file`` as a whole (its header, its top level) raises at once, naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = read("skip")
    except ValueError as error:
        assert file and file in str(error) and not isinstance(error, AnnotationError)
        with pytest.raises(ValueError, match=re.escape(str(error))):
            read("raise")
        return
    assert isinstance(kept, TrainingSet)
    for sample in kept:
        _valid(sample)
    FOUND[test].update(samples=len(kept), problems=len(kept.problems))
    try:
        strict = read("raise")
    except AnnotationError as error:
        assert [p.sample_id for p in error.problems] == [p.sample_id for p in kept.problems] != []
    else:
        assert not kept.problems and strict.samples == kept.samples


@st.composite
def coco_data(draw):
    files = draw(st.lists(image_names, min_size=1, max_size=3))
    images = [
        {"id": n, "file_name": name, "width": SIZES[name][0], "height": SIZES[name][1]}
        for n, name in enumerate(files, start=1)
    ]
    annotations = [
        {
            "id": n,
            "image_id": draw(st.integers(1, len(files))),
            "category_id": draw(st.integers(1, 2)),
            "bbox": list(draw(xywh)),
        }
        for n in range(1, draw(st.integers(0, 4)) + 1)
    ]
    categories = [{"id": 1, "name": draw(labels)}, {"id": 2, "name": "cup"}]
    return {"images": images, "categories": categories, "annotations": annotations}


@FUZZ
@given(
    coco=spoiled(coco_data()),
    task=st.sampled_from(["OD", "REGION_TO_CATEGORY", "OPEN_VOCABULARY_DETECTION"]),
)
def test_coco_fuzz(folder, coco, task):
    path = folder / "fuzz.json"
    path.write_text(json.dumps(coco))
    _contract("coco", lambda on_error: read_coco(path, task=task, on_error=on_error), "fuzz.json")


@FUZZ
@given(data=st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()))
def test_coco_fuzz_whole_files(folder, data):
    path = folder / "fuzz_file.json"
    path.write_bytes(data)
    for on_error in ("skip", "raise"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_coco(path, on_error=on_error)
        except ValueError as error:  # AnnotationError is one too
            assert "fuzz_file.json" in str(error) or isinstance(error, AnnotationError)


@st.composite
def grounding_record(draw):
    label, boxes = draw(labels), draw(st.lists(xyxy, min_size=1, max_size=3))
    if draw(st.booleans()):  # the 2024 guide's form
        find = draw(st.booleans())
        objects = [[label, box] for box in (boxes if find else boxes[:1])]
        return {
            "query": "Find <ref-object>" if find else "Find <bbox>",
            "response": "<bbox>" if find else "<ref-object>",
            "images": [draw(image_names)],
            "objects": json.dumps(objects) if draw(st.booleans()) else objects,
        }
    bbox_type = draw(st.sampled_from(["real", "norm1", "norm1000"]))
    scale = {"real": 1, "norm1": 1 / 64, "norm1000": 1000 / 64}[bbox_type]
    boxes = [[v * scale for v in box] for box in boxes]
    if draw(st.booleans()):  # find a phrase
        question, answer = "<image>Find the <ref-object> in the image", "<bbox>" * len(boxes)
        objects = {"ref": [label], "bbox": boxes}
    else:  # name a region
        question, answer = "<image>What is <bbox>?", "<ref-object>"
        objects = {"ref": [label], "bbox": boxes[:1]}
    if bbox_type != "real" or draw(st.booleans()):
        objects["bbox_type"] = bbox_type
    conversation = (
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
        if draw(st.booleans())
        else {"query": question, "response": answer}
    )
    return {**conversation, "images": [draw(image_names)], "objects": objects}


@FUZZ
@given(
    lines=st.lists(
        spoiled(grounding_record()).map(lambda r: json.dumps(r).encode()).flatmap(corrupted),
        max_size=4,
    ),
    task=st.sampled_from(["OPEN_VOCABULARY_DETECTION", "CAPTION_TO_PHRASE_GROUNDING"]),
)
def test_grounding_fuzz(folder, lines, task):
    path = folder / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    _contract(
        "grounding",
        lambda on_error: read_grounding_jsonl(path, grounding_task=task, on_error=on_error),
    )


images_in_data = st.sampled_from(
    [
        png_bytes(),
        png_bytes((9, 9), "blue"),
        png_header(60000, 60000),
        png_header(10000, 10000),
        b"x",
    ]
).map(lambda data: {"bytes": data}) | st.just(Image.new("RGB", (8, 8), "green"))
qa_row = st.fixed_dictionaries(
    {
        "image": image_names | images_in_data,
        "question": st.sampled_from(["What colour?", "Total?"]),
        "answer": st.sampled_from(["red", "12.50"])
        | st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=2),
    }
)


@FUZZ
@given(rows=st.lists(spoiled(qa_row), max_size=4), caption=st.booleans())
def test_qa_rows_fuzz(folder, rows, caption):
    # Relative paths start at the images' folder, and images in the data are written there.
    task, question = (Task.CAPTION, None) if caption else (DOCVQA, "question")
    if caption:
        rows = [
            {k: v for k, v in row.items() if k != "question"} if isinstance(row, dict) else row
            for row in rows
        ]
    _contract(
        "qa rows",
        lambda on_error: read_qa(
            rows, folder, task=task, question_column=question, on_error=on_error
        ),
    )


@FUZZ
@given(
    rows=st.lists(spoiled(qa_row.filter(lambda r: isinstance(r["image"], str))), max_size=4),
    csv=st.booleans(),
    data=st.data(),
)
def test_qa_files_fuzz(folder, rows, csv, data):
    if csv:
        path = folder / "fuzz.csv"
        lines = [b"image,question,answer"] + [
            ",".join(
                json.dumps(row.get(k), default=repr) if isinstance(row, dict) else str(row)
                for k in ("image", "question", "answer")
            ).encode("utf-8", "surrogateescape")
            for row in rows
        ]
    else:
        path = folder / "fuzz_qa.jsonl"
        lines = [json.dumps(row).encode() for row in rows]
    path.write_bytes(b"\n".join(data.draw(corrupted(line)) for line in lines))
    _contract("qa files", lambda on_error: read_qa(path, folder, on_error=on_error), path.name)


def test_the_fuzzing_reached_samples_and_problems():
    # Runs after the fuzz tests that ran (file order).
    for test, found in FOUND.items():
        assert found["samples"] >= 10 and found["problems"] >= 10, (test, found)


# --- label files: a result edited by hand --------------------------------------------------

RESULT_KEYS = ("boxes", "labels", "scores", "polygons", "quads", "texts", "text", "box")


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(st.sampled_from(RESULT_KEYS), json_values, min_size=1, max_size=4),
    st.sampled_from(["<OD>", "<OCR_WITH_REGION>", "<REFERRING_EXPRESSION_SEGMENTATION>"]),
)
def test_any_result_in_a_label_file_is_read_or_named_by_its_line(tmp_path, result, task):
    from florence_helpers.labelling import LabelFileError, export_coco, read_labels

    record = {"image": "a.jpg", "path": "/x/a.jpg", "width": 10, "height": 10, "task": task}
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({**record, "error": None, "result": result}) + "\n")
    try:
        read_labels(labels, as_results=True)
    except LabelFileError as error:
        assert "labels.jsonl line 1" in str(error)
    try:
        dataset = export_coco(labels, tmp_path / "coco.json")
    except LabelFileError as error:
        assert "labels.jsonl line 1" in str(error) and "export again" in str(error)
    else:
        json.loads((tmp_path / "coco.json").read_text(), parse_constant=pytest.fail)
        assert all(len(a["bbox"]) == 4 for a in dataset["annotations"])


@pytest.mark.parametrize(
    "result",
    [
        {"boxes": [[1, 2]], "labels": ["a"]},
        {"boxes": [[1, 2, 3, 4]]},
        {"boxes": [[1, 2, 3, 4]], "labels": []},
        {"boxes": [[1, 2, 3, 4]], "labels": [["x"]]},
        {"boxes": "1 2 3 4", "labels": ["a"]},
        {"boxes": [[1e400, 2, 3, 4]], "labels": ["x"]},
        {"boxes": [[1, 2, 3, 4]], "labels": ["x"], "scores": [0.5, 0.6]},
    ],
)
def test_a_hand_edited_result_is_a_label_file_error_not_a_crash(tmp_path, result):
    from florence_helpers.labelling import LabelFileError, export_coco

    record = {"image": "a.jpg", "path": "/x/a.jpg", "width": 10, "height": 10, "task": "<OD>"}
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({**record, "error": None, "result": result}) + "\n")
    with pytest.raises(LabelFileError, match="line 1: its result cannot be read"):
        export_coco(labels, tmp_path / "coco.json")
    with pytest.raises(LabelFileError, match="Record 1: its result cannot be read"):
        export_coco([{**record, "error": None, "result": result}], tmp_path / "coco.json")
    assert not (tmp_path / "coco.json").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "sparse"])
def test_a_dataset_file_that_is_not_a_regular_file_of_sane_size_is_refused(folder, kind):
    # annotations.json -> /dev/zero grew to 2.3 GB before a MemoryError, and a FIFO blocked a
    # reader for ever (ninth hostile review): refused from the open descriptor, at once.
    import os

    (folder / kind).mkdir()
    for name, reader in (("annotations.json", read_coco), ("qa.jsonl", read_qa)):
        path = folder / kind / name
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dev-zero":
            path.symlink_to("/dev/zero")
        else:
            with open(path, "wb") as handle:
                handle.truncate(2**31)  # 2 GiB that take no disk space
        with pytest.raises(ValueError, match=r"not a regular file|more than the 1.0 GiB"):
            reader(path)


def test_a_question_longer_than_the_model_reads_is_one_bad_row(folder):
    # A 5 MB question was read, and refused later for the whole evaluation (tenth review).
    rows = folder / "long.jsonl"
    picture = folder / "long.png"
    Image.new("RGB", (32, 32)).save(picture)
    line = {"image": picture.name, "answer": "a"}
    rows.write_text(
        json.dumps({**line, "question": "what " * 1_000_000})
        + "\n"
        + json.dumps({**line, "question": "what?"})
        + "\n"
    )
    with pytest.warns(UserWarning):
        kept = read_qa(rows, on_error="skip")
    assert len(kept) == 1 and "more than the model reads" in str(kept.problems[0])


@pytest.mark.parametrize(
    ("width", "height", "problem"),
    [
        (1_000_000, 1_000_000, "its width and height are larger than any image labelled"),
        (0, 10, "its width is not a number of pixels"),
        (-5, 10, "its width is not a number of pixels"),
    ],
)
def test_a_label_record_of_impossible_size_is_named(tmp_path, width, height, problem):
    # width 1e6 x 1e6 passed, then to_mask asked numpy for 931 GiB (twelfth hostile review).
    from florence_helpers.labelling import LabelFileError, read_labels

    record = {
        "image": "a.png", "task": "<REFERRING_EXPRESSION_SEGMENTATION>", "width": width,
        "height": height, "error": None,
        "result": {"polygons": [[[[0, 0], [5, 0], [5, 5]]]], "labels": [""]},
    }  # fmt: skip
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(LabelFileError, match=f"line 1: {problem}"):
        read_labels(path, as_results=True)


@pytest.mark.parametrize("size", [[0, 5], ["64", 48], [64], [True, 2], "ab"])
def test_a_result_read_back_needs_a_size_in_whole_pixels(size):
    from florence_helpers import Result

    with pytest.raises(ValueError, match="image_size must be"):
        Result.from_dict({"task": "<OD>", "image_size": size, "boxes": [], "labels": []})
