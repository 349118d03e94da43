"""Loading refuses what it cannot use, with one clear error naming the file or the device.

* ``load_model`` on a damaged model folder raises ``ModelNotAvailableError`` naming the file
  and what is wrong with it, never a traceback from inside transformers;
* a device that is not a device, or not on this machine, is a ``ValueError`` before anything
  is loaded (``resolve_device``, which the command line calls first);
* ``load_adapter`` loads an adapter whole or not at all: a damaged or incomplete weight file
  is an ``AdapterError`` naming it, and the base model is left as it was.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from florence_helpers import ModelNotAvailableError, load_model
from florence_helpers.model.adapters import AdapterError, add_lora, load_adapter, save_adapter
from florence_helpers.model.devices import available_devices, resolve_device
from florence_helpers.model.loading import is_peft

# --- load_model on a damaged folder ------------------------------------------------------------


def _edit_config(change):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _edit_json(path, change):
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _cut_short(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


class _RunsCode:
    """A pickle that would create ``marker`` if it were ever unpickled unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickle_with_code_for_a_model(folder):
    (folder / "model.safetensors").unlink()
    torch.save({"weights": _RunsCode(folder.parent / "pickle-ran")}, folder / "pytorch_model.bin")


def _not_a_bin(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle, nor a zip archive")


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        pytest.param(
            lambda f: (f / "config.json").write_text("[]"),
            "config.json",
            r"holds a JSON list, not a model configuration",
            id="config-is-a-list",
        ),
        pytest.param(
            lambda f: (f / "config.json").write_text("{oops"),
            "config.json",
            r"is not valid JSON",
            id="config-not-json",
        ),
        pytest.param(
            lambda f: (f / "config.json").write_bytes(b'{"model_type": "\xff"}'),
            "config.json",
            r"is not UTF-8 text",
            id="config-not-utf8",
        ),
        pytest.param(
            _edit_config(lambda c: c.pop("model_type")),
            "config.json",
            r"has no model_type, so it does not describe a Florence-2 checkpoint",
            id="no-model-type",
        ),
        pytest.param(
            _edit_config(lambda c: c.update(model_type=5)),
            "config.json",
            r"has model_type 5",
            id="model-type-5",
        ),
        pytest.param(
            _edit_config(lambda c: c.update(vision_config=5)),
            "config.json",
            r"vision_config is a JSON number, but must be an object",
            id="vision-config-5",
        ),
        pytest.param(
            _edit_config(lambda c: c.update(text_config=[])),
            "config.json",
            r"text_config is a JSON list, but must be an object",
            id="text-config-list",
        ),
        pytest.param(
            _edit_config(lambda c: c["text_config"].update(d_model="big")),
            "config.json",
            r"text_config\.d_model is 'big', but must be a whole number of at least 1",
            id="d-model-big",
        ),
        pytest.param(
            _edit_config(lambda c: c["text_config"].update(d_model=-3)),
            "config.json",
            r"text_config\.d_model is -3, but must be a whole number of at least 1",
            id="d-model-negative",
        ),
        pytest.param(
            _edit_config(lambda c: c["vision_config"].update(embed_dim="x")),
            "config.json",
            r"vision_config\.embed_dim is 'x', but must be a list of whole numbers",
            id="embed-dim-text",
        ),
        pytest.param(
            _edit_config(lambda c: c["text_config"].update(decoder_attention_heads=3)),
            "config.json",
            r"decoder_attention_heads \(3\) does not divide text_config\.d_model \(128\)",
            id="heads-do-not-divide",
        ),
        pytest.param(
            _edit_config(lambda c: c.update(image_token_id="x")),
            "config.json",
            r"does not describe a Florence-2 model: image_token_id is 'x', but must be int",
            id="image-token-id-text",
        ),
        pytest.param(
            _edit_config(lambda c: c["text_config"].update(activation_function=5)),
            "config.json",
            r"text_config\.activation_function is 5, but must be str",
            id="activation-5",
        ),
        pytest.param(
            lambda f: _edit_json(
                f / "processor_config.json",
                lambda c: c["image_processor"].update(size={"height": 0, "width": 0}),
            ),
            "processor_config.json",
            r"cannot prepare an image",
            id="processor-size-0",
        ),
        pytest.param(
            lambda f: (f / "generation_config.json").write_text('{"num_beams": 3}'),
            "generation_config.json",
            r"has no valid decoder_start_token_id",
            id="generation-without-token-ids",
        ),
        pytest.param(
            lambda f: _edit_json(
                f / "generation_config.json", lambda c: c.update(eos_token_id=10**9)
            ),
            "generation_config.json",
            r"has no valid eos_token_id",
            id="eos-outside-the-vocabulary",
        ),
        pytest.param(
            _cut_short,
            "model.safetensors",
            r"this safetensors file is damaged or cut short",
            id="truncated-safetensors",
        ),
        pytest.param(
            _pickle_with_code_for_a_model,
            "pytorch_model.bin",
            r"is a pickle file holding more than tensors, which torch refuses to load safely",
            id="pickle-with-code",
        ),
        pytest.param(
            _not_a_bin,
            "pytorch_model.bin",
            r"is damaged, cut short or not a PyTorch weight file",
            id="bin-not-a-pickle",
        ),
    ],
)
def test_load_model_names_what_is_wrong_with_which_file(
    tiny_model_dir, tmp_path, damage, file, message
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    with pytest.raises(ModelNotAvailableError, match=message) as raised:
        load_model(folder, device="cpu", dtype="float32")
    assert str(folder / file) in str(raised.value)
    assert not (tmp_path / "pickle-ran").exists()


# --- devices -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["banana", "gpu", "cuda:x", "cpu:0", "", 5, None])
def test_a_device_that_is_not_a_device_is_named(device):
    with pytest.raises(ValueError) as raised:
        resolve_device(device)
    assert str(raised.value) == (f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}.")


def test_load_model_refuses_a_wrong_device_before_loading(monkeypatch, tmp_path):
    import florence_helpers.model.loading as model

    def never(*args, **kwargs):
        raise AssertionError("loading started before the device was checked")

    monkeypatch.setattr(model, "_check_source", never)
    with pytest.raises(ValueError, match=r"got 'banana'"):
        load_model(tmp_path / "nowhere", device="banana")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda' is not available here"):
        load_model(tmp_path / "nowhere", device="cuda")


def test_cuda_on_a_machine_without_it_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError) as raised:
            resolve_device(device)
        message = str(raised.value)
        assert message.startswith(f"device {str(device)!r} is not available here: ")
        assert message.endswith("Available: auto, cpu.")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is built with CUDA")
