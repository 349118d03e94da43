"""Confidence scores: checked against token probabilities computed independently."""

import numpy as np
import pytest
import torch
from PIL import Image

from florence_helpers import run
from florence_helpers.model.scores import decode_with_offsets, filter_by_score, sort_by_score, top_k
from florence_helpers.testing import force_answers


def loc(*bins: int) -> str:
    return "".join(f"<loc_{b}>" for b in bins)


def teacher_forced_logprobs(florence, image, prompt, ids):
    """log p(token | prefix) for every id, from one forward pass of the model."""
    processor, model = florence.processor, florence.model
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    decoder = torch.tensor([[model.generation_config.decoder_start_token_id, *ids[:-1]]])
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=decoder).logits[0]
    return torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)].numpy()


def pieces_to_ids(processor, pieces):
    """Token ids of <s> + pieces + </s>, and the index range of each piece."""
    tokenizer = processor.tokenizer
    ids, ranges = [tokenizer.bos_token_id], []
    for piece in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ranges.append(range(len(ids), len(ids) + len(piece_ids)))
        ids += piece_ids
    return ids + [tokenizer.eos_token_id], ranges


def expected(lp, *ranges):
    return float(np.exp(np.mean([lp[i] for r in ranges for i in r])))


@pytest.fixture
def image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_box_scores_match_independent_token_probabilities(florence, image, num_beams):
    pieces = ["car", loc(1, 2, 300, 400), "door", loc(5, 6, 7, 8), loc(500, 500, 600, 600)]
    ids, (car, car_box, door, door_box1, door_box2) = pieces_to_ids(florence.processor, pieces)
    result = run(
        florence,
        image,
        "OD",
        scores=True,
        num_beams=num_beams,
        logits_processor=force_answers(florence.processor, "".join(pieces)),
    )
    lp = teacher_forced_logprobs(florence, image, "<OD>", ids)
    assert result.labels == ["car", "door", "door"]
    want = [
        expected(lp, car, car_box),
        expected(lp, door, door_box1),
        expected(lp, door, door_box2),
    ]
    np.testing.assert_allclose(result.scores, want, rtol=1e-4)
    assert ((result.scores > 0) & (result.scores <= 1)).all()


def test_region_proposals_score_their_boxes(florence, image):
    pieces = [loc(1, 2, 3, 4), loc(10, 20, 30, 40)]
    ids, (first, second) = pieces_to_ids(florence.processor, pieces)
    result = run(
        florence,
        image,
        "REGION_PROPOSAL",
        scores=True,
        logits_processor=force_answers(florence.processor, "".join(pieces)),
    )
    lp = teacher_forced_logprobs(florence, image, "<REGION_PROPOSAL>", ids)
    np.testing.assert_allclose(
        result.scores, [expected(lp, first), expected(lp, second)], rtol=1e-4
    )


def test_polygon_and_ocr_scores(florence, image):
    pieces = ["<poly>", loc(1, 1, 90, 1, 90, 90), "<sep>", loc(5, 5, 9, 5, 9, 9), "</poly>"]
    ids, ranges = pieces_to_ids(florence.processor, pieces)
    result = run(
        florence,
        image,
        "REFERRING_EXPRESSION_SEGMENTATION",
        text="the thing",
        scores=True,
        logits_processor=force_answers(florence.processor, "".join(pieces)),
    )
    lp = teacher_forced_logprobs(
        florence, image, "<REFERRING_EXPRESSION_SEGMENTATION>the thing", ids
    )
    assert len(result) == 1 and len(result.polygons[0]) == 2
    # The instance's tokens: both coordinate runs and the <sep> between them.
    np.testing.assert_allclose(result.scores, [expected(lp, ranges[1], ranges[2], ranges[3])], 1e-4)

    pieces = ["EXIT", loc(1, 1, 9, 1, 9, 5, 1, 5), "Open 9:00", loc(1, 10, 9, 10, 9, 15, 1, 15)]
    ids, (exit_, exit_box, open_, open_box) = pieces_to_ids(florence.processor, pieces)
    ocr = run(
        florence,
        image,
        "OCR_WITH_REGION",
        scores=True,
        logits_processor=force_answers(florence.processor, "".join(pieces)),
    )
    lp = teacher_forced_logprobs(florence, image, "<OCR_WITH_REGION>", ids)
    assert ocr.texts == ["EXIT", "Open 9:00"]
    np.testing.assert_allclose(
        ocr.scores, [expected(lp, exit_, exit_box), expected(lp, open_, open_box)], rtol=1e-4
    )


