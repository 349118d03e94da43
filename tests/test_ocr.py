import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from florence_helpers import OCRResult, Task, reading_order, to_lines


def ocr(boxes, texts, scores=None):
    quads = np.array(
        [[[x1, y1], [x2, y1], [x2, y2], [x1, y2]] for x1, y1, x2, y2 in boxes], np.float32
    )
    return OCRResult(
        Task.OCR_WITH_REGION, (400, 300), raw="", quads=quads, texts=texts, scores=scores
    )


def test_regions_are_read_top_to_bottom_then_left_to_right():
    result = ocr(
        [(200, 100, 300, 130), (10, 10, 100, 40), (10, 102, 180, 128), (120, 12, 250, 38)],
        ["line2b", "line1a", "line2a", "line1b"],
        scores=np.array([0.4, 0.1, 0.3, 0.2]),
    )
    ordered = reading_order(result)
    assert ordered.texts == ["line1a", "line1b", "line2a", "line2b"]
    assert ordered.scores.tolist() == [0.1, 0.2, 0.3, 0.4]
    assert ordered.quads[0, 0].tolist() == [10, 10]
    assert result.texts[0] == "line2b"  # the input is not reordered in place
    assert to_lines(result) == ["line1a line1b", "line2a line2b"]


def test_tall_and_short_regions_on_one_line():
    result = ocr([(0, 0, 50, 60), (60, 20, 100, 40), (0, 80, 50, 100)], ["BIG", "small", "next"])
    assert to_lines(result, separator=" | ") == ["BIG | small", "next"]


def test_empty_result():
    empty = OCRResult(Task.OCR_WITH_REGION, (10, 10), raw="")
    assert to_lines(empty) == []
    assert len(reading_order(empty)) == 0


def _lines_one_pair_at_a_time(tops, bottoms):
    """The line grouping as defined: each region, by centre, joins the first line it
    overlaps by half the shorter height (the loop that was quadratic in Python)."""
    lines, spans = [], []
    for index in np.argsort((tops + bottoms) / 2, kind="stable"):
        top, bottom = tops[index], bottoms[index]
        for k, (line_top, line_bottom) in enumerate(spans):
            overlap = min(bottom, line_bottom) - max(top, line_top)
            if overlap >= 0.5 * max(min(bottom - top, line_bottom - line_top), 1e-6):
                lines[k].append(int(index))
                spans[k] = (min(top, line_top), max(bottom, line_bottom))
                break
        else:
            lines.append([int(index)])
            spans.append((top, bottom))
    return sorted(sorted(line) for line in lines)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 15)), min_size=1, max_size=40))
def test_lines_are_grouped_as_defined(spans):
    quads = np.array(
        [[[0, t], [10, t], [10, t + h], [0, t + h]] for t, h in spans], dtype=np.float32
    )
    result = OCRResult("OCR_WITH_REGION", (100, 100), raw="", quads=quads, texts=["w"] * len(spans))
    from florence_helpers.language.ocr import _line_groups

    ours = sorted(sorted(line) for line in _line_groups(result))
    assert ours == _lines_one_pair_at_a_time(quads[:, :, 1].min(axis=1), quads[:, :, 1].max(axis=1))
