import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from florence_helpers import DEFAULT_MODEL_ID, ModelNotAvailableError, load_model
from florence_helpers.model.convert import FLORENCE_SPECIAL_TOKENS
from florence_helpers.model.devices import resolve_device, resolve_dtype
from florence_helpers.model.loading import resolve_model_id
from florence_helpers.testing import build_tiny_model


def test_load_from_a_directory(florence, tiny_model_dir):
    assert florence.model_id == str(tiny_model_dir)
    assert florence.device.type == "cpu"
    assert florence.dtype == torch.float32
    assert not florence.model.training
    assert type(florence.model).__name__ == "Florence2ForConditionalGeneration"
    assert type(florence.processor).__name__ == "Florence2Processor"


def test_model_id_comes_from_argument_then_env_then_default(monkeypatch):
    monkeypatch.setenv("FLORENCE_MODEL", "/models/florence")
    assert resolve_model_id("org/name") == "org/name"
    assert resolve_model_id() == "/models/florence"
    monkeypatch.delenv("FLORENCE_MODEL")
    assert resolve_model_id() == DEFAULT_MODEL_ID == "florence-community/Florence-2-base"


def test_env_var_is_used_by_load_model(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("FLORENCE_MODEL", str(tiny_model_dir))
    assert load_model(device="cpu").model_id == str(tiny_model_dir)


def _pretend_cpu(monkeypatch, *, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [
        (True, False, torch.bfloat16),  # AMD Zen 4 and later, Intel Cooper Lake
        (False, True, torch.bfloat16),  # Intel Sapphire Rapids and later
        (False, False, torch.float32),  # most laptops, Colab's CPU runtime
    ],
)
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    _pretend_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    # An explicit choice is never overridden.
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_load_model_logs_its_dtype_choice(monkeypatch, caplog, tiny_model_dir, native):
    _pretend_cpu(monkeypatch, avx512_bf16=native, amx=False)
    with caplog.at_level("INFO", logger="florence_helpers.model.loading"):
        florence = load_model(tiny_model_dir, device="cpu")
    assert florence.dtype == (torch.bfloat16 if native else torch.float32)
    assert f"dtype={florence.dtype}" in repr(florence)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "florence_helpers.model.loading"]
    assert str(florence.dtype) in line
    assert ("natively" in line) == native


def test_device_and_dtype_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    assert resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))


def test_dtype_argument_is_applied(tiny_model_dir):
    assert load_model(tiny_model_dir, device="cpu", dtype="bf16").dtype == torch.bfloat16


def test_compile_mode_gives_the_same_answers(tiny_model_dir, florence):
    from florence_helpers import run
    from florence_helpers.model.loading import vision_tower

    compiled = load_model(tiny_model_dir, device="cpu", dtype="float32", compile=True)
    assert vision_tower(compiled.model)._compiled_call_impl is not None
    # On the CPU transformers would run a static cache uncompiled (slower): it stays dynamic.
    assert compiled.model.generation_config.cache_implementation is None
    static = load_model(tiny_model_dir, device="cpu", dtype="float32")
    static.model.generation_config.cache_implementation = "static"  # what CUDA gets
    image = Path(__file__).resolve().parents[1] / "images" / "astronaut.jpg"
    for beams in (1, 3):
        plain = run(florence, image, "OD", num_beams=beams, max_new_tokens=30)
        assert run(compiled, image, "OD", num_beams=beams, max_new_tokens=30).raw == plain.raw
        assert run(static, image, "OD", num_beams=beams, max_new_tokens=30).raw == plain.raw


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"No model directory at .*nowhere"):
        load_model(tmp_path / "nowhere")


def test_directory_without_a_model(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="holds no Florence-2 model"):
        load_model(tmp_path)


def test_remote_code_checkpoints_point_to_the_native_ones():
    with pytest.raises(ModelNotAvailableError, match="'florence-community/Florence-2-large'"):
        load_model("microsoft/Florence-2-large")