@pytest.mark.parametrize(
    ("task", "text", "answer", "count"),
    [
        ("OD", None, f"a{loc(1, 2, 3, 4)}{loc(5, 6, 7, 8)}{loc(9, 9, 9, 9)}b{loc(1, 1, 2, 2)}", 4),
        ("DENSE_REGION_CAPTION", None, f"a red car{loc(1, 2, 3, 4)}a road{loc(5, 6, 7, 8)}", 2),
        # "the image" is a banned grounding phrase: the parser skips it, and so must scoring.
        (
            "CAPTION_TO_PHRASE_GROUNDING",
            "a dog in the image",
            f"a dog{loc(1, 2, 3, 4)}the image{loc(0, 0, 999, 999)}",
            1,
        ),
        ("OPEN_VOCABULARY_DETECTION", "a cat", f"a cat{loc(1, 2, 3, 4)}{loc(5, 6, 7, 8)}", 2),
        ("OPEN_VOCABULARY_DETECTION", "a cat", f"a cat<poly>{loc(1, 2, 30, 4, 9, 40)}</poly>", 1),
        ("REGION_TO_SEGMENTATION", None, loc(1, 2, 30, 4, 9, 40, 7), 1),
    ],
)
def test_one_score_per_instance(florence, image, task, text, answer, count):
    region = (10, 10, 50, 50) if task.startswith("REGION_TO") else None
    result = run(
        florence,
        image,
        task,
        text=text,
        region=region,
        scores=True,
        logits_processor=force_answers(florence.processor, answer),
    )
    assert len(result) == count
    assert result.scores.shape == (count,)
    assert np.isfinite(result.scores).all()


@pytest.mark.parametrize("cut", [3, 5, 7, 9, 10])
def test_truncated_answers_get_one_score_per_parsed_instance(florence, image, cut):
    answer = f"car{loc(1, 2, 3, 4)}dog{loc(5, 6, 7, 8)}"
    result = run(
        florence,
        image,
        "OD",
        scores=True,
        max_new_tokens=cut,
        logits_processor=force_answers(florence.processor, answer),
    )
    assert result.truncated
    assert len(result.scores) == len(result) == (1 if cut >= 7 else 0)


