"""tiled_ocr(): every word of a large page once, in page pixels, through the real generate().

The tiny model reads nothing, so each tile's answer is forced: what Florence-2 would write for
that crop, in its OCR_WITH_REGION grammar (text, then the quad's eight location tokens). A word
cut by the tile's border is written as the fragment the crop shows.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from florence_helpers import OCRResult, TaskInputError, TextResult, run, tiled_ocr, to_lines
from florence_helpers.language.regions import quantize
from florence_helpers.model.tiling import merge_tiles, page_tiles, tile_side
from florence_helpers.testing import force_answers

PAGE = (640, 400)  # the tiny model's input is 128 pixels: tiles of 192 by default
WORDS = ["alpha", "bravo", "delta", "gamma", "kilo", "lima", "mike", "oscar", "papa", "romeo"]


def page_words() -> list[tuple[str, tuple[int, int, int, int]]]:
    """Words on a grid of lines; the spacing puts several of them across tile borders."""
    words, index = [], 0
    for top in range(20, PAGE[1] - 30, 37):
        for left in range(12, PAGE[0] - 45, 53):
            name = f"{WORDS[index % len(WORDS)]}{index}"
            words.append((name, (left, top, left + 40, top + 12)))
            index += 1
    return words


def tile_answer(tile, words) -> tuple[str, int]:
    """The answer for one crop, and how many cut fragments it holds."""
    x1, y1, x2, y2 = tile
    size = (x2 - x1, y2 - y1)
    parts, fragments = [], 0
    for name, (left, top, right, bottom) in words:
        visible = (max(left, x1), max(top, y1), min(right, x2), min(bottom, y2))
        if visible[2] - visible[0] < 4 or visible[3] - visible[1] < 6:
            continue  # nothing readable of it in this crop
        text = name
        if visible != (left, top, right, bottom):  # cut by the border: a fragment
            share = (visible[2] - visible[0]) / (right - left)
            text = name[: max(1, int(len(name) * share))]
            fragments += 1
        a, b, c, d = (v - o for v, o in zip(visible, (x1, y1, x1, y1), strict=True))
        corners = quantize([[a, b], [c, b], [c, d], [a, d]], size)
        parts.append(text + "".join(f"<loc_{v}>" for v in corners.ravel()))
    return "".join(parts), fragments


@pytest.fixture
def page() -> Image.Image:
    return Image.fromarray(np.full((PAGE[1], PAGE[0], 3), 255, dtype=np.uint8))


def forced_tiles(florence, side: int, overlap: int):
    words = page_words()
    tiles = page_tiles(PAGE, side, overlap)
    answers = [tile_answer(tile, words) for tile in tiles]
    forced = force_answers(florence.processor, [text for text, _ in answers])
    return words, tiles, forced, sum(cut for _, cut in answers)


def test_every_word_comes_back_once_in_page_pixels(florence, page):
    words, tiles, forced, fragments = forced_tiles(florence, 192, 48)
    assert len(tiles) == 15 and fragments > 10  # the layout does cut words
    result = tiled_ocr(florence, page, batch_size=len(tiles), num_beams=1, logits_processor=forced)
    assert isinstance(result, OCRResult)
    assert sorted(result.texts) == sorted(name for name, _ in words)
    expected = dict(words)
    for text, quad in zip(result.texts, result.quads, strict=True):
        box = [*quad.min(axis=0), *quad.max(axis=0)]
        # Location bins of a 192-pixel tile are 0.19 pixels wide; the bin centre is truncated.
        np.testing.assert_allclose(box, expected[text], atol=1.0)
    # Reading order: lines top to bottom, words left to right.
    assert result.texts == [name for name, _ in sorted(words, key=lambda w: (w[1][1], w[1][0]))]


def test_plain_ocr_gives_the_page_text_line_by_line(florence, page):
    words, tiles, forced, _ = forced_tiles(florence, 192, 48)
    text = tiled_ocr(
        florence, page, "OCR", batch_size=len(tiles), num_beams=1, logits_processor=forced
    )
    assert isinstance(text, TextResult)
    lines = text.text.split("\n")
    assert len(lines) == len({box[1] for _, box in words})
    assert lines[0].split() == [name for name, box in words if box[1] == 20]


def test_a_page_within_one_tile_gives_the_plain_answer(florence):
    small = Image.new("RGB", (180, 150), "white")
    answer = "hello<loc_10><loc_10><loc_200><loc_10><loc_200><loc_90><loc_10><loc_90>"
    tiled = tiled_ocr(
        florence, small, num_beams=1, logits_processor=force_answers(florence.processor, answer)
    )
    plain = run(
        florence,
        small,
        "OCR_WITH_REGION",
        num_beams=1,
        logits_processor=force_answers(florence.processor, answer),
    )
    assert tiled.texts == plain.texts == ["hello"]
    np.testing.assert_array_equal(tiled.quads, plain.quads)


def test_a_line_across_a_border_is_stitched_once():
    # Two tiles side by side, overlapping on x 100..200; the line runs from x 20 to 290.
    tiles = [(0, 0, 200, 100), (100, 0, 300, 100)]

    def result(text, box, tile):
        x1, y1, x2, y2 = (v - o for v, o in zip(box, (tile[0], 0, tile[0], 0), strict=True))
        quad = np.array([[[x1, y1], [x2, y1], [x2, y2], [x1, y2]]], dtype=np.float32)
        return OCRResult("OCR_WITH_REGION", (200, 100), raw="", quads=quad, texts=[text])

    left = result("the quick brown", (20, 40, 200, 52), tiles[0])
    right = result("brown fox jumps", (100, 40, 290, 52), tiles[1])
    merged = merge_tiles([left, right], tiles, (300, 100))
    assert merged.texts == ["the quick brown fox jumps"]
    assert to_lines(merged) == ["the quick brown fox jumps"]
    np.testing.assert_array_equal(merged.quads[0].min(axis=0), [20, 40])
    np.testing.assert_array_equal(merged.quads[0].max(axis=0), [290, 52])
    # Pieces whose words do not meet are both kept: nothing is dropped on a guess.
    other = result("fax jumps", (100, 40, 290, 52), tiles[1])
    assert merge_tiles([left, other], tiles, (300, 100)).texts == ["the quick brown", "fax jumps"]


def test_tile_arithmetic():
    assert page_tiles((2000, 700), 1000, 250) == [
        (0, 0, 1000, 700),
        (500, 0, 1500, 700),
        (1000, 0, 2000, 700),
    ]
    for side, overlap in ((192, 48), (256, 0), (300, 149)):
        tiles = page_tiles(PAGE, side, overlap)
        covered = np.zeros(PAGE[::-1], dtype=bool)
        for x1, y1, x2, y2 in tiles:
            covered[y1:y2, x1:x2] = True
            assert x2 - x1 == min(side, PAGE[0]) and y2 - y1 == min(side, PAGE[1])
        assert covered.all()
        starts = sorted({x1 for x1, _, _, _ in tiles})
        assert all(b - a <= side - overlap for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size": 100}, "below the model's input size"),
        ({"tile_size": 700}, "larger than the image"),
        ({"tile_size": 200, "overlap": 100}, "under half the tile"),
        ({"task": "OD"}, "use OCR or OCR_WITH_REGION"),
    ],
)
def test_bad_tiling_settings_get_clear_errors(florence, page, kwargs, message):
    with pytest.raises(TaskInputError, match=message):
        tiled_ocr(florence, page, **kwargs)


def test_auto_tile_size_follows_the_model_input(florence):
    assert tile_side(florence, (640, 400), None) == 192  # 1.5 x the tiny model's 128
    assert tile_side(florence, (190, 150), None) is None
    assert tile_side(florence, (640, 400), 256) == 256


@pytest.mark.parametrize(
    "kwargs",
    [
        {"overlap": float("nan")},
        {"overlap": "10"},
        {"overlap": True},
        {"tile_size": float("nan")},
        {"tile_size": float("inf")},
        {"batch_size": 0},
    ],
)
def test_settings_that_are_not_whole_numbers_are_named(florence, page, kwargs):
    # overlap=nan raised "cannot convert float NaN to integer" from int() (hostile review).
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        tiled_ocr(florence, page, **kwargs)


def test_tiles_are_cropped_one_batch_at_a_time(florence, page, monkeypatch):
    # All crops at once held the page's pixels about twice again (1 GB for 89 megapixels).
    import florence_helpers.model.tiling as tiling

    batches = []

    def answer(florence, crops, task, **kwargs):
        batches.append([crop.size for crop in crops])
        return [
            OCRResult("OCR_WITH_REGION", crop.size, raw="", quads=np.zeros((0, 4, 2)), texts=[])
            for crop in crops
        ]

    monkeypatch.setattr(tiling, "run", answer)
    tiled_ocr(florence, page, tile_size=192, overlap=48, batch_size=4)
    assert [len(batch) for batch in batches] == [4, 4, 4, 3]  # 15 tiles


def test_merging_compares_each_region_only_with_its_neighbours(monkeypatch):
    # Every region was compared with every kept one: 12,000 regions (121 tiles of a
    # 90-megapixel page, 100 lines each) took minutes.
    import florence_helpers.model.tiling as tiling

    side, overlap, rows = 400, 100, 30
    page_size = (side * 4, side * 4)
    tiles = page_tiles(page_size, side, overlap)
    results = []
    for x1, y1, _, _ in tiles:
        quads = [
            [[20, top], [300, top], [300, top + 6], [20, top + 6]]
            for top in range(10, 10 + rows * 12, 12)
        ]
        texts = [f"line {x1} {y1} {k}" for k in range(rows)]
        results.append(
            OCRResult("OCR_WITH_REGION", (side, side), raw="", quads=np.array(quads), texts=texts)
        )
    found = [
        region
        for index, (result, tile) in enumerate(zip(results, tiles, strict=True))
        for region in tiling._shifted(result, index, tile, page_size)
    ]
    kept = tiling._without_duplicates(found, cell=side // 8)
    reference: list = []  # the definition, pair by pair
    for region in sorted(found, key=lambda r: (r.cut, -r.area)):
        if not any(tiling._duplicate(region, other) for other in reference):
            reference.append(region)
    assert kept == reference
    assert len(kept) < len(found)  # the overlaps do hold repeated lines


def test_large_regions_are_checked_a_tile_at_a_time(monkeypatch):
    # Regions covering their whole tile touched 81 cells each, and each was compared with
    # every region of every cell: 49 tiles of 113 regions took 10.4 s (twelfth review).
    import florence_helpers.model.tiling as tiling

    tiles = page_tiles((2400, 2400), 400, 100)
    per_tile = 30
    whole = np.array([[20, 20], [380, 20], [380, 380], [20, 380]], np.float32)
    results = [
        OCRResult(
            "OCR_WITH_REGION", (400, 400), raw="", quads=np.stack([whole] * per_tile),
            texts=[f"big {k}" for k in range(per_tile)],
        )
        for _ in tiles
    ]  # fmt: skip
    checks = []
    original = tiling._KeptRegions.repeat
    monkeypatch.setattr(
        tiling._KeptRegions, "repeat", lambda self, r: checks.append(1) or original(self, r)
    )
    merged = merge_tiles(results, tiles, (2400, 2400))
    regions = len(tiles) * per_tile
    assert len(merged) == regions  # a quarter of each other at most: none repeats another
    assert len(checks) <= 8 * regions  # one check per neighbouring tile


def test_a_line_across_three_tiles_is_one_line_whatever_the_order_of_the_tiles():
    tiles = [(0, 0, 200, 100), (100, 0, 300, 100), (200, 0, 400, 100)]

    def piece(text, x1, x2, tile):
        quad = np.array([[[x1, 40], [x2, 40], [x2, 52], [x1, 52]]], dtype=np.float32)
        quad -= np.array([tile[0], 0], dtype=np.float32)
        return OCRResult("OCR_WITH_REGION", (200, 100), raw="", quads=quad, texts=[text])

    pieces = [
        piece("one two three", 20, 200, tiles[0]),
        piece("three four five", 100, 300, tiles[1]),
        piece("five six", 200, 380, tiles[2]),
    ]
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        merged = merge_tiles([pieces[i] for i in order], [tiles[i] for i in order], (400, 100))
        assert merged.texts == ["one two three four five six"]


def test_joining_tries_only_pieces_that_start_inside_the_cut_one(monkeypatch):
    # Every cut piece was tried against every other after each join: 678 regions on a
    # 5000x1000 page took 28.7 s (twelfth hostile review).
    import florence_helpers.model.tiling as tiling

    per_tile, tiles = 40, page_tiles((5000, 1000), 1152, 288)
    results = []
    for index, (x1, y1, x2, y2) in enumerate(tiles):
        quad = np.array([[0, 100], [x2 - x1, 100], [x2 - x1, 140], [0, 140]], np.float32)
        words = [f"a{index}_{k}" for k in range(per_tile)] if index < 3 else ["x"] * per_tile
        results.append(
            OCRResult(
                "OCR_WITH_REGION",
                (x2 - x1, y2 - y1),
                raw="",
                quads=np.stack([quad] * per_tile),
                texts=words,
            )
        )
    tried = []
    original = tiling._continues
    monkeypatch.setattr(tiling, "_continues", lambda a, b: tried.append(1) or original(a, b))
    merged = merge_tiles(results, tiles, (5000, 1000))
    regions = len(tiles) * per_tile
    assert len(merged) < regions  # the "x" pieces did join
    assert len(tried) < 4 * regions * per_tile  # each piece tries the next tile's pieces