def _offline_env(tmp_path) -> dict[str, str]:
    """No cache and a hub endpoint that refuses connections: offline on any machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FLORENCE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    return env


def test_offline_without_a_local_copy_gives_one_clear_error(tmp_path):
    code = (
        "from florence_helpers import load_model, ModelNotAvailableError\n"
        "try:\n    load_model()\nexcept ModelNotAvailableError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "'florence-community/Florence-2-base'" in out
    assert "Hugging Face Hub could not be reached" in out
    assert "export FLORENCE_MODEL=" in out


def _digest(directory) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


def test_tiny_model_is_deterministic(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again")
    assert _digest(again) == _digest(tiny_model_dir)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(tiny_model_dir)["model.safetensors"]


def test_tiny_tokenizer_has_every_florence_token(processor):
    tokenizer = processor.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer.convert_tokens_to_ids(FLORENCE_SPECIAL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + len(FLORENCE_SPECIAL_TOKENS)))
    assert (
        tokenizer.convert_tokens_to_ids("<loc_999>") - tokenizer.convert_tokens_to_ids("<loc_0>")
        == 999
    )
    assert processor.image_token == "<image>"
    assert tokenizer.convert_tokens_to_ids("<image>") == len(tokenizer) - 1
    # Location tokens are never split, and text round-trips.
    text = "a red car<loc_0><loc_999><sep><poly>"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_emulated_bf16_is_not_chosen(monkeypatch):
    # A T4 reports bf16 support only through emulation, which is slower than fp16 there.
    def supported(including_emulation=True):
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


# --- adapter identity --------------------------------------------------------------------------


def _randomise_lora_b(florence, seed):
    """A non-trivial adapter without training one (lora_B starts at zero)."""
    with torch.no_grad():
        for name, parameter in florence.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
    return florence


def test_a_plain_model_has_no_adapter_fingerprint(florence):
    from florence_helpers.model.adapters import adapter_fingerprint
    from florence_helpers.model.loading import FlorenceModel

    assert adapter_fingerprint(florence) is None
    assert florence.merged_adapter is None
    # The three-field constructor still works; the new field defaults to None.
    again = FlorenceModel(florence.model, florence.processor, florence.model_id)
    assert again.merged_adapter is None and adapter_fingerprint(again) is None


def test_the_fingerprint_follows_the_adapter_weights(load_tiny, tmp_path):
    import re

    from florence_helpers.model.adapters import (
        adapter_fingerprint,
        add_lora,
        load_adapter,
        save_adapter,
    )

    lora = _randomise_lora_b(add_lora(load_tiny(), rank=4, seed=0), seed=1)
    fingerprint = adapter_fingerprint(lora)
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", fingerprint)
    saved = save_adapter(lora, tmp_path / "adapter")
    # The same adapter loaded twice, onto two fresh models, and for training: one identity.
    first = load_adapter(load_tiny(), saved)
    second = load_adapter(load_tiny(), saved, trainable=True)
    assert adapter_fingerprint(first) == adapter_fingerprint(second) == fingerprint
    # Another adapter, or this one trained one step further, is another identity.
    other = _randomise_lora_b(add_lora(load_tiny(), rank=4, seed=0), seed=2)
    assert adapter_fingerprint(other) != fingerprint
    with torch.no_grad():
        parameter = next(p for n, p in second.model.named_parameters() if "lora_A" in n)
        parameter[0, 0] += 1e-3
    assert adapter_fingerprint(second) != fingerprint
    # The same weights scaled differently (lora_alpha) change the answers: another identity.
    louder = _randomise_lora_b(add_lora(load_tiny(), rank=4, alpha=32, seed=0), seed=1)
    assert adapter_fingerprint(louder) != fingerprint


def test_a_merged_adapter_keeps_its_identity(load_tiny):
    from florence_helpers.model.adapters import adapter_fingerprint, add_lora, merge_adapter

    lora = _randomise_lora_b(add_lora(load_tiny(), rank=4, seed=0), seed=1)
    fingerprint = adapter_fingerprint(lora)
    merged = merge_adapter(lora)
    assert merged.merged_adapter == fingerprint
    assert adapter_fingerprint(merged) == f"merged:{fingerprint}"
    assert fingerprint in repr(merged)
    # The same adapter merged into another copy of the base: the same identity.
    again = merge_adapter(_randomise_lora_b(add_lora(load_tiny(), rank=4, seed=0), seed=1))
    assert adapter_fingerprint(again) == adapter_fingerprint(merged)
    # An adapter on the merged model names both; merged as well, one combined fingerprint.
    second = _randomise_lora_b(add_lora(merged, rank=2, seed=3), seed=4)
    assert adapter_fingerprint(second).startswith(f"merged:{fingerprint}+sha256:")
    twice = merge_adapter(second)
    assert twice.merged_adapter not in (fingerprint, None)
    assert adapter_fingerprint(twice) == f"merged:{twice.merged_adapter}"
    assert adapter_fingerprint(twice) != adapter_fingerprint(merged)
