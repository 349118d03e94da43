"""fp32 linear layers on oneDNN (load_model does it on AMD CPUs, where MKL is slow): the same
answers as plain transformers, the plain path wherever oneDNN is not meant to run."""

import copy

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from florence_helpers import Task, run
from florence_helpers import model as model_module
from florence_helpers.model import use_onednn_linears
from florence_helpers.testing import ForcedAnswer, answer_token_ids

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="this torch build has no oneDNN linear kernel",
)


def plain(florence):
    """The same weights with every linear layer back on nn.functional.linear."""
    twin = copy.deepcopy(florence)
    for module in twin.model.modules():
        vars(module).pop("forward", None)
    return twin


def loc(processor, *bins: int) -> list[int]:
    return [processor.tokenizer.convert_tokens_to_ids(f"<loc_{b}>") for b in bins]


def onednn_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if "_linear_pointwise" in e.key)


@pytest.fixture(scope="module")
def pair(load_tiny):
    switched = load_tiny(device="cpu")
    reference = plain(switched)
    use_onednn_linears(switched.model)  # whatever this machine's vendor
    return switched, reference


def test_every_linear_layer_is_switched_once(load_tiny):
    florence = plain(load_tiny(device="cpu"))
    linears = [m for m in florence.model.modules() if type(m) is torch.nn.Linear]
    assert use_onednn_linears(florence.model) == len(linears) > 10
    assert use_onednn_linears(florence.model) == 0  # already switched


def test_logits_match_plain_transformers_and_onednn_really_runs(pair, photo):
    switched, reference = pair
    inputs = switched.processor(text="<OD>", images=photo, return_tensors="pt")
    decoder_ids = torch.tensor([[2, 0, *loc(switched.processor, 300, 400, 500)]])

    def logits(florence):
        with torch.inference_mode():
            return florence.model(**inputs, decoder_input_ids=decoder_ids).logits

    expected, got = logits(reference), logits(switched)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert onednn_calls(lambda: logits(switched)) > 10
    assert onednn_calls(lambda: logits(reference)) == 0


def test_forced_and_free_answers_are_the_same(pair, photo):
    switched, reference = pair
    answer = "<s>cat<loc_100><loc_200><loc_500><loc_700>dog<loc_0><loc_0><loc_999><loc_999></s>"
    ids = answer_token_ids(switched.processor, answer)
    results = [
        run(
            florence,
            photo,
            Task.OD,
            num_beams=3,
            logits_processor=[ForcedAnswer([ids], switched.processor.tokenizer.eos_token_id)],
        )
        for florence in pair
    ]
    assert results[0].labels == results[1].labels == ["cat", "dog"]
    assert results[0].boxes.shape == (2, 4)
    assert np.array_equal(results[0].boxes, results[1].boxes)
    free = [run(f, photo, Task.CAPTION, num_beams=3, max_new_tokens=20).raw for f in pair]
    assert free[0] == free[1]


def test_training_and_bf16_take_the_plain_path(pair, photo):
    switched, reference = pair
    inputs = switched.processor(text="<CAPTION>", images=photo, return_tensors="pt")
    labels = torch.tensor([[0, *loc(switched.processor, 300, 400), 2]])
    grads = []
    for florence in (switched, reference):
        florence.model.zero_grad()
        loss = florence.model(**inputs, labels=labels).loss
        if florence is switched:
            assert onednn_calls(lambda: switched.model(**inputs, labels=labels)) == 0
        loss.backward()
        grads.append(florence.model.lm_head.weight.grad.clone())
        florence.model.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    half = copy.deepcopy(switched.model).to(torch.bfloat16)
    half_inputs = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()
    }
    with torch.inference_mode():
        assert onednn_calls(lambda: half(**half_inputs, decoder_input_ids=labels)) == 0


def test_a_copy_runs_its_own_weights(pair, photo):
    switched, _ = pair
    twin = copy.deepcopy(switched.model)
    layer = twin.model.language_model.decoder.layers[0].fc2
    assert "forward" in vars(layer)  # still switched in the copy
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        x = torch.randn(2, layer.in_features)
        assert torch.count_nonzero(layer(x)) == 0  # the copy's zeroed weights, not the original's
        original = switched.model.model.language_model.decoder.layers[0].fc2
        assert torch.count_nonzero(original(x)) > 0


@pytest.mark.parametrize("vendor, switched", [("AuthenticAMD", True), ("GenuineIntel", False)])
def test_load_model_switches_on_amd_processors_only(tiny_model_dir, monkeypatch, vendor, switched):
    from florence_helpers import load_model

    monkeypatch.setattr(model_module, "cpu_vendor", lambda: vendor)
    florence = load_model(tiny_model_dir, device="cpu", dtype="float32")
    fc = florence.model.model.language_model.decoder.layers[0].fc1
    assert ("forward" in vars(fc)) is switched
