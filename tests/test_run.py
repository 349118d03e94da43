"""End to end through the real generate(): image -> prompt -> generate -> parse -> pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from florence_helpers import (
    BoxesResult,
    ImageLoadError,
    OCRResult,
    PolygonsResult,
    RegionError,
    TaskInputError,
    TextResult,
    UnknownTaskError,
    run,
)
from florence_helpers.testing import TINY_ANSWER_LENGTH, answer_token_ids, force_answers


def loc(*bins: int) -> str:
    return "".join(f"<loc_{b}>" for b in bins)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_detection_end_to_end(florence, photo, num_beams):
    answer = f"car{loc(52, 333, 932, 774)}door{loc(0, 0, 999, 999)}"
    result = run(
        florence,
        photo,
        "OD",
        num_beams=num_beams,
        logits_processor=force_answers(florence.processor, answer),
    )
    assert isinstance(result, BoxesResult)
    assert result.labels == ["car", "door"]
    # 400x300 image: (52 + 0.5) * 0.4 = 21, (333 + 0.5) * 0.3 = 100.05, ...
    assert result.boxes.tolist() == [[21, 100, 373, 232], [0, 0, 399, 299]]
    assert result.image_size == (400, 300)
    assert result.raw == f"</s><s>{answer}</s>"
    assert not result.truncated


def test_each_image_of_a_batch_keeps_its_own_answer_and_size(florence):
    images = [Image.new("RGB", (400, 300), "red"), Image.new("RGB", (1000, 100), "blue")]
    answers = [f"a dog{loc(0, 0, 500, 500)}", f"a much longer phrase here{loc(100, 0, 200, 999)}"]
    results = run(
        florence,
        images,
        "CAPTION_TO_PHRASE_GROUNDING",
        text=["a dog", "a much longer phrase here and more words for padding"],
        logits_processor=force_answers(florence.processor, answers),
    )
    assert [r.labels for r in results] == [["a dog"], ["a much longer phrase here"]]
    assert results[0].boxes.tolist() == [[0, 0, 200, 150]]
    assert results[1].boxes.tolist() == [[100, 0, 200, 99]]


def test_batches_split_and_keep_order(florence):
    images = [Image.new("RGB", (100 + i, 100), "white") for i in range(5)]
    answers = [f"cap {i}" for i in range(5)]
    results = []
    for start in range(0, 5, 2):  # one forced answer list per generate() call
        chunk = images[start : start + 2]
        results += run(
            florence,
            chunk,
            "CAPTION",
            batch_size=2,
            logits_processor=force_answers(florence.processor, answers[start : start + 2]),
        )
    assert [r.text for r in results] == answers
    assert [r.image_size[0] for r in results] == [100, 101, 102, 103, 104]


def test_list_input_returns_a_list_and_single_input_returns_one(florence, photo):
    forced = force_answers(florence.processor, "A photo.")
    assert isinstance(run(florence, photo, "CAPTION", logits_processor=forced), TextResult)
    forced = force_answers(florence.processor, ["A photo."])
    assert isinstance(run(florence, [photo], "CAPTION", logits_processor=forced), list)
    assert run(florence, [], "CAPTION") == []


def test_truncated_answer_yields_what_parsed(florence, photo):
    answer = f"car{loc(52, 333, 932, 774)}dog{loc(1, 2, 3, 4)}"
    ids = answer_token_ids(florence.processor, answer)
    # Stop two tokens into the dog's box: <s> car(+) 4 locs, dog(+), 2 locs.
    cut = ids.index(florence.processor.tokenizer.convert_tokens_to_ids("<loc_2>"))
    result = run(
        florence,
        photo,
        "OD",
        max_new_tokens=cut,
        logits_processor=force_answers(florence.processor, answer),
    )
    assert result.truncated
    assert result.labels == ["car"]
    assert result.raw.endswith(loc(1))


def test_region_task_sends_the_quantized_region(florence, photo, monkeypatch):
    seen = {}
    original = florence.processor.__class__.__call__

    def spy(self, *args, **kwargs):
        seen["text"] = kwargs["text"]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(florence.processor.__class__, "__call__", spy)
    result = run(
        florence,
        photo,
        "REGION_TO_CATEGORY",
        region=(41, 31, 201, 151),
        logits_processor=force_answers(florence.processor, f"car{loc(100, 100, 500, 500)}"),
    )
    # 400x300 image: 41 / 0.4 = 102.5, 31 / 0.3 = 103.3, 201 / 0.4 = 502.5, 151 / 0.3 = 503.3
    assert seen["text"] == ["<REGION_TO_CATEGORY>" + loc(102, 103, 502, 503)]
    assert result.text == "car"


def test_polygons_and_ocr_end_to_end(florence, photo):
    polygon = run(
        florence,
        photo,
        "REFERRING_EXPRESSION_SEGMENTATION",
        text="the car",
        logits_processor=force_answers(florence.processor, loc(0, 0, 500, 0, 500, 500)),
    )
    assert isinstance(polygon, PolygonsResult)
    assert polygon.polygons[0][0].tolist() == [[0, 0], [200, 0], [200, 150]]
    ocr = run(
        florence,
        photo,
        "OCR_WITH_REGION",
        logits_processor=force_answers(
            florence.processor, f"EXIT{loc(0, 0, 10, 0, 10, 10, 0, 10)}"
        ),
    )
    assert isinstance(ocr, OCRResult)
    assert ocr.texts == ["EXIT"]
    assert ocr.quads[0].tolist() == [[0, 0], [4, 0], [4, 3], [0, 3]]


@pytest.fixture
def no_generate(florence, monkeypatch):
    """Fail the test if the model runs: bad input must be caught before generation."""

    def fail(*args, **kwargs):
        raise AssertionError("generate() ran although the input was bad")

    monkeypatch.setattr(florence.model, "generate", fail)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"task": "ODD"}, UnknownTaskError, "Did you mean OD"),
        ({"task": "OD", "text": "cat"}, TaskInputError, "takes only the image"),
        ({"task": "OPEN_VOCABULARY_DETECTION"}, TaskInputError, "needs text"),
        ({"task": "REGION_TO_OCR"}, TaskInputError, "needs a region"),
        ({"task": "REGION_TO_OCR", "region": (0, 0, 401, 10)}, RegionError, "outside the 400x300"),
        (
            {"task": "OPEN_VOCABULARY_DETECTION", "text": ["a", "b", "c"]},
            TaskInputError,
            "3 values for `text` but 2 images",
        ),
    ],
)
def test_bad_input_fails_before_generation(florence, photo, no_generate, kwargs, error, message):
    with pytest.raises(error, match=message):
        run(florence, [photo, photo], **kwargs)


def test_unreadable_image_in_a_list_fails_before_generation(florence, photo, no_generate, tmp_path):
    with pytest.raises(ImageLoadError, match="missing.png"):
        run(florence, [photo, tmp_path / "missing.png"], "CAPTION")


def test_per_image_regions(florence, no_generate):
    small, large = Image.new("RGB", (50, 50)), Image.new("RGB", (500, 500))
    with pytest.raises(RegionError, match="outside the 50x50 image"):
        run(florence, [large, small], "REGION_TO_CATEGORY", region=(0, 0, 100, 100))


def test_numpy_region_is_accepted(florence, photo):
    result = run(
        florence,
        photo,
        "REGION_TO_DESCRIPTION",
        region=np.array([1.0, 2.0, 30.0, 40.0]),
        logits_processor=force_answers(florence.processor, "a patch"),
    )
    assert result.text == "a patch"


def test_unforced_generation_runs_and_parses(florence, photo):
    """The tiny model's own answer is noise; only its shape is checked."""
    result = run(florence, photo, "OD", num_beams=1, max_new_tokens=20)
    assert isinstance(result, BoxesResult)
    assert result.boxes.shape[1] == 4
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_tiny_noise_ends_early_but_forced_answers_run_in_full(florence, photo, num_beams):
    noise = run(florence, photo, "CAPTION", num_beams=num_beams)
    written = len(florence.processor.tokenizer(noise.raw, add_special_tokens=False)["input_ids"])
    assert not noise.truncated
    assert written < TINY_ANSWER_LENGTH + 40  # not the 1024 tokens of max_new_tokens

    # Thirty boxes: 151 tokens, well past the length where the tiny model's noise ends.
    answer = "".join(f"car{loc(i, i, i + 10, i + 10)}" for i in range(30))
    result = run(
        florence,
        photo,
        "OD",
        num_beams=num_beams,
        logits_processor=force_answers(florence.processor, answer),
    )
    assert not result.truncated
    assert len(result.labels) == 30


