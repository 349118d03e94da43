import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from florence_helpers import BoxesResult, TextResult  # noqa: E402
from florence_helpers.testing import force_answers  # noqa: E402
from florence_helpers.widgets import Explorer, explore  # noqa: E402


@pytest.fixture
def images(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (400, 300), "red").save(path)
    return [path, Image.new("RGB", (100, 50), "blue")]


def test_inputs_show_only_for_tasks_that_take_them(florence, images):
    panel = explore(florence, images)
    assert isinstance(panel, Explorer)
    assert [name for name, _ in panel.image.options] == ["red.png", "image 2"]
    assert panel.text.layout.display == "none" and panel.region_box.layout.display == "none"
    panel.task.value = panel.task.options[9][1]  # OPEN_VOCABULARY_DETECTION
    assert panel.text.layout.display is None and panel.region_box.layout.display == "none"
    panel.task.value = panel.task.options[12][1]  # REGION_TO_CATEGORY
    assert panel.text.layout.display == "none" and panel.region_box.layout.display is None


def test_region_starts_as_the_whole_image(florence, images):
    panel = explore(florence, images)
    assert [w.value for w in panel.region] == [0, 0, 400, 300]
    panel.image.value = 1
    assert [w.value for w in panel.region] == [0, 0, 100, 50]


def test_run_button_runs_the_task_with_the_inputs(florence, images):
    forced = force_answers(florence.processor, "a red square<loc_0><loc_0><loc_999><loc_999>")
    panel = explore(florence, images, logits_processor=forced)
    panel.task.value = panel.task.options[9][1]
    panel.text.value = "a red square"
    panel.button.click()
    assert isinstance(panel.result, BoxesResult)
    assert panel.result.labels == ["a red square"]
    assert panel.result.boxes.tolist() == [[0, 0, 399, 299]]


def test_region_task_uses_the_region_fields(florence, images):
    panel = explore(florence, images, logits_processor=force_answers(florence.processor, "paint"))
    panel.task.value = panel.task.options[12][1]
    for widget, value in zip(panel.region, (10, 10, 200, 100), strict=True):
        widget.value = value
    assert isinstance(panel.run(), TextResult)
    assert panel.result.text == "paint"


def test_bad_input_is_reported_in_the_panel(florence, images):
    panel = explore(florence, images)
    panel.task.value = panel.task.options[12][1]
    panel.region[2].value = 5000
    assert panel.run() is None
    assert "outside the 400x300 image" in panel.message


def test_needs_images(florence):
    with pytest.raises(ValueError, match="at least one image"):
        explore(florence, [])