def test_batches_keep_scores_with_their_own_instances(florence, image):
    other = Image.new("RGB", (300, 200), (20, 90, 200))
    answers = [f"car{loc(1, 2, 3, 4)}", f"a{loc(1, 1, 2, 2)}b{loc(3, 3, 4, 4)}c{loc(5, 5, 6, 6)}"]
    together = run(
        florence,
        [image, other],
        "OD",
        scores=True,
        logits_processor=force_answers(florence.processor, answers),
    )
    alone = [
        run(florence, im, "OD", scores=True, logits_processor=force_answers(florence.processor, a))
        for im, a in zip([image, other], answers, strict=True)
    ]
    assert [len(r.scores) for r in together] == [1, 3]
    for batched, single in zip(together, alone, strict=True):
        np.testing.assert_allclose(batched.scores, single.scores, rtol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_text_scores(florence, image, num_beams):
    pieces = ["A", " green", " car", "."]
    ids, ranges = pieces_to_ids(florence.processor, pieces)
    result = run(
        florence,
        image,
        "CAPTION",
        scores=True,
        num_beams=num_beams,
        logits_processor=force_answers(florence.processor, "".join(pieces)),
    )
    lp = teacher_forced_logprobs(florence, image, "<CAPTION>", ids)
    answer = [i for r in ranges for i in r]
    assert result.text == "A green car."
    assert result.logprob == pytest.approx(np.mean(lp[answer]), rel=1e-4)
    assert result.score == pytest.approx(np.exp(np.mean(lp[answer])), rel=1e-4)
    words = dict(result.word_scores)
    assert list(words) == ["A", "green", "car."]
    assert words["car."] == pytest.approx(np.exp(lp[ranges[2]].sum() + lp[ranges[3]].sum()), 1e-4)


def test_region_text_answers_ignore_location_tokens(florence, image):
    result = run(
        florence,
        image,
        "REGION_TO_CATEGORY",
        region=(0, 0, 80, 60),
        scores=True,
        logits_processor=force_answers(florence.processor, f"car{loc(0, 0, 499, 499)}"),
    )
    assert [word for word, _ in result.word_scores] == ["car"]
    assert 0 < result.score <= 1


def test_without_scores_nothing_is_computed(florence, image):
    result = run(florence, image, "OD", logits_processor=force_answers(florence.processor, "a"))
    assert result.scores is None
    with pytest.raises(ValueError, match="run the task with scores=True"):
        filter_by_score(result, 0.5)


def test_filter_sort_and_top_k(florence, image):
    answer = f"a{loc(1, 1, 2, 2)}b{loc(3, 3, 4, 4)}c{loc(5, 5, 6, 6)}"
    result = run(
        florence,
        image,
        "OD",
        scores=True,
        logits_processor=force_answers(florence.processor, answer),
    )
    order = np.argsort(-result.scores)
    assert sort_by_score(result).labels == [result.labels[i] for i in order]
    assert top_k(result, 2).labels == [result.labels[i] for i in order[:2]]
    assert len(top_k(result, 10)) == 3
    threshold = float(np.median(result.scores))
    kept = filter_by_score(result, threshold)
    assert kept.scores.min() >= threshold and len(kept) == int((result.scores >= threshold).sum())
    assert kept.boxes.shape == (len(kept), 4)


@pytest.mark.parametrize("text", ["car<loc_1><loc_22>door", "Café 東京 ñ", "a <sep> b</s>"])
def test_offsets_decode_like_the_tokenizer(processor, text):
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded, spans = decode_with_offsets(processor.tokenizer, ids)
    assert decoded == processor.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize("fast_beams", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("beams", [1, 3, 8])
def test_scores_equal_transformers_transition_scores_without_keeping_the_logits(
    florence, photo, beams, fast_beams
):
    """Reference: transformers' compute_transition_scores over output_logits, the documented
    way; ours gathers the same numbers step by step, a few candidates per row."""
    from florence_helpers.model import decoding

    inputs = florence.processor(
        text=["<OD>", "<OPEN_VOCABULARY_DETECTION>a red car on the left"],
        images=[photo, photo],
        return_tensors="pt",
        padding="longest",
    )
    settings = dict(num_beams=beams, max_new_tokens=24, no_repeat_ngram_size=3)
    with torch.inference_mode():
        reference = florence.model.generate(
            **inputs, **settings, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    expected = florence.model.compute_transition_scores(
        reference.sequences,
        reference.logits,
        reference.beam_indices if beams > 1 else None,
        normalize_logits=True,
    )
    kept = []
    real = decoding.StepLogprobs.transition_logprobs

    def spy(self, *args):
        kept.extend(self._logprobs)
        return real(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoding.StepLogprobs, "transition_logprobs", spy)
        sequences, logprobs = decoding.generate(
            florence, inputs, True, fast_beams=fast_beams, **settings
        )
    assert torch.equal(sequences, reference.sequences)
    np.testing.assert_allclose(logprobs, expected.numpy(), atol=1e-5)
    assert np.isfinite(logprobs).all() and (logprobs <= 0).all()
    vocabulary = florence.model.config.text_config.vocab_size
    assert {tuple(step.shape) for step in kept} == {(2 * beams, 4 * beams + 4)}
    assert 4 * beams + 4 < vocabulary / 30  # rows x steps x 36 floats, not x the vocabulary


def test_scores_on_a_static_cache_come_from_the_kept_logits(load_tiny, photo, monkeypatch):
    """A static cache is compiled by transformers on a GPU, where a hook added to the compiled
    forward would not run: there the logits are kept whole, and the scores are the same."""
    from florence_helpers.model import decoding

    florence = load_tiny()
    settings = dict(num_beams=3, max_new_tokens=24, scores=True)
    dynamic = run(florence, photo, "OD", **settings)
    florence.model.generation_config.cache_implementation = "static"
    monkeypatch.setattr(decoding, "StepLogprobs", lambda *a: pytest.fail("hook on a static cache"))
    static = run(florence, photo, "OD", **settings)
    assert static.raw == dynamic.raw
    np.testing.assert_allclose(static.scores, dynamic.scores, atol=1e-5)