def test_a_cpu_only_torch_is_named_as_the_reason():
    with pytest.raises(ValueError, match=r"this torch \(.*\) was built without CUDA"):
        resolve_device("cuda")


def test_a_gpu_index_past_the_last_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError) as raised:
        resolve_device("cuda:7")
    assert str(raised.value).startswith(
        "device 'cuda:7' is not available here: there are 2 GPUs here (cuda:0 to cuda:1)."
    )
    assert "Available: auto, cpu, cuda, cuda:0, cuda:1" in str(raised.value)
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # nothing is allocated


def test_mps_where_there_is_none_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'mps' is not available here: .*Available: "):
        resolve_device("mps")


def test_usable_devices_resolve(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" cpu ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert available_devices()[:2] == ["auto", "cpu"]
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("auto") == torch.device("mps")
    assert available_devices() == ["auto", "cpu", "mps"]


# --- adapters load whole or not at all ---------------------------------------------------------


@pytest.fixture(scope="module")
def saved_adapter(load_tiny, tmp_path_factory):
    """A trained-looking LoRA adapter on the tiny model: 16 modules, 32 tensors."""
    lora = add_lora(load_tiny(), rank=4, seed=0)
    with torch.no_grad():
        for name, parameter in lora.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return save_adapter(lora, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture
def adapter_copy(saved_adapter, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(saved_adapter, folder)
    return folder


def _logits(florence):
    inputs = florence.processor(
        text="<OD>", images=torch.zeros(3, 64, 64, dtype=torch.uint8), return_tensors="pt"
    ).to(florence.device)
    answer = torch.tensor([[2, 0, 100]], device=florence.device)
    with torch.no_grad():
        return florence.model(**inputs, decoder_input_ids=answer).logits


def _assert_untouched(florence, before):
    """The base model holds no LoRA layer, and answers as before."""
    assert not is_peft(florence.model)
    assert not [name for name, _ in florence.model.named_modules() if "lora_" in name]
    torch.testing.assert_close(_logits(florence), before, rtol=0, atol=0)


def test_an_adapter_missing_half_its_lora_b_is_refused(load_tiny, adapter_copy):
    weights = adapter_copy / "adapter_model.safetensors"
    state = load_file(weights)
    lora_b = sorted(k for k in state if ".lora_B." in k)
    assert len(lora_b) == 16
    save_file({k: v for k, v in state.items() if k not in lora_b[::2]}, weights)
    florence = load_tiny()
    before = _logits(florence)
    with pytest.raises(AdapterError) as raised:
        load_adapter(florence, adapter_copy)
    message = str(raised.value)
    assert message.startswith(f"{weights} is missing 8 of the 32 tensors")
    assert lora_b[0] in message
    assert "zero for lora_B" in message
    _assert_untouched(florence, before)
    # The refused load left nothing behind: the whole adapter still goes on the same model.
    good = adapter_copy.parent / "good"
    shutil.copytree(adapter_copy, good)
    save_file(state, good / "adapter_model.safetensors")
    assert is_peft(load_adapter(florence, good).model)


def _pickle_with_code(folder):
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"weights": _RunsCode(folder.parent / "pickle-ran")}, folder / "adapter_model.bin")


def _bin_not_a_pickle(folder):
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x00garbage")


def _cut_adapter_short(folder):
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _edit_adapter_config(change):
    def edit(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        change(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))

    return edit


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        pytest.param(
            _cut_adapter_short,
            "adapter_model.safetensors",
            r"this safetensors file is damaged or cut short",
            id="truncated-safetensors",
        ),
        pytest.param(
            _pickle_with_code,
            "adapter_model.bin",
            r"pickle file holding more than tensors, which is refused",
            id="pickle-with-code",
        ),
        pytest.param(
            _bin_not_a_pickle,
            "adapter_model.bin",
            r"is not a readable PyTorch weight file",
            id="bin-not-a-pickle",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.update(target_modules=5)),
            "adapter_config.json",
            r"target_modules is 5, but must be a string or a list of strings",
            id="target-modules-5",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.update(lora_alpha="16")),
            "adapter_config.json",
            r"lora_alpha is '16', but must be a number",
            id="alpha-text",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.update(r="4")),
            "adapter_config.json",
            r"the rank r must be a whole number of at least 1, got '4'",
            id="rank-text",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.update(rank_pattern=["q_proj"])),
            "adapter_config.json",
            r"rank_pattern is \['q_proj'\], but must be an object",
            id="rank-pattern-list",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.update(lora_dropout=2)),
            "adapter_config.json",
            r"lora_dropout is 2, but must be a number from 0 to below 1",
            id="dropout-2",
        ),
    ],
)
def test_a_damaged_adapter_is_refused_and_named(load_tiny, adapter_copy, damage, file, message):
    damage(adapter_copy)
    florence = load_tiny()
    before = _logits(florence)
    with pytest.raises(AdapterError, match=message) as raised:
        load_adapter(florence, adapter_copy)
    assert str(adapter_copy / file) in str(raised.value)
    assert not (adapter_copy.parent / "pickle-ran").exists()
    _assert_untouched(florence, before)


