"""Decoding shared between threads, and the model's attention setting left as it was."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from florence_helpers import run
from florence_helpers.model.inference import run_tasks
from florence_helpers.testing import force_answers

ANSWERS = [
    "cat<loc_100><loc_200><loc_300><loc_400>dog<loc_500><loc_500><loc_900><loc_990>",
    "car<loc_0><loc_0><loc_999><loc_999>",
    "a red square next to a blue circle",
]


def _pictures() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 255, (120 + 40 * i, 160, 3), dtype=np.uint8))
        for i in range(3)
    ]


def _calls(florence):
    """Nine different calls: greedy and 3 beams, forced and free answers, with scores."""
    pictures = _pictures()
    forced = force_answers(florence.processor, ANSWERS[:2])
    calls = []
    for beams in (1, 3):
        calls += [
            lambda b=beams: run(
                florence, pictures[:2], "OD", num_beams=b, scores=True, logits_processor=forced
            ),
            lambda b=beams: run(florence, pictures[2], "CAPTION", num_beams=b, max_new_tokens=24),
            lambda b=beams: run_tasks(
                florence,
                pictures[0],
                ["CAPTION", "OD", ("OPEN_VOCABULARY_DETECTION", "a cat")],
                num_beams=b,
                max_new_tokens=16,
                scores=True,
            ),
        ]
    calls.append(lambda: run(florence, pictures, "REGION_PROPOSAL", num_beams=3, max_new_tokens=20))
    calls += [
        lambda: run(florence, pictures[1], "OCR", num_beams=4, max_new_tokens=16, scores=True),
        lambda: run(florence, pictures[2], "OD", num_beams=2, max_new_tokens=16),
    ]
    return calls


def _summary(result):
    """Everything a caller sees of a result (or a list of them), for exact comparison."""
    if isinstance(result, list):
        return [_summary(r) for r in result]
    scores = getattr(result, "scores", None)
    return (
        type(result).__name__,
        result.raw,
        result.to_dict().get("labels"),
        None if scores is None else np.asarray(scores).round(6).tolist(),
    )


def test_four_threads_on_one_model_get_the_sequential_answers(florence):
    calls = _calls(florence)
    expected = [_summary(call()) for call in calls]
    # Every call four times, interleaved over four threads, twice over.
    jobs = [call for call in calls for _ in range(4)] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda call: _summary(call()), jobs))
    assert answers == [e for e in expected for _ in range(4)] * 2
    assert florence.model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_the_models_attention_implementation_is_left_as_it_was(load_tiny, implementation):
    florence = load_tiny()
    florence.model.set_attn_implementation(implementation)
    picture = _pictures()[0]
    run(florence, picture, "OD", num_beams=3, max_new_tokens=8)
    run_tasks(florence, picture, ["CAPTION", "OD"], num_beams=3, max_new_tokens=8)
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(
            pool.map(lambda b: run(florence, picture, "OD", num_beams=b, max_new_tokens=8), [3] * 6)
        )
    assert florence.model.config.text_config._attn_implementation == implementation


def test_eager_attention_gives_the_same_beams(load_tiny):
    picture = _pictures()[1]
    sdpa = load_tiny()
    eager = load_tiny()
    eager.model.set_attn_implementation("eager")
    a = run(sdpa, picture, "OD", num_beams=3, max_new_tokens=24, scores=True)
    b = run(eager, picture, "OD", num_beams=3, max_new_tokens=24, scores=True)
    assert a.raw == b.raw
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
