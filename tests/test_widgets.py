"""The explorer's states, driven as the browser would: widget values, drawn boxes, clicks."""

import html
import json
import re

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from florence_helpers import BoxesResult, Task, TextResult  # noqa: E402
from florence_helpers.drawing.summaries import summarize
from florence_helpers.testing import force_answers  # noqa: E402
from florence_helpers.widgets import Explorer, explore  # noqa: E402


@pytest.fixture
def images(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (400, 300), "red").save(path)
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a picture")
    return [path, Image.new("RGB", (100, 50), "blue"), broken]


def _drawn(panel, x, y, width, height):
    """What jupyter-bbox-widget writes when a box is dragged on the image."""
    return {"x": x, "y": y, "width": width, "height": height, "label": "region"}


def _corners(panel):
    return [field.value for field in panel.region]


def test_task_picker_shows_full_names_with_descriptions(florence, images):
    panel = explore(florence, images)
    assert isinstance(panel, Explorer)
    labels = [label for label, _ in panel.task.options]
    assert len(labels) == 15
    assert "OPEN_VOCABULARY_DETECTION: boxes for a phrase you give" in labels
    assert [name for name, _ in panel.image.options] == ["red.png", "image 2", "broken.jpg"]


def test_inputs_show_only_for_tasks_that_take_them(florence, images):
    panel = explore(florence, images)
    assert panel.text.layout.display == "none" and panel.region_box.layout.display == "none"
    assert panel.canvas.view_only
    panel.task.value = Task.OPEN_VOCABULARY_DETECTION
    assert panel.text.layout.display is None and panel.region_box.layout.display == "none"
    panel.task.value = Task.REGION_TO_CATEGORY
    assert panel.text.layout.display == "none" and panel.region_box.layout.display is None
    assert not panel.canvas.view_only


def test_the_chosen_image_is_shown_at_once(florence, images):
    panel = explore(florence, images)
    first = panel.canvas.image_bytes
    assert first.startswith(b"\x89PNG")
    panel.image.value = 1
    assert panel.canvas.image_bytes.startswith(b"\x89PNG") and panel.canvas.image_bytes != first


def test_an_unreadable_image_is_an_error_in_the_panel(florence, images):
    panel = explore(florence, images)
    panel.image.value = 2
    assert "broken.jpg" in panel.message
    assert "florence-explorer-error" in panel.status.value
    assert panel.canvas.image_bytes == b""
    assert panel.run() is None  # and Run says the same instead of raising
    assert "broken.jpg" in panel.message


def test_a_drawn_box_fills_the_corner_fields_and_typed_corners_draw_the_box(florence, images):
    panel = explore(florence, images)
    panel.task.value = Task.REGION_TO_CATEGORY
    assert panel.canvas.bboxes == [] and _corners(panel) == [0, 0, 0, 0]
    panel.canvas.bboxes = [_drawn(panel, 10.4, 20, 100, 50)]
    assert _corners(panel) == [10, 20, 110, 70]
    panel.region[2].value = 200
    assert panel.canvas.bboxes == [_drawn(panel, 10, 20, 190, 50)]


def test_only_the_newest_box_is_kept_and_clipped_to_the_image(florence, images):
    panel = explore(florence, images)
    panel.task.value = Task.REGION_TO_CATEGORY
    panel.canvas.bboxes = [_drawn(panel, 10, 10, 20, 20), _drawn(panel, 350, 250, 100, 100)]
    assert _corners(panel) == [350, 250, 400, 300]
    assert panel.canvas.bboxes == [_drawn(panel, 350, 250, 50, 50)]


def test_a_box_without_size_while_the_mouse_is_down_is_left_on_the_image(florence, images):
    panel = explore(florence, images)
    panel.task.value = Task.REGION_TO_CATEGORY
    pressed = [_drawn(panel, 40, 30, 0, 0)]
    panel.canvas.bboxes = pressed
    assert panel.canvas.bboxes == pressed
    assert _corners(panel) == [40, 30, 40, 30]


@pytest.mark.parametrize(
    "bad",
    [
        {"x": float("nan"), "y": 1, "width": 5, "height": 5},
        {"x": 1, "y": 1, "width": float("inf"), "height": 5},
        {"x": "left", "y": 1, "width": 5, "height": 5},
        {"x": 1, "y": 1},
        None,
    ],
)
def test_a_box_that_is_not_four_finite_numbers_leaves_the_fields_as_they_were(
    florence, images, bad
):
    panel = explore(florence, images)
    panel.task.value = Task.REGION_TO_CATEGORY
    panel.canvas.bboxes = [_drawn(panel, 10, 20, 100, 50)]
    panel.canvas.bboxes = [bad]  # round(nan) raised ValueError inside the observer
    assert _corners(panel) == [10, 20, 110, 70]


def test_changing_the_image_clears_the_region(florence, images):
    panel = explore(florence, images)
    panel.task.value = Task.REGION_TO_CATEGORY
    panel.canvas.bboxes = [_drawn(panel, 10, 10, 20, 20)]
    panel.image.value = 1
    assert _corners(panel) == [0, 0, 0, 0] and panel.canvas.bboxes == []


def test_run_uses_the_region_and_outlines_it_on_the_result(florence, images):
    panel = explore(florence, images, logits_processor=force_answers(florence.processor, "paint"))
    panel.task.value = Task.REGION_TO_CATEGORY
    panel.canvas.bboxes = [_drawn(panel, 10, 10, 190, 90)]
    assert isinstance(panel.run(), TextResult)
    assert panel.result.text == "paint"
    assert bytes(panel.drawing.value).startswith(b"\x89PNG")
    assert panel.drawing.layout.display is None
    assert panel.summary.value == "<b>Text:</b> paint"
    assert "florence-explorer-done" in panel.status.value


