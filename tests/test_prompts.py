import pytest

from florence_helpers import RegionError, TaskInputError, build_prompt

SIZE = (640, 480)


def test_no_input_task_is_its_token():
    assert build_prompt("OD", SIZE) == "<OD>"
    assert build_prompt("caption", SIZE, text="   ") == "<CAPTION>"


def test_text_given_to_a_no_input_task_is_an_error():
    with pytest.raises(TaskInputError, match=r"<OD> takes only the image, but got text 'a cat'"):
        build_prompt("OD", SIZE, text="a cat")


def test_region_given_to_a_no_input_task_is_an_error():
    with pytest.raises(TaskInputError, match=r"<CAPTION> takes only the image, but got region"):
        build_prompt("CAPTION", SIZE, region=(0, 0, 10, 10))


@pytest.mark.parametrize(
    "task",
    [
        "CAPTION_TO_PHRASE_GROUNDING",
        "OPEN_VOCABULARY_DETECTION",
        "REFERRING_EXPRESSION_SEGMENTATION",
    ],
)
def test_text_task_without_text_is_an_error(task):
    with pytest.raises(TaskInputError, match=rf"<{task}> needs text: pass text="):
        build_prompt(task, SIZE)
    with pytest.raises(TaskInputError, match="needs text"):
        build_prompt(task, SIZE, text="  ")


def test_text_task_prompt():
    assert build_prompt("OPEN_VOCABULARY_DETECTION", SIZE, text=" a red car ") == (
        "<OPEN_VOCABULARY_DETECTION>a red car"
    )


def test_task_token_inside_text_is_an_error():
    with pytest.raises(TaskInputError, match="contains the task token <OD>"):
        build_prompt("CAPTION_TO_PHRASE_GROUNDING", SIZE, text="<OD> a car")


def test_region_task_without_region_is_an_error():
    with pytest.raises(TaskInputError, match=r"<REGION_TO_CATEGORY> needs a region: pass region="):
        build_prompt("REGION_TO_CATEGORY", SIZE)
    with pytest.raises(TaskInputError, match=r"not text 'the dog'"):
        build_prompt("REGION_TO_CATEGORY", SIZE, text="the dog")


def test_region_outside_the_image_is_an_error_before_anything_runs():
    with pytest.raises(RegionError, match="outside the 640x480 image"):
        build_prompt("REGION_TO_SEGMENTATION", SIZE, region=(100, 100, 700, 200))


def test_region_prompt_uses_the_processor_quantization():
    assert build_prompt("REGION_TO_DESCRIPTION", SIZE, region=(10, 20, 300, 400)) == (
        "<REGION_TO_DESCRIPTION><loc_15><loc_41><loc_468><loc_833>"
    )


def test_region_tokens_may_be_given_as_text():
    tokens = "<loc_1><loc_2><loc_3><loc_4>"
    assert build_prompt("REGION_TO_OCR", SIZE, text=tokens) == "<REGION_TO_OCR>" + tokens


def test_every_prompt_is_accepted_by_the_native_processor(processor):
    prompts = [
        build_prompt("OD", SIZE),
        build_prompt("CAPTION_TO_PHRASE_GROUNDING", SIZE, text="a car and a dog"),
        build_prompt("REGION_TO_CATEGORY", SIZE, region=(0, 0, 640, 480)),
    ]
    constructed = processor._construct_prompts(prompts)
    assert constructed[0] == "Locate the objects with category name in the image."
    assert constructed[1] == "Locate the phrases in the caption: a car and a dog"
    assert constructed[2] == "What is the region <loc_0><loc_0><loc_999><loc_999>?"