def test_a_refused_adapter_of_another_shape_leaves_the_base_model_as_it_was(
    load_tiny, adapter_copy
):
    weights = adapter_copy / "adapter_model.safetensors"
    state = load_file(weights)
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["r"] = 2  # the file's matrices are rank 4: peft fails part-way through loading
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    save_file(state, weights)
    florence = load_tiny()
    before = _logits(florence)
    with pytest.raises(AdapterError, match=r"does not fit this model"):
        load_adapter(florence, adapter_copy)
    _assert_untouched(florence, before)


@pytest.mark.parametrize(
    "change", [{"r": 100_000}, {"rank_pattern": {"fc1": 10**7}}], ids=["r", "rank_pattern"]
)
def test_a_rank_the_weights_do_not_have_is_refused_before_anything_is_allocated(
    load_tiny, adapter_copy, change, monkeypatch
):
    import json

    import peft

    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    (adapter_copy / "adapter_config.json").write_text(json.dumps({**config, **change}))
    florence = load_tiny()
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(AdapterError, match=r"asks for rank \d+, but the adapter's weights have"):
        load_adapter(florence, adapter_copy)


@pytest.mark.parametrize("keep", ["lora_B only", "empty lora_A"])
def test_a_huge_rank_with_no_usable_lora_a_is_refused_before_anything_is_allocated(
    load_tiny, adapter_copy, keep, monkeypatch
):
    # The rank check once read ranks from lora_A only: without one (or with an empty one, of
    # shape (r, 0), which holds no data) a 1 kB folder asked peft for 25 GB.
    import peft

    weights = adapter_copy / "adapter_model.safetensors"
    state = load_file(weights)
    if keep == "lora_B only":
        state = {k: v for k, v in state.items() if "lora_A" not in k}
    else:
        name = next(k for k in state if "lora_A" in k)
        state[name] = torch.zeros(50_000_000, 0)
    save_file(state, weights)
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    (adapter_copy / "adapter_config.json").write_text(json.dumps({**config, "r": 50_000_000}))
    florence = load_tiny()
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(AdapterError, match=r"asks for rank 50000000|is empty"):
        load_adapter(florence, adapter_copy)


