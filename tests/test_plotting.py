import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from florence_helpers import (  # noqa: E402
    BoxesResult,
    OCRResult,
    PolygonsResult,
    Task,
    TextResult,
    annotate,
    label_color,
    plot_result,
)

SIZE = (200, 100)


def boxes(*items):
    return BoxesResult(
        Task.OD,
        SIZE,
        raw="",
        boxes=np.array([box for box, _ in items], dtype=np.float32).reshape(-1, 4),
        labels=[label for _, label in items],
    )


@pytest.fixture
def grey() -> Image.Image:
    return Image.new("RGB", SIZE, (128, 128, 128))


def test_label_colour_is_stable_and_differs_between_labels():
    assert label_color("car") == label_color("car")
    assert len({label_color(name) for name in ["car", "dog", "cat", "person", "tree"]}) > 1


def test_annotate_draws_the_box_edge_in_the_label_colour(grey):
    before = grey.tobytes()
    out = annotate(grey, boxes(((50, 40, 150, 90), "car")))
    assert grey.tobytes() == before  # the input is untouched
    assert out is not grey and out.size == SIZE
    assert out.getpixel((100, 90)) == label_color("car")  # bottom edge
    assert out.getpixel((150, 70)) == label_color("car")  # right edge
    assert out.getpixel((100, 70)) == (128, 128, 128)  # inside
    assert out.getpixel((5, 95)) == (128, 128, 128)  # far away


def test_box_on_the_image_border_stays_visible(grey):
    out = annotate(grey, boxes(((0, 0, 200, 100), "")))
    assert out.getpixel((199, 50)) == label_color("")
    assert out.getpixel((100, 99)) == label_color("")


def test_annotate_fills_polygons(grey):
    result = PolygonsResult(
        Task.REFERRING_EXPRESSION_SEGMENTATION,
        SIZE,
        raw="",
        polygons=[[np.array([[20, 20], [80, 20], [80, 80], [20, 80]], dtype=np.float32)]],
        labels=[""],
    )
    out = np.asarray(annotate(grey, result)).astype(int)
    assert (out[50, 50] != 128).any()  # tinted inside
    assert (out[50, 150] == 128).all()  # untouched outside


def test_plot_result_draws_on_the_given_axes(grey):
    fig, ax = plt.subplots()
    returned = plot_result(grey, boxes(((10, 10, 50, 50), "car"), ((60, 10, 90, 50), "dog")), ax)
    assert returned is ax
    assert len(ax.patches) == 2
    assert [t.get_text() for t in ax.texts] == ["car", "dog"]
    plt.close(fig)


def test_plot_result_for_text_ocr_and_region(grey):
    fig, (left, right) = plt.subplots(1, 2)
    text = TextResult(Task.REGION_TO_CATEGORY, SIZE, raw="", text="a car")
    plot_result(grey, text, left, region=(10, 10, 50, 50))
    assert left.get_title() == "a car"
    assert len(left.patches) == 2  # the region, drawn twice (light and dark dashes)
    ocr = OCRResult(
        Task.OCR_WITH_REGION,
        SIZE,
        raw="",
        quads=np.array([[[10, 10], [90, 10], [90, 30], [10, 30]]], dtype=np.float32),
        texts=["HELLO"],
    )
    plot_result(grey, ocr, right)
    assert [t.get_text() for t in right.texts] == ["HELLO"]
    plt.close(fig)
