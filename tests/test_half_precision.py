"""Half precision, the GPU default, exercised on the CPU with the tiny model.

Forced answers are the same tokens in any dtype, so their parsed results must equal the fp32
ones exactly; scores only need to be finite probabilities. Training keeps float32 weights and
autocasts the forward pass.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from florence_helpers import BoxesResult, PolygonsResult, TextResult, load_model, run
from florence_helpers.model.adapters import add_lora
from florence_helpers.model.devices import resolve_dtype
from florence_helpers.model.inference import run_tasks
from florence_helpers.testing import force_answers
from florence_helpers.training import steps
from florence_helpers.training.coco import read_coco
from florence_helpers.training.config import TrainingConfig
from florence_helpers.training.finetune import train
from florence_helpers.training.sample_data import make_shapes_dataset

DTYPES = [torch.bfloat16, torch.float16]
OD = "cat<loc_100><loc_200><loc_300><loc_400>dog<loc_500><loc_500><loc_900><loc_990>"
SEGMENTATION = "<loc_100><loc_100><loc_600><loc_100><loc_600><loc_700><loc_100><loc_700>"


@pytest.fixture(scope="module", params=DTYPES, ids=["bf16", "fp16"])
def half(request, tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", dtype=request.param)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))


def _probabilities(values) -> None:
    values = np.asarray(values, dtype=np.float64)
    assert np.isfinite(values).all()
    assert ((values >= 0) & (values <= 1)).all()


def test_half_models_are_half(half):
    assert half.dtype in DTYPES
    assert next(half.model.parameters()).dtype == half.dtype


@pytest.mark.parametrize("num_beams", [1, 3])
def test_forced_answers_parse_as_in_fp32(half, florence, picture, num_beams):
    for model in (florence, half):
        forced = force_answers(model.processor, OD)
        result = run(
            model, picture, "OD", num_beams=num_beams, scores=True, logits_processor=forced
        )
        assert isinstance(result, BoxesResult)
        assert result.labels == ["cat", "dog"]
        _probabilities(result.scores)
        if model is florence:
            expected = result.boxes
    np.testing.assert_array_equal(result.boxes, expected)


def test_answers_parse_with_finite_scores(half, picture):
    boxes = run(half, [picture, picture], "OD", num_beams=3, max_new_tokens=24, scores=True)
    for result in boxes:
        assert isinstance(result, BoxesResult) and result.boxes.shape[1] == 4
        _probabilities(result.scores)
    forced = force_answers(half.processor, "a cat sitting on a wooden table")
    caption = run(half, picture, "CAPTION", num_beams=3, scores=True, logits_processor=forced)
    assert isinstance(caption, TextResult) and caption.text == "a cat sitting on a wooden table"
    _probabilities([caption.score, *(p for _, p in caption.word_scores)])


def test_run_tasks_in_half_precision(half, picture):
    answers = ["a picture", OD, SEGMENTATION]
    results = run_tasks(
        half,
        picture,
        ["CAPTION", "OD", ("REFERRING_EXPRESSION_SEGMENTATION", "the cat")],
        num_beams=3,
        scores=True,
        logits_processor=force_answers(half.processor, answers),
    )
    caption, boxes, mask = results
    assert caption.text == "a picture"
    assert boxes.labels == ["cat", "dog"]
    assert isinstance(mask, PolygonsResult) and len(mask.polygons) == 1
    for result in (boxes, mask):
        _probabilities(result.scores)


def test_training_autocasts_to_bf16_and_keeps_float32_weights(tiny_model_dir, tmp_path):
    samples = read_coco(make_shapes_dataset(tmp_path, num_images=2, seed=0))
    lora = add_lora(load_model(tiny_model_dir, device="cpu", dtype="float32"))
    autocast_seen = []
    model_forward = lora.model.forward

    def spy(*args, **kwargs):
        enabled = torch.is_autocast_enabled("cpu")
        autocast_seen.append(torch.get_autocast_dtype("cpu") if enabled else None)
        return model_forward(*args, **kwargs)

    lora.model.forward = spy
    config = TrainingConfig(epochs=3, batch_size=2, learning_rate=1e-3, mixed_precision=True)
    history = train(lora, samples, config, progress=False)
    assert autocast_seen == [torch.bfloat16] * 3
    assert all(np.isfinite(history.losses))
    trainable = [p for p in lora.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    # The default autocasts where the processor has native bf16, and only there.
    for native, expected in ((True, torch.bfloat16), (False, None)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(steps, "cpu_has_native_bf16", lambda native=native: native)
            autocast_seen.clear()
            train(lora, samples, TrainingConfig(epochs=1, batch_size=2), progress=False)
        assert autocast_seen == [expected]
    # mixed_precision=False keeps float32 on any processor.
    autocast_seen.clear()
    train(
        lora, samples, TrainingConfig(epochs=1, batch_size=2, mixed_precision=False), progress=False
    )
    assert autocast_seen == [None]


def test_lora_trains_on_a_bf16_model(tiny_model_dir, tmp_path):
    # What load_model() gives on a CPU with native bf16: the frozen weights stay bf16, the
    # adapter's are float32, and a few autocast steps move them.
    samples = read_coco(make_shapes_dataset(tmp_path, num_images=2, seed=0))
    lora = add_lora(load_model(tiny_model_dir, device="cpu", dtype="bf16"))
    trainable = {n: p for n, p in lora.model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    config = TrainingConfig(epochs=3, batch_size=2, learning_rate=1e-3, mixed_precision=True)
    history = train(lora, samples, config, progress=False)
    assert all(np.isfinite(history.losses))
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())
    assert next(lora.model.get_base_model().parameters()).dtype == torch.bfloat16


def test_full_fine_tuning_of_a_bf16_model_says_how_to_load_it(tiny_model_dir, tmp_path):
    samples = read_coco(make_shapes_dataset(tmp_path, num_images=2, seed=0))
    model = load_model(tiny_model_dir, device="cpu", dtype="bf16")
    with pytest.raises(ValueError, match="dtype='float32'"):
        train(model, samples, TrainingConfig(epochs=1), progress=False)


def test_explicit_fp16_on_mps_warns():
    mps = torch.device("mps")
    with pytest.warns(UserWarning, match="MPS"):
        assert resolve_dtype("fp16", mps) == torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("auto", mps) == torch.float32
        assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16


def test_token_probabilities_are_computed_in_float32(half, picture):
    from florence_helpers.model.decoding import generate

    inputs = half.processor(text="<OD>", images=picture, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(half.dtype)
    settings = dict(max_new_tokens=6, num_beams=3)
    with torch.inference_mode():
        outputs = half.model.generate(
            **inputs, **settings, return_dict_in_generate=True, output_logits=True, do_sample=False
        )
    sequences, logprobs = generate(half, inputs, True, **settings)
    assert torch.equal(sequences, outputs.sequences) and logprobs.dtype == np.float32
    first = torch.log_softmax(outputs.logits[0].float(), dim=-1)
    chosen = first[outputs.beam_indices[:, 0], outputs.sequences[:, 1]]
    torch.testing.assert_close(torch.from_numpy(logprobs[:, 0]), chosen)