def test_a_pickled_adapter_of_repeated_views_is_refused_before_peft_allocates(
    load_tiny, adapter_copy, monkeypatch
):
    # A 2 kB adapter_model.bin held torch.zeros(1).expand(10**8, 8) as lora_A: the rank check
    # read rank 10**8 from its shape and peft allocated gigabytes (twelfth hostile review).
    import peft

    weights = adapter_copy / "adapter_model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if "lora_A" in k)
    state[name] = torch.zeros(1).expand(10**8, state[name].shape[1])
    torch.save(state, adapter_copy / "adapter_model.bin")
    weights.unlink()
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    (adapter_copy / "adapter_config.json").write_text(json.dumps({**config, "r": 10**8}))
    florence = load_tiny()
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(AdapterError, match=r"claims the shape \(100000000, \d+\) over 4 bytes"):
        load_adapter(florence, adapter_copy)


def test_one_large_tensor_cannot_vouch_for_the_rank_of_every_module(
    load_tiny, adapter_copy, monkeypatch
):
    # A 0.4 MB adapter: r=400,000 on the attention layers and one (400000, 1) uint8 lora_A.
    # The rank check took the largest saved rank; peft then asked for ~13 GB on the tiny
    # model, ~370 GB on Florence-2-base (fourteenth hostile review).
    import peft

    weights = adapter_copy / "adapter_model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if "lora_A" in k)
    save_file({name: torch.zeros(400_000, 1, dtype=torch.uint8)}, weights)
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    (adapter_copy / "adapter_config.json").write_text(json.dumps({**config, "r": 400_000}))
    florence = load_tiny()
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(AdapterError, match=r"asks for LoRA matrices of about [\d,]+ numbers"):
        load_adapter(florence, adapter_copy)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_1000000000"])