class _Watch(LogitsProcessor):
    """Records the panel's state at every decoding step, and clicks Run again mid-run."""

    def __init__(self, panel_ref):
        self.panel_ref = panel_ref
        self.seen = []

    def __call__(self, input_ids, scores):
        panel = self.panel_ref[0]
        self.seen.append((panel.busy, panel.button.disabled, panel.status.value))
        panel.button.click()  # ignored: a run is in progress
        return scores


def test_a_run_shows_the_busy_state_and_ignores_more_clicks(florence, images):
    ref = []
    watch = _Watch(ref)
    forced = force_answers(florence.processor, "a red square<loc_0><loc_0><loc_999><loc_999>")
    panel = explore(florence, images, logits_processor=LogitsProcessorList([watch, *forced]))
    ref.append(panel)
    panel.task.value = Task.OPEN_VOCABULARY_DETECTION
    panel.text.value = "a red square"
    panel.button.click()
    assert watch.seen and all(busy and disabled for busy, disabled, _ in watch.seen)
    assert "Running OPEN_VOCABULARY_DETECTION on red.png" in watch.seen[0][2]
    assert "florence-explorer-busy" in watch.seen[0][2]
    # One run: the clicks made during it started nothing (each step was seen once).
    assert len(watch.seen) == len(
        florence.processor.tokenizer("a red square" + "<loc_0>" * 2 + "<loc_999>" * 2)["input_ids"]
    )
    assert not panel.busy and not panel.button.disabled
    assert isinstance(panel.result, BoxesResult)
    assert panel.result.boxes.tolist() == [[0, 0, 399, 299]]
    assert re.search(r"OPEN_VOCABULARY_DETECTION took \d+\.\d s", panel.status.value)


def test_changing_an_input_clears_the_result(florence, images):
    panel = explore(florence, images, logits_processor=force_answers(florence.processor, "a"))
    for change in [
        lambda: setattr(panel.task, "value", Task.OD),
        lambda: setattr(panel.image, "value", 1),
        lambda: setattr(panel.text, "value", "other words"),
    ]:
        panel.task.value = Task.CAPTION
        panel.image.value = 0
        assert panel.run() is not None
        change()
        assert panel.result is None
        assert panel.drawing.layout.display == "none" and panel.summary.value == ""
        assert "Inputs changed" in panel.status.value


def test_missing_text_is_a_styled_error_worded_for_the_panel(florence, images):
    panel = explore(florence, images)
    panel.task.value = Task.OPEN_VOCABULARY_DETECTION
    panel.text.value = "   "
    assert panel.run() is None
    assert panel.message == "Type what to look for in the Text box, e.g. 'a red car'."
    assert 'class="florence-explorer-error"' in panel.status.value


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((0, 0, 0, 0), "Draw the region on the image"),
        ((10, 10, 5000, 50), "outside the 400x300 image"),
    ],
)
def test_a_missing_or_outside_region_is_an_error(florence, images, box, message):
    panel = explore(florence, images)
    panel.task.value = Task.REGION_TO_CATEGORY
    for field, value in zip(panel.region, box, strict=True):
        field.value = value
    assert panel.run() is None
    assert message in panel.message
    assert "florence-explorer-error" in panel.status.value


def test_enter_in_the_text_box_runs(florence, images):
    answer = "cat<loc_0><loc_0><loc_999><loc_999>"
    panel = explore(florence, images, logits_processor=force_answers(florence.processor, answer))
    panel.task.value = Task.OPEN_VOCABULARY_DETECTION
    panel.text.value = "cat"
    panel.text._handle_custom_msg({"event": "submit"}, [])  # what the browser sends on Enter
    assert isinstance(panel.result, BoxesResult) and panel.result.labels == ["cat"]


def test_the_json_is_complete_and_folded_away(florence, images):
    answer = "".join(
        f"word {i}<loc_{i}><loc_0><loc_{i + 2}><loc_0><loc_{i + 2}><loc_5><loc_{i}><loc_5>"
        for i in range(0, 240, 4)
    )
    panel = explore(florence, images, logits_processor=force_answers(florence.processor, answer))
    panel.task.value = Task.OCR_WITH_REGION
    result = panel.run()
    assert len(result) == 60 and not result.truncated
    assert panel.details.selected_index is None  # folded
    shown = re.search(r"<pre[^>]*>(.*)</pre>", panel.raw_json.value, re.S).group(1)
    assert json.loads(html.unescape(shown)) == json.loads(json.dumps(result.to_dict()))
    assert len(shown) > 2000
    assert "60 lines of text" in panel.summary.value


def test_summaries_count_labels_with_their_scores():
    import numpy as np

    boxes = BoxesResult(
        "OD",
        (10, 10),
        raw="",
        boxes=np.zeros((3, 4), dtype=np.float32),
        labels=["dog", "cat", "dog"],
        scores=np.array([0.9, 0.5, 0.4]),
    )
    assert summarize(boxes) == "<b>3 boxes:</b> dog ×2 (0.90, 0.40), cat (0.50)"
    empty = BoxesResult("OD", (10, 10), raw="", truncated=True)
    assert summarize(empty).startswith("<b>No boxes.</b>")
    assert "cut at max_new_tokens" in summarize(empty)
    assert summarize(TextResult("CAPTION", (1, 1), raw="", text="<b>")) == "<b>Text:</b> &lt;b&gt;"


def test_needs_images(florence):
    with pytest.raises(ValueError, match="at least one image"):
        explore(florence, [])