def test_beams_read_shared_cross_attention_keys_once_with_the_same_result(
    florence, photo, monkeypatch
):
    import florence_helpers.model.decoding as decoding

    grouped_calls = []
    real = decoding._shared_kv_attention

    def spy(module, query, *args, **kwargs):
        if getattr(module, "_florence_cross_attention", False) and query.shape[2] == 1:
            grouped_calls.append(query.shape[0])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(decoding, "_shared_kv_attention", spy)
    # Two prompts of different lengths, so the cross-attention mask has padding in it.
    inputs = florence.processor(
        text=["<OD>", "<OPEN_VOCABULARY_DETECTION>a red car on the left"],
        images=[photo, photo],
        return_tensors="pt",
        padding="longest",
    )
    settings = dict(
        num_beams=3,
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    model = florence.model
    with torch.inference_mode():
        plain = model.generate(**inputs, **settings)
        with decoding.sharing_cross_attention(model, 3):
            shared = model.generate(**inputs, **settings)
    assert grouped_calls and set(grouped_calls) == {6}  # 2 items x 3 beams, grouped per item
    assert torch.equal(plain.sequences, shared.sequences)
    for a, b in zip(plain.logits, shared.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_fast_beams_can_be_switched_off_with_the_same_answers(florence, photo, monkeypatch):
    import florence_helpers.model.decoding as decoding

    fast = run(florence, photo, "OD", num_beams=3, max_new_tokens=30, scores=True)
    monkeypatch.setattr(decoding, "beam_cache", lambda: pytest.fail("fast path used"))
    monkeypatch.setattr(decoding, "sharing_cross_attention", lambda *a: pytest.fail("used"))
    plain = run(
        florence, photo, "OD", num_beams=3, max_new_tokens=30, scores=True, fast_beams=False
    )
    assert plain.raw == fast.raw
    np.testing.assert_allclose(plain.scores, fast.scores, atol=1e-5)


def test_a_long_list_holds_a_bounded_number_of_images_with_the_same_answers(
    florence, tmp_path, monkeypatch
):
    # Every image of a list stayed decoded: 40 copies of a 12-megapixel photo held 2.3 GB
    # before the first token (twelfth hostile review).
    import florence_helpers.model.held_images as held

    paths = []
    for index in range(5):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (100 + index, 80), (index * 40, 0, 0)).save(path)
        paths.append(path)
    answers = [f"a dog{loc(0, 0, 500, 500)}"] * 5
    forced = {"logits_processor": force_answers(florence.processor, answers), "batch_size": 5}
    expected = run(florence, paths, "OD", **forced)
    monkeypatch.setattr(held, "HELD_PIXELS", 100 * 80)  # room for one image
    loaded = held.load_images([*paths, Image.new("RGB", (9, 9))])
    assert not isinstance(loaded[0], held.ReadAgain)
    assert [type(item) for item in loaded[1:5]] == [held.ReadAgain] * 4
    assert not isinstance(loaded[5], held.ReadAgain)  # in memory already: held as given
    assert [item.size for item in loaded[:5]] == [(100 + i, 80) for i in range(5)]
    again = run(florence, paths, "OD", **forced)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in expected]