def test_loading_never_runs_an_initialisation_that_rewrites_the_base_weights(
    load_tiny, adapter_copy, saved_adapter, init
):
    # PiSSA and OLoRA subtract from the base weights while peft builds the layers (and PiSSA
    # with a billion iterations runs for ever); the saved tensors replace every initial value,
    # so loading starts from plain LoRA, and a refused load leaves the base model as it was.
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    (adapter_copy / "adapter_config.json").write_text(
        json.dumps({**config, "init_lora_weights": init})
    )
    weights = adapter_copy / "adapter_model.safetensors"
    whole = load_file(weights)
    florence = load_tiny()
    before = _logits(florence)
    adapted = load_adapter(load_tiny(), adapter_copy)
    reference = load_adapter(load_tiny(), saved_adapter)
    assert torch.equal(_logits(adapted), _logits(reference))
    save_file(dict(list(whole.items())[1:]), weights)  # a tensor missing: refused
    with pytest.raises(AdapterError):
        load_adapter(florence, adapter_copy)
    _assert_untouched(florence, before)


@pytest.mark.parametrize(
    "field, value",
    [("layer_replication", [[0, 1000000]]), ("loftq_config", {"loftq_bits": 4})],
)
def test_adapter_settings_that_change_the_model_while_loading_are_refused(
    load_tiny, adapter_copy, field, value
):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    (adapter_copy / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    florence = load_tiny()
    before = _logits(florence)
    with pytest.raises(AdapterError, match=f"sets {field}"):
        load_adapter(florence, adapter_copy)
    _assert_untouched(florence, before)


# Patterns peft turns into regular expressions, each with a pattern that backtracks for ever
# against a module name of the tiny model (ninth hostile review): refused within the deadline.
_BACKTRACKS = r"((\w|\.)+)+!"


@pytest.mark.parametrize(
    "change",
    [
        {"target_modules": _BACKTRACKS},
        {"exclude_modules": _BACKTRACKS},
        {"rank_pattern": {_BACKTRACKS: 4}},
        {"alpha_pattern": {_BACKTRACKS: 8}},
        {"modules_to_save": [_BACKTRACKS]},
        {"layers_pattern": [_BACKTRACKS], "layers_to_transform": [0]},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_module_pattern_that_backtracks_for_ever_is_refused_in_bounded_time(
    load_tiny, adapter_copy, change, monkeypatch
):
    import time

    import peft

    from florence_helpers.model import adapter_files

    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    (adapter_copy / "adapter_config.json").write_text(json.dumps({**config, **change}))
    florence = load_tiny()
    monkeypatch.setattr(adapter_files, "PATTERN_SECONDS", 2.0)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: pytest.fail("built"))
    started = time.monotonic()
    with pytest.raises(AdapterError, match=r"take more than 2 s to match the model's \d+ module"):
        load_adapter(florence, adapter_copy)
    assert time.monotonic() - started < 30


def test_a_pattern_that_is_not_a_regular_expression_is_named(load_tiny, adapter_copy):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["rank_pattern"] = {"fc1": 4, "(unclosed": 4}
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"rank_pattern holds '\(unclosed', which is not a"):
        load_adapter(load_tiny(), adapter_copy)


def test_patterns_a_person_writes_still_load_and_apply(load_tiny, adapter_copy, saved_adapter):
    # The same adapter with its per-module ranks spelt as patterns: every pattern reaches peft.
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["rank_pattern"] = {r"encoder\.layers\.\d+\.fc1": 4, "decoder.*fc2": 4}
    config["alpha_pattern"] = {"fc1": config["lora_alpha"]}
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    adapted = load_adapter(load_tiny(), adapter_copy)
    loaded = adapted.model.peft_config["default"]
    assert loaded.rank_pattern == config["rank_pattern"]
    assert torch.equal(_logits(adapted), _logits(load_adapter(load_tiny(), saved_adapter)))


@pytest.mark.parametrize(
    "field, value",
    [
        ("trainable_token_indices", [0] * 1000),
        ("target_parameters", ["weight"]),
        ("use_qalora", True),
        ("eva_config", {"rho": 2.0}),
        # {} is no "unset" to peft: it builds the variant, and KaSA rewrote the base weights
        # even when the load was then refused (tenth hostile review).
        ("kasa_config", {}),
        ("velora_config", {}),
        ("monteclora_config", {}),
        ("layer_replication", []),
    ],
)
def test_peft_settings_beyond_plain_lora_are_refused_before_peft_runs(
    load_tiny, adapter_copy, field, value, monkeypatch
):
    # trainable_token_indices made peft allocate two rows per entry: a 2 MB configuration
    # cost 1.5 GB on the tiny model (ninth hostile review); every such setting is refused.
    import peft

    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    (adapter_copy / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(AdapterError, match=f"sets {field}"):
        load_adapter(load_tiny(), adapter_copy)


def test_a_list_of_a_million_modules_is_refused(load_tiny, adapter_copy):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["target_modules"] = ["fc1"] * 1_000_000
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"target_modules is .* with at most 10,000 entries"):
        load_adapter(load_tiny(), adapter_copy)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_an_adapter_config_that_is_not_a_small_file_is_refused(load_tiny, adapter_copy, kind):
    config = adapter_copy / "adapter_config.json"
    config.unlink()
    if kind == "fifo":
        os.mkfifo(config)  # a reader would wait for a writer for ever
    elif kind == "dev-zero":
        config.symlink_to("/dev/zero")
    else:
        with open(config, "wb") as handle:  # sparse: no disk space, 20 GB to read
            handle.truncate(20 * 2**30)
    with pytest.raises(AdapterError, match=r"not a regular file|more than the 16.0 MiB"):
        load_adapter(load_tiny(), adapter_copy)


def test_module_patterns_match_as_peft_itself_matches_them(load_tiny, tmp_path):
    # The bounded matcher must pick what peft picks: checked against peft's own functions.
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    from florence_helpers.model.adapter_files import match_module_patterns

    names = [name for name, _ in load_tiny().model.named_modules()]
    ranks = {r"encoder\.layers\.\d+\.fc1": 2, "fc1": 3, "decoder.*(q|k)_proj": 4, "out_proj": 5}
    for target in (r".*\.(fc1|fc2)", ["fc1", "self_attn.q_proj"], "language_model.*proj"):
        config = {"target_modules": target, "rank_pattern": ranks}
        first = match_module_patterns(config, names, tmp_path / "adapter_config.json")
        peft_config = LoraConfig(target_modules=target, rank_pattern=ranks)
        for name, index in zip(names, first["target_modules"], strict=True):
            assert (index is not None) == bool(check_target_module_exists(peft_config, name))
        keys = list(ranks)
        for name, index in zip(names, first["rank_pattern"], strict=True):
            expected = get_pattern_key(keys, name)
            assert (keys[index] if index is not None else name) == expected, name


def test_a_target_pattern_that_backtracks_on_an_embedding_name_is_refused(
    load_tiny, adapter_copy, monkeypatch
):
    # peft also matches a string target_modules against its embedding layer names
    # ("embed_tokens", which is no module name here): a pattern that fails fast on every module
    # backtracked for hours on it (tenth hostile review).
    import peft

    from florence_helpers.model import adapter_files

    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["target_modules"] += "|e" + r"\w*" * 40 + "!"
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(adapter_files, "PATTERN_SECONDS", 2.0)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(AdapterError, match=r"take more than 2 s to match"):
        load_adapter(load_tiny(), adapter_copy)


def test_more_pattern_keys_than_pythons_regex_cache_are_refused(load_tiny, adapter_copy):
    # 550 slow-to-compile rank_pattern keys passed the timed check (each compiled once), then
    # peft compiled each again for every module for minutes (eleventh hostile review).
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["rank_pattern"] = {f"fc1_{i}": 4 for i in range(129)}
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"at most 128 keys of at most 1,000 characters"):
        load_adapter(load_tiny(), adapter_copy)
