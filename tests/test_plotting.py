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
    text = TextResult(Task.REGION_TO_CATEGORY, SIZE, raw="", text="a car", query="(10, 10, 50, 50)")
    plot_result(grey, text, left, region=(10, 10, 50, 50))
    assert left.get_title().replace("\n", " ") == "REGION_TO_CATEGORY (10, 10, 50, 50): a car"
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


def test_scores_are_shown_next_to_labels(grey):
    fig, ax = plt.subplots()
    result = boxes(((10, 10, 50, 50), "car"))
    result.scores = np.array([0.876])
    plot_result(grey, result, ax)
    assert [t.get_text() for t in ax.texts] == ["car 0.88"]
    plt.close(fig)


def test_plot_region_alone_shows_the_image(grey):
    from florence_helpers import plot_region

    ax = plot_region(grey, (10, 10, 60, 60))
    assert len(ax.images) == 1 and len(ax.patches) == 2
    plt.close(ax.figure)


def test_grid_draws_one_panel_per_result_and_hides_the_rest(grey):
    from florence_helpers import plot_grid

    results = [boxes(((10, 10, 50, 50), "car")), TextResult(Task.CAPTION, SIZE, raw="", text="x")]
    fig = plot_grid([grey] * 4, results * 2, columns=3, titles=["a", "b", "c", "d"])
    axes = fig.axes
    assert len(axes) == 6  # two rows of three
    assert [ax.get_title() for ax in axes[:4]] == ["a", "b", "c", "d"]
    assert [len(ax.images) for ax in axes] == [1, 1, 1, 1, 0, 0]
    plt.close(fig)
    assert len(plot_grid([grey, grey], results, columns=3).axes) == 2  # no empty columns
    with pytest.raises(ValueError, match="2 images for 1 results"):
        plot_grid([grey, grey], results[:1])


def test_annotate_outlines_the_region_and_labels_ocr(grey):
    out = annotate(
        grey,
        TextResult(Task.REGION_TO_CATEGORY, SIZE, raw="", text="car"),
        region=(100, 20, 180, 80),
    )
    assert out.getpixel((140, 80)) == (255, 255, 255)
    quads = np.array([[[10, 40], [90, 40], [90, 70], [10, 70]]], dtype=np.float32)
    ocr = OCRResult(Task.OCR_WITH_REGION, SIZE, raw="", quads=quads, texts=["EXIT"])
    assert annotate(grey, ocr).getpixel((50, 70)) == label_color("EXIT")


@pytest.mark.parametrize("background", [(0, 0, 0), (255, 255, 255)])
def test_label_tags_contrast_with_their_background(background):
    image = Image.new("RGB", SIZE, background)
    out = np.asarray(annotate(image, boxes(((20, 40, 120, 90), "person"))))
    tag = out[20:38, 22:60].reshape(-1, 3)
    colors = {tuple(c) for c in tag}
    assert label_color("person") in colors
    assert len(colors) > 2  # text drawn on the tag


def test_both_drawing_paths_render_the_same_drawables(grey, monkeypatch):
    import florence_helpers.drawing.plotting as plotting

    triangle = np.array([[20, 20], [80, 20], [20, 80]], np.float32)
    mask = PolygonsResult(
        Task.REFERRING_EXPRESSION_SEGMENTATION,
        SIZE,
        raw="",
        polygons=[[triangle, triangle + [100, 0]]],
        labels=["sail"],
    )
    shapes = plotting.drawables(mask)
    assert [(s.is_box, s.filled, s.tag) for s in shapes] == [(False, True, "sail")] + [
        (False, True, None)
    ]
    assert plotting.drawables(TextResult(Task.CAPTION, SIZE, raw="", text="a boat")) == []
    # A new kind of shape added in drawables() appears in both paths, with nothing else to edit.
    custom = [plotting.Drawable([150, 10, 190, 40], True, False, (0, 0, 255), "new")]
    monkeypatch.setattr(plotting, "drawables", lambda result: custom)
    fig, ax = plt.subplots()
    plot_result(grey, mask, ax)
    assert len(ax.patches) == 1 and [t.get_text() for t in ax.texts] == ["new"]
    plt.close(fig)
    assert annotate(grey, mask).getpixel((190, 30)) == (0, 0, 255)


