"""fp32 linear layers on oneDNN (load_model does it on AMD CPUs, where MKL is slow): the same
answers as plain transformers, the plain path wherever oneDNN is not meant to run."""

import copy

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from florence_helpers import Task, run
from florence_helpers.model import kernels as model_module
from florence_helpers.model.kernels import use_onednn_linears, use_plain_linears
from florence_helpers.testing import ForcedAnswer, answer_token_ids

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="this torch build has no oneDNN linear kernel",
)


def plain(florence):
    """The same weights with every linear layer back on nn.functional.linear."""
    twin = copy.deepcopy(florence)
    use_plain_linears(twin.model)
    return twin


def loc(processor, *bins: int) -> list[int]:
    return [processor.tokenizer.convert_tokens_to_ids(f"<loc_{b}>") for b in bins]


def step_logits(florence, inputs, decoder_ids):
    with torch.inference_mode():
        return florence.model(**inputs, decoder_input_ids=decoder_ids).logits


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
    expected = step_logits(reference, inputs, decoder_ids)
    got = step_logits(switched, inputs, decoder_ids)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert onednn_calls(lambda: step_logits(switched, inputs, decoder_ids)) > 10
    assert onednn_calls(lambda: step_logits(reference, inputs, decoder_ids)) == 0


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


def packed_layers(model) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if getattr(vars(module).get("_onednn"), "packed", None) is not None
    ]


def test_decoding_steps_use_packed_weights_and_the_encoder_does_not(load_tiny, photo, monkeypatch):
    # At full size the encoders see >= 576 rows (image tokens), decoding steps batch x beams;
    # the tiny model's 128-pixel images give the encoders >= 16 rows, so the line moves to 8.
    monkeypatch.setattr(model_module, "FEW_ROWS", 8)
    florence = load_tiny(device="cpu")
    use_onednn_linears(florence.model)  # whatever this machine's vendor
    run(florence, photo, Task.CAPTION, num_beams=3, max_new_tokens=5)
    packed = packed_layers(florence.model)
    assert "lm_head" in packed
    assert any(".decoder.layers." in name for name in packed)
    # Passes over the image and prompt tokens (hundreds of rows) keep the weights unpacked,
    # so the packed copies cost memory only for the layers that decode.
    assert not any("vision" in name or ".encoder." in name for name in packed)


def test_use_plain_linears_undoes_the_switch(load_tiny, photo):
    florence = load_tiny(device="cpu")
    use_onednn_linears(florence.model)  # whatever this machine's vendor
    run(florence, photo, Task.CAPTION, max_new_tokens=3)
    linears = [m for m in florence.model.modules() if type(m) is torch.nn.Linear]
    assert use_plain_linears(florence.model) == len(linears) > 10
    assert not any("forward" in vars(m) or "_onednn" in vars(m) for m in florence.model.modules())
    assert onednn_calls(lambda: run(florence, photo, Task.CAPTION, max_new_tokens=3)) == 0


@pytest.mark.parametrize("change", ["in place", "through .data", "new tensor"])
def test_a_changed_weight_is_packed_again(pair, photo, change):
    switched, _ = pair
    florence = copy.deepcopy(switched)
    reference = plain(florence)
    inputs = florence.processor(text="<CAPTION>", images=photo, return_tensors="pt")
    decoder_ids = torch.tensor([[2, 0, *loc(florence.processor, 10, 20)]])  # 4 rows: packed
    step_logits(florence, inputs, decoder_ids)
    assert "lm_head" in packed_layers(florence.model)
    for model in (florence.model, reference.model):
        fc = model.model.language_model.decoder.layers[0].fc2
        delta = torch.randn(fc.weight.shape, generator=torch.Generator().manual_seed(0))
        if change == "in place":
            with torch.no_grad():
                fc.weight.add_(delta)
        elif change == "through .data":
            fc.weight.data += delta  # bypasses the version counter, as peft's merge does
        else:
            fc.weight.data = fc.weight.data + delta
    expected = step_logits(reference, inputs, decoder_ids)
    got = step_logits(florence, inputs, decoder_ids)
    assert not torch.allclose(expected, step_logits(switched, inputs, decoder_ids))
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_a_merged_lora_adapter_is_what_runs(load_tiny, photo):
    from florence_helpers.model.adapters import add_lora, merge_adapter

    florence = load_tiny(device="cpu")
    use_onednn_linears(florence.model)
    inputs = florence.processor(text="<CAPTION>", images=photo, return_tensors="pt")
    decoder_ids = torch.tensor([[2, 0, *loc(florence.processor, 10, 20)]])
    before = step_logits(florence, inputs, decoder_ids)  # packs the base weights
    lora = add_lora(florence, rank=4)
    with torch.no_grad():
        for name, parameter in lora.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter: its update is not zero
    with_adapter = step_logits(lora, inputs, decoder_ids)
    merged = merge_adapter(lora)
    after = step_logits(merged, inputs, decoder_ids)
    assert not torch.allclose(with_adapter, before, atol=1e-3)
    assert torch.allclose(after, with_adapter, rtol=0, atol=1e-4 * with_adapter.abs().max().item())


def test_casting_the_model_frees_its_packed_copies(load_tiny, photo):
    florence = load_tiny(device="cpu")
    use_onednn_linears(florence.model)
    run(florence, photo, Task.CAPTION, max_new_tokens=3)
    assert packed_layers(florence.model)
    florence.model.to(torch.bfloat16)
    with torch.inference_mode():
        inputs = florence.processor(text="<CAPTION>", images=photo, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
        florence.model(**inputs, decoder_input_ids=torch.tensor([[2, 0]]))
    assert packed_layers(florence.model) == []