def test_long_titles_are_wrapped_and_capped(grey):
    fig, (left, right) = plt.subplots(1, 2)
    long_answer = TextResult(Task.MORE_DETAILED_CAPTION, SIZE, raw="", text="word " * 400)
    plot_result(grey, long_answer, left)
    lines = left.get_title().split("\n")
    assert len(lines) == 3 and all(len(line) <= 60 for line in lines)
    assert lines[-1].endswith("…")
    plot_result(grey, boxes(((10, 10, 50, 50), "car")), right, title="category: " + "x" * 500)
    assert all(len(line) <= 60 for line in right.get_title().split("\n"))
    fig.canvas.draw()
    assert fig.get_size_inches()[0] < 20  # the figure keeps its size whatever the answer
    plt.close(fig)


def test_a_custom_prompt_result_gets_its_prompt_as_title(grey):
    fig, ax = plt.subplots()
    found = BoxesResult("<FIND>a car", SIZE, raw="", boxes=np.zeros((0, 4)), labels=[])
    plot_result(grey, found, ax)
    assert ax.get_title() == "<FIND>a car: 0 boxes"
    plt.close(fig)


def test_default_titles_say_what_was_asked_and_what_came_back(florence, grey, tmp_path):
    """Task, query and count: "0 boxes" is an answer, not a missing result."""
    from florence_helpers import detect, run, run_tasks
    from florence_helpers.testing import force_answers

    image = tmp_path / "grey.png"
    grey.save(image)
    forced = force_answers(florence.processor, "a flag<loc_10><loc_10><loc_500><loc_500>")
    flag = run(florence, image, "OPEN_VOCABULARY_DETECTION", "a flag", logits_processor=forced)
    nothing = run(
        florence, image, "OD", logits_processor=force_answers(florence.processor, ""), num_beams=1
    )
    (region,) = run_tasks(
        florence,
        image,
        [("REGION_TO_CATEGORY", (10, 10, 50, 50))],
        logits_processor=force_answers(florence.processor, "car<loc_1><loc_1><loc_9><loc_9>"),
    )
    cut = run(florence, image, "CAPTION", max_new_tokens=2, num_beams=1)
    found = detect(florence, image, ["car", "tree"], max_new_tokens=4, num_beams=1)
    titles = []
    for result in (flag, nothing, region, cut, found):
        fig, ax = plt.subplots()
        plot_result(image, result, ax)
        titles.append(ax.get_title().replace("\n", " "))
        plt.close(fig)
    assert titles[0] == 'OPEN_VOCABULARY_DETECTION "a flag": 1 box'
    assert titles[1] == "OD: 0 boxes"
    assert titles[2] == "REGION_TO_CATEGORY (10, 10, 50, 50): car"
    assert titles[3].startswith("CAPTION: ") and titles[3].endswith("(cut off at max_new_tokens)")
    assert titles[4].startswith('OPEN_VOCABULARY_DETECTION "car, tree": ')


@pytest.mark.parametrize("dpi", [72, 150])
def test_a_label_at_the_right_edge_moves_left_to_stay_inside_the_axes(grey, dpi):
    """A long label on a box touching the right edge was cut off there ("floodligh")."""
    from florence_helpers import plot_grid

    long_label = "a floodlight on the lattice tower"
    result = boxes(((185, 40, 200, 90), long_label))
    fig = plot_grid([grey, grey], [result, result], columns=2, size=3.0)  # tight_layout too
    fig.set_dpi(dpi)
    fig.canvas.draw()
    for ax in fig.axes:
        (label,) = ax.texts
        assert label.get_text() == long_label
        frame = ax.get_window_extent()
        for extent in (label.get_window_extent(), label.get_bbox_patch().get_window_extent()):
            assert frame.x0 - 0.01 <= extent.x0 and extent.x1 <= frame.x1 + 0.01, (extent, frame)
            assert frame.y0 - 0.01 <= extent.y0 and extent.y1 <= frame.y1 + 0.01, (extent, frame)
        assert label.get_position() == (185, 40)  # still anchored at the box's corner
    plt.close(fig)


@pytest.mark.parametrize(("epochs", "marker"), [(5, "s"), (600, "None")])
def test_the_loss_plot_marks_epochs_only_while_they_stay_apart(epochs, marker):
    from florence_helpers.training.config import TrainingHistory

    history = TrainingHistory(
        losses=[1.0 / (i + 1) for i in range(2 * epochs)],
        learning_rates=[1e-3] * (2 * epochs),
        epoch_losses=[1.0] * epochs,
        validation_losses=[2.0] * epochs,
    )
    lines = {line.get_label(): line for line in history.plot().get_lines()}
    assert lines["validation, after each epoch"].get_marker() == marker
    assert lines["training, epoch mean"].get_marker() == ("o" if marker == "s" else "None")
    plt.close("all")
