"""Remote-code checkpoints and adapters converted to the native classes, and clear errors.

A remote-code checkpoint is built here from the tiny native model, with the names, config and
tokenizer laid out as Microsoft's original repositories have them (the reverse of the mapping
in transformers' conversion script, written independently of the converter under test).
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Florence2ForConditionalGeneration

from florence_helpers import ModelNotAvailableError, load_model
from florence_helpers.boundary.outputs import OutputError
from florence_helpers.model.adapters import add_lora, load_adapter, save_adapter
from florence_helpers.model.checkpoint_files import checkpoint_layout
from florence_helpers.model.convert import FLORENCE_SPECIAL_TOKENS, convert, convert_checkpoint
from florence_helpers.model.weight_files import CheckpointError
from florence_helpers.testing import build_tiny_tokenizer

_TO_REMOTE = [
    (r"^model\.vision_tower\.convs\.(\d+)\.conv\.", r"vision_tower.convs.\1.proj."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"\.(conv[12])\.", r".\1.fn.dw."),
    (r"\.spatial_block\.norm1\.", ".spatial_block.window_attn.norm."),
    (r"\.channel_block\.norm1\.", ".channel_block.channel_attn.norm."),
    (r"\.(window_attn|channel_attn)\.(qkv|proj)\.", r".\1.fn.\2."),
    (r"\.norm2\.", ".ffn.norm."),
    (r"\.ffn\.(fc[12])\.", r".ffn.fn.net.\1."),
    (r"^model\.multi_modal_projector\.image_projection\.weight$", "image_projection"),
    (r"^model\.multi_modal_projector\.image_position_embed\.", "image_pos_embed."),
    (r"^model\.multi_modal_projector\.", ""),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]
EMBEDDINGS = ("shared.weight", "embed_tokens.weight", "lm_head.weight")


def remote_name(native: str) -> str:
    for pattern, replacement in _TO_REMOTE:
        native = re.sub(pattern, replacement, native)
    return native


def write_remote_checkpoint(native_dir, out, extra_token=None):
    """The tiny model in the original remote-code layout, as microsoft/Florence-2-* stores it.

    With ``extra_token``, as a fine-tune that added a token of its own saves it: the tokenizer
    holds Florence-2's tokens and the extra one, and the weights have a row for it.
    """
    out.mkdir()
    model = Florence2ForConditionalGeneration.from_pretrained(native_dir)
    tokenizer = build_tiny_tokenizer(florence_tokens=False)
    vocab = len(tokenizer) + len(FLORENCE_SPECIAL_TOKENS)  # the rows the remote model has
    if extra_token is not None:
        tokenizer.add_tokens(list(FLORENCE_SPECIAL_TOKENS) + [extra_token], special_tokens=True)
        vocab += 1  # the tiny model's <image> row stands in for the new token's row
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(EMBEDDINGS):
            tensor = tensor[:vocab]
        if name.endswith("image_projection.weight"):
            tensor = tensor.t()
        state[remote_name(name)] = tensor.clone().contiguous()
    save_file(state, out / "model.safetensors")
    native = model.config
    text = {**native.text_config.to_dict(), "model_type": "florence2_language", "vocab_size": vocab}
    vision = native.vision_config
    config = {
        "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_florence2.Florence2Config",
            "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration",
        },
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "ignore_index": -100,
        "is_encoder_decoder": True,
        "model_type": "florence2",
        "projection_dim": vision.projection_dim,
        "text_config": text,
        "vision_config": {
            "model_type": "",
            "drop_path_rate": 0.1,
            "patch_size": list(vision.patch_size),
            "patch_stride": list(vision.patch_stride),
            "patch_padding": list(vision.patch_padding),
            "patch_prenorm": list(vision.patch_prenorm),
            "enable_checkpoint": False,
            "dim_embed": list(vision.embed_dim),
            "num_heads": list(vision.num_heads),
            "num_groups": list(vision.num_groups),
            "depths": list(vision.depths),
            "window_size": vision.window_size,
            "projection_dim": vision.projection_dim,
            "visual_temporal_embedding": {
                "type": "COSINE",
                "max_temporal_embeddings": vision.max_temporal_embeddings,
            },
            "image_pos_embed": {
                "type": "learned_abs_2d",
                "max_pos_embeddings": vision.max_position_embeddings,
            },
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
        "torch_dtype": "float32",
        "transformers_version": "4.41.0.dev0",
        "vocab_size": vocab,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "BartTokenizer"
    (out / "tokenizer_config.json").write_text(json.dumps(settings))
    side = json.loads((native_dir / "processor_config.json").read_text())["image_processor"]["size"]
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "auto_map": {"AutoProcessor": "processing_florence2.Florence2Processor"},
                "crop_size": side,
                "do_center_crop": False,
                "do_normalize": True,
                "do_rescale": True,
                "do_resize": True,
                "image_mean": [0.485, 0.456, 0.406],
                "image_processor_type": "CLIPImageProcessor",
                "image_seq_length": 1 + (side["height"] // 32) ** 2,
                "image_std": [0.229, 0.224, 0.225],
                "processor_class": "Florence2Processor",
                "resample": 3,
                "rescale_factor": 1 / 255,
                "size": side,
            }
        )
    )
    for module in ("configuration", "modeling", "processing"):
        (out / f"{module}_florence2.py").write_text("# the original remote code\n")
    return out


@pytest.fixture(scope="module")
def remote(tiny_model_dir, tmp_path_factory):
    return write_remote_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("remote") / "old")


def logits(florence, image, prompt="<OD>"):
    inputs = florence.processor(text=prompt, images=image, return_tensors="pt")
    answer = torch.tensor([[2, 0, 100, 200, 300, 2]])
    with torch.no_grad():
        return florence.model(**inputs, decoder_input_ids=answer).logits


@pytest.fixture
def picture():
    return Image.new("RGB", (160, 120), (40, 120, 200))


def test_a_remote_checkpoint_converts_to_the_same_model(remote, florence, tmp_path, picture):
    assert checkpoint_layout(remote) == "remote-code"
    with pytest.raises(ModelNotAvailableError, match=r"python -m florence_helpers convert"):
        load_model(remote, device="cpu")
    new = convert_checkpoint(remote, tmp_path / "native")
    assert checkpoint_layout(new) == "native"
    converted = load_model(new, device="cpu", dtype="float32")
    vocab = json.loads((remote / "config.json").read_text())["vocab_size"]
    torch.testing.assert_close(
        logits(converted, picture)[..., :vocab], logits(florence, picture)[..., :vocab]
    )
    tokenizer = converted.processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(
        "<loc_0>"
    ) == florence.processor.tokenizer.convert_tokens_to_ids("<loc_0>")
    assert converted.model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")


def test_a_remote_lora_adapter_converts_too(remote, load_tiny, tmp_path, picture):
    lora = add_lora(load_tiny(), rank=4, seed=0)
    with torch.no_grad():
        for name, parameter in lora.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    native_adapter = save_adapter(lora, tmp_path / "native-adapter")
    # The same adapter as the remote-code model would have saved it.
    old = tmp_path / "remote-adapter"
    old.mkdir()
    state = load_file(native_adapter / "adapter_model.safetensors")
    prefix = "base_model.model."
    save_file(
        {prefix + remote_name(k[len(prefix) :]): v for k, v in state.items()},
        old / "adapter_model.safetensors",
    )
    (old / "adapter_config.json").write_text((native_adapter / "adapter_config.json").read_text())
    model_dir = convert(remote, tmp_path / "model")
    adapter_dir = convert(old, tmp_path / "adapter")
    reloaded = load_adapter(load_model(model_dir, device="cpu", dtype="float32"), adapter_dir)
    vocab = json.loads((remote / "config.json").read_text())["vocab_size"]
    torch.testing.assert_close(
        logits(reloaded, picture)[..., :vocab], logits(lora, picture)[..., :vocab]
    )


def test_a_fine_tunes_own_token_keeps_its_id(tiny_model_dir, tmp_path, picture):
    old = write_remote_checkpoint(tiny_model_dir, tmp_path / "old", extra_token="<DocVQA>")
    vocab = json.loads((old / "config.json").read_text())["vocab_size"]
    converted = load_model(convert(old, tmp_path / "new"), device="cpu", dtype="float32")
    tokenizer = converted.processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<DocVQA>") == vocab - 1
    assert tokenizer.convert_tokens_to_ids("<image>") == vocab
    assert logits(converted, picture, "<DocVQA>What is it?").shape[-1] >= vocab + 1


def test_bad_inputs_are_named(remote, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty holds no model checkpoint"):
        convert_checkpoint(empty, tmp_path / "out")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"bert checkpoint, not Florence-2"):
        convert_checkpoint(other, tmp_path / "out")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((remote / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no-weights has a Florence-2 config.json but no"):
        convert_checkpoint(no_weights, tmp_path / "out")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(remote, taken)
    assert (taken / "keep.txt").read_text() == "mine"


def test_a_failed_conversion_leaves_nothing_behind(remote, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Florence2ForConditionalGeneration, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(remote, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_model_names_what_a_folder_is(tmp_path, remote):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelNotAvailableError, match="not Florence-2"):
        load_model(other, device="cpu")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((remote / "config.json").read_text())
    with pytest.raises(ModelNotAvailableError, match="no weights"):
        load_model(no_weights, device="cpu")


def test_the_convert_command(remote, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "florence_helpers", "convert", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = cli(str(remote), str(tmp_path / "new"))
    assert done.returncode == 0, done.stderr
    assert checkpoint_layout(tmp_path / "new") == "native"
    again = cli(str(remote), str(tmp_path / "new"))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        ("Unrecognized model type for subconfig: florence2_language", "convert ./Florence-2-x"),
        ("size mismatch for lm_head.weight", "were read from the Hugging Face Hub"),
    ],
)
def test_a_hub_checkpoint_that_fails_to_load_is_not_blamed_on_the_network(
    monkeypatch, detail, expected
):
    import transformers

    import florence_helpers.model.loading as model

    monkeypatch.setattr(model, "_hub_reachable", lambda name: True)

    def failing(*args, **kwargs):
        raise ValueError(detail)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", failing)
    with pytest.raises(ModelNotAvailableError) as raised:
        load_model("someone/Florence-2-x", device="cpu")
    assert expected in str(raised.value)
    assert "could not be reached" not in str(raised.value)


# --- convert on damaged inputs and refused or failing outputs ----------------------------------
#
# The contract: convert raises CheckpointError (a bad input; the message names the file),
# OutputError (a refused output, before anything is read) or OSError (writing failed; one
# sentence naming NEW), never anything else, and leaves nothing behind.


def _left_in(folder):
    """Everything in ``folder``, hidden temporary folders included."""
    return sorted(path.name for path in folder.iterdir())


class _RunsCode:
    """A pickle that would create ``marker`` when unpickled unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _edit_config(change):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _cut_in_half(name):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return edit


def _pickle_instead_of_safetensors(folder):
    (folder / "model.safetensors").unlink()
    torch.save({"weights": _RunsCode(folder.parent / "pickle-ran")}, folder / "pytorch_model.bin")


class _RunsCommand:
    """A pickle that would run a shell command when unpickled unsafely (torch words its
    refusal of a blocked module differently from that of another callable)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_running_a_command(folder):
    (folder / "model.safetensors").unlink()
    payload = {"weights": _RunsCommand(folder.parent / "pickle-ran")}
    torch.save(payload, folder / "pytorch_model.bin")


def _garbage_bin(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"this is not a pickle, nor a zip archive")


def _bin_of_a_list(folder):
    (folder / "model.safetensors").unlink()
    torch.save([torch.zeros(3)], folder / "pytorch_model.bin")


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        pytest.param(
            _cut_in_half("model.safetensors"),
            "model.safetensors",
            r"safetensors file is damaged or cut short",
            id="truncated-safetensors",
        ),
        pytest.param(
            _pickle_instead_of_safetensors,
            "pytorch_model.bin",
            r"pickle file holding more than tensors, which is refused.*weights_only=False",
            id="pickle-with-code",
        ),
        pytest.param(
            _pickle_running_a_command,
            "pytorch_model.bin",
            r"pickle file holding more than tensors, which is refused",
            id="pickle-with-os-system",
        ),
        pytest.param(
            _garbage_bin,
            "pytorch_model.bin",
            r"is not a readable PyTorch weight file",
            id="bin-not-a-pickle",
        ),
        pytest.param(
            _bin_of_a_list,
            "pytorch_model.bin",
            r"holds a list, not a mapping of weight names to tensors",
            id="bin-of-a-list",
        ),
        pytest.param(
            lambda f: (f / "config.json").write_text("[]"),
            "config.json",
            r"holds a JSON list, not a model configuration",
            id="config-is-a-list",
        ),
        pytest.param(
            lambda f: (f / "config.json").write_text('{"model_type": "florence2",'),
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
            lambda f: (f / "config.json").write_text("[" * 100_000),
            "config.json",
            r"nested too deeply|is not valid JSON",
            id="config-nested-deeply",
        ),
        pytest.param(
            lambda f: (f / "model.safetensors.index.json").write_text(
                '{"weight_map": {"a": "../../outside.safetensors"}}'
            ),
            "model.safetensors.index.json",
            r"names the weight file '\.\./\.\./outside\.safetensors', which is not a file name",
            id="index-names-a-file-outside",
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
            _edit_config(lambda c: c["vision_config"].update(depths=[1, 1])),
            "config.json",
            r"per-stage settings disagree on the number of stages \(depths has 2",
            id="vision-stages-disagree",
        ),
        pytest.param(
            _edit_config(lambda c: c["text_config"].update(encoder_attention_heads=3)),
            "config.json",
            r"encoder_attention_heads \(3\) does not divide text_config\.d_model",
            id="heads-do-not-divide",
        ),
        pytest.param(
            _edit_config(lambda c: c["text_config"].update(activation_function=5)),
            "config.json",
            r"text_config\.activation_function is 5, but must be str",
            id="activation-5",
        ),
        pytest.param(
            _edit_config(lambda c: c["text_config"].update(num_beams="3")),
            "config.json",
            r"text_config\.num_beams is '3', which is not a valid generation setting",
            id="num-beams-text",
        ),
        pytest.param(
            _edit_config(lambda c: c.pop("model_type")),
            "config.json",
            r"has no model_type",
            id="no-model-type",
        ),
        pytest.param(
            lambda f: (f / "tokenizer.json").write_text("{cut sho"),
            "tokenizer.json",
            r"Could not read the tokenizer or image processor",
            id="tokenizer-damaged",
        ),
    ],
)
def test_convert_names_a_damaged_checkpoint_file(remote, tmp_path, damage, file, message):
    old = tmp_path / "old"
    shutil.copytree(remote, old)
    damage(old)
    with pytest.raises(CheckpointError, match=message) as raised:
        convert(old, tmp_path / "new")
    # The file is named: the file itself, or (for the tokenizer) its folder and its name.
    assert str(old / file) in str(raised.value) or (
        str(old) in str(raised.value) and file in str(raised.value)
    )
    assert _left_in(tmp_path) == ["old"]  # no output, no temporary folder, no pickle run


def test_the_pickle_in_a_checkpoint_never_runs(remote, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(remote, old)
    _pickle_instead_of_safetensors(old)
    # checkpoint_layout reads only the header of a safetensors file; the .bin is read whole.
    with pytest.raises(CheckpointError, match="pickle file holding more than tensors"):
        convert_checkpoint(old, tmp_path / "new")
    assert not (tmp_path / "pickle-ran").exists()


@pytest.fixture(scope="module")
def remote_adapter(load_tiny, tmp_path_factory):
    """A LoRA adapter on the tiny model (16 modules, 32 tensors), saved under the remote-code
    model's names, as an adapter trained on Microsoft's model is."""
    root = tmp_path_factory.mktemp("remote-adapter")
    lora = add_lora(load_tiny(), rank=4, seed=0)
    with torch.no_grad():
        for name, parameter in lora.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    native = save_adapter(lora, root / "native")
    old = root / "old"
    old.mkdir()
    state = load_file(native / "adapter_model.safetensors")
    prefix = "base_model.model."
    save_file(
        {prefix + remote_name(k[len(prefix) :]): v for k, v in state.items()},
        old / "adapter_model.safetensors",
    )
    (old / "adapter_config.json").write_text((native / "adapter_config.json").read_text())
    return old


def _edit_adapter_config(change):
    def edit(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        change(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))

    return edit


def _drop_half_the_lora_b(folder):
    state = load_file(folder / "adapter_model.safetensors")
    dropped = sorted(k for k in state if ".lora_B." in k)[::2]
    save_file(
        {k: v for k, v in state.items() if k not in dropped}, folder / "adapter_model.safetensors"
    )


def _adapter_pickle(folder):
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"weights": _RunsCode(folder.parent / "pickle-ran")}, folder / "adapter_model.bin")


def _wrong_rank(folder):
    state = load_file(folder / "adapter_model.safetensors")
    key = sorted(k for k in state if ".lora_B." in k)[0]
    state[key] = torch.zeros(state[key].shape[0], 3)
    save_file(state, folder / "adapter_model.safetensors")


def _empty_pair(folder):
    # A pair of empty matrices of rank 10^9 (no data): an lm_head's lora_B padded to the native
    # vocabulary from such a pair asked for 256 GB.
    state = load_file(folder / "adapter_model.safetensors")
    key = sorted(k for k in state if ".lora_B." in k)[0]
    state[key] = torch.zeros(0, 10**9)
    state[key.replace(".lora_B.", ".lora_A.")] = torch.zeros(10**9, 0)
    save_file(state, folder / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        pytest.param(
            _cut_in_half("adapter_model.safetensors"),
            "adapter_model.safetensors",
            r"safetensors file is damaged or cut short",
            id="truncated-safetensors",
        ),
        pytest.param(
            _empty_pair,
            "adapter_model.safetensors",
            r"is empty \(shape \(",
            id="empty-pair-of-rank-a-billion",
        ),
        pytest.param(
            _adapter_pickle,
            "adapter_model.bin",
            r"pickle file holding more than tensors",
            id="pickle-with-code",
        ),
        pytest.param(
            _drop_half_the_lora_b,
            "adapter_model.safetensors",
            r"is incomplete: 8 LoRA weights are missing \(base_model\.model\..*\.lora_B\.weight",
            id="8-of-16-lora-b-missing",
        ),
        pytest.param(
            _wrong_rank,
            "adapter_model.safetensors",
            r"are not a LoRA pair",
            id="ranks-disagree",
        ),
        pytest.param(
            lambda f: (f / "adapter_config.json").write_text("[]"),
            "adapter_config.json",
            r"holds a JSON list, not an adapter configuration",
            id="config-is-a-list",
        ),
        pytest.param(
            lambda f: (f / "adapter_config.json").write_text("{"),
            "adapter_config.json",
            r"is not valid JSON",
            id="config-not-json",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.update(r="4")),
            "adapter_config.json",
            r"the rank r must be a whole number of at least 1, got '4'",
            id="rank-text",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.update(target_modules=5)),
            "adapter_config.json",
            r"target_modules is 5, but must be a string or a list of strings",
            id="target-modules-5",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.update(rank_pattern=[])),
            "adapter_config.json",
            r"rank_pattern is \[\], but must be an object",
            id="rank-pattern-list",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.update(lora_alpha="big")),
            "adapter_config.json",
            r"lora_alpha is 'big', but must be a number",
            id="alpha-text",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.update(modules_to_save="lm_head")),
            "adapter_config.json",
            r"modules_to_save is 'lm_head', but must be a list of strings",
            id="modules-to-save-text",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.pop("peft_type")),
            "adapter_config.json",
            r"has no 'peft_type'",
            id="no-peft-type",
        ),
        pytest.param(
            _edit_adapter_config(lambda c: c.pop("r")),
            "adapter_config.json",
            r"has no 'r'",
            id="no-rank",
        ),
    ],
)
def test_convert_names_a_damaged_adapter_file(remote_adapter, tmp_path, damage, file, message):
    old = tmp_path / "old"
    shutil.copytree(remote_adapter, old)
    damage(old)
    with pytest.raises(CheckpointError, match=message) as raised:
        convert(old, tmp_path / "new")
    assert str(old / file) in str(raised.value)
    assert _left_in(tmp_path) == ["old"]


def test_new_is_checked_before_old_is_read(tmp_path, monkeypatch):
    import florence_helpers.model.convert as checkpoints
    import florence_helpers.model.convert_adapter as adapters

    def never(*args, **kwargs):
        raise AssertionError("the input was read before NEW was checked")

    monkeypatch.setattr(checkpoints, "checkpoint_layout", never)
    monkeypatch.setattr(adapters, "_read_adapter_config", never)
    taken = tmp_path / "labels.txt"
    taken.write_text("mine")
    # OLD does not even exist: NEW is refused first.
    with pytest.raises(OutputError, match=r"labels\.txt exists and is not a folder"):
        convert(tmp_path / "nowhere", taken)
    assert taken.read_text() == "mine"


@pytest.mark.parametrize("kind", ["checkpoint", "adapter"])
@pytest.mark.parametrize(
    ("place", "message"),
    [
        ("a-file", r"exists and is not a folder"),
        ("under-a-file", r"cannot be created: .*a-file is a file"),
        ("old-itself", r"is or holds the input"),
        ("above-old", r"is or holds the input"),
    ],
)
def test_convert_refuses_an_output_that_cannot_be_a_new_folder(
    remote, remote_adapter, tmp_path, kind, place, message
):
    old = tmp_path / "inputs" / "old"
    shutil.copytree(remote if kind == "checkpoint" else remote_adapter, old)
    (tmp_path / "a-file").write_text("mine")
    new = {
        "a-file": tmp_path / "a-file",
        "under-a-file": tmp_path / "a-file" / "new",
        "old-itself": old,
        "above-old": tmp_path / "inputs",
    }[place]
    before = {path: path.read_bytes() for path in old.iterdir()}
    with pytest.raises(OutputError, match=message):
        convert(old, new, overwrite=True)  # overwrite would have deleted the input
    assert {path: path.read_bytes() for path in old.iterdir()} == before
    assert (tmp_path / "a-file").read_text() == "mine"
    assert _left_in(tmp_path) == ["a-file", "inputs"]
    assert _left_in(tmp_path / "inputs") == ["old"]


_FULL_DISK = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
from florence_helpers.model.convert import convert
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
try:
    convert(sys.argv[1], sys.argv[2], overwrite=True)
    print(json.dumps({"type": None}))
except BaseException as error:
    print(json.dumps({"type": type(error).__name__, "errno": getattr(error, "errno", None),
                      "message": str(error), "strerror": getattr(error, "strerror", None)}))
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "overwrite"])
def test_a_full_disk_is_one_clear_oserror_and_leaves_nothing(remote, tmp_path, existing):
    import errno
    import subprocess
    import sys

    new = tmp_path / "out" / "new"
    new.parent.mkdir()
    if existing:
        new.mkdir()
        earlier_conversion(new)
    # Files may grow to 1 MB: the tokenizer fits, the 3 MB of weights do not (part-way).
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(remote), str(new), str(1_000_000)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["type"] == "OSError", outcome
    assert outcome["errno"] == errno.EFBIG
    assert outcome["strerror"].startswith(f"Could not write {new}: File too large")
    assert "Traceback" not in done.stderr
    if existing:
        assert _left_in(new.parent) == ["new"]
        assert _left_in(new) == ["config.json", "keep.txt"]
        assert (new / "keep.txt").read_text() == "the earlier conversion"
        assert f"{new} is as it was" in outcome["message"]
    else:
        assert _left_in(new.parent) == []


def test_a_disk_full_while_writing_an_adapter_leaves_nothing(remote_adapter, tmp_path, monkeypatch):
    import errno

    written = []

    def write_then_fail(self, data):
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])  # part of the file reached the disk
        written.append(self)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", write_then_fail)
    new = tmp_path / "made" / "for" / "new"  # parent folders made for it go too
    with pytest.raises(OSError) as raised:
        convert(remote_adapter, new)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.strerror == (
        f"Could not write {new}: No space left on device (the conversion was not saved; "
        "nothing was left behind)."
    )
    assert written and not written[0].exists()
    assert _left_in(tmp_path) == []


def _read_only(folder):
    """Make ``folder`` refuse new entries, for root too where possible; a cleanup function,
    or a skip with the reason."""
    import subprocess

    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    # chmod does not stop root; the immutable attribute does, where the filesystem has it.
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(
            "running as root, where a 0o555 folder is still writable, and chattr +i is not "
            f"available here ({done.stderr.strip() or 'no chattr'})"
        )
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_destination_is_one_clear_oserror(remote, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    undo = _read_only(parent)
    try:
        with pytest.raises(OSError) as raised:
            convert(remote, parent / "new")
        assert _left_in(parent) == []
    finally:
        undo()
    assert type(raised.value) in (PermissionError, OSError)
    reason = raised.value.strerror
    assert reason.startswith(f"Could not write {parent / 'new'}: ")
    assert "Permission denied" in reason or "Operation not permitted" in reason
    assert "nothing was left behind" in reason


def earlier_conversion(folder: Path) -> None:
    """What an earlier ``convert`` left (its config), plus a file the user added."""
    (folder / "config.json").write_text('{"model_type": "florence2"}')
    (folder / "keep.txt").write_text("the earlier conversion")


def test_overwrite_replaces_only_a_checkpoint_never_the_users_folders(
    remote, tmp_path, monkeypatch
):
    import subprocess
    import sys

    thesis = tmp_path / "thesis"
    (thesis / "figures").mkdir(parents=True)
    (thesis / "chapter1.tex").write_text("two years of work")
    before = sorted(p.name for p in thesis.rglob("*"))
    for new, cwd, message in [
        (".", thesis, "the current folder"),
        ("..", thesis / "figures", "the current folder"),
        (str(thesis), tmp_path, "not a Florence-2 checkpoint or adapter"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "florence_helpers", "convert", str(remote), new, "--overwrite"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=cwd,
        )
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert sorted(p.name for p in thesis.rglob("*")) == before
    monkeypatch.setenv("HOME", str(thesis / "figures"))
    with pytest.raises(OutputError, match="your home folder"):
        convert(remote, thesis, overwrite=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (thesis / "config.json").write_text('{"model_type": "florence2"}')
    convert(remote, thesis, overwrite=True)  # an earlier conversion, with a user's file in it
    assert checkpoint_layout(thesis) == "native" and not (thesis / "chapter1.tex").exists()


def test_an_overwrite_that_fails_part_way_keeps_the_old_new(remote, tmp_path, monkeypatch):
    new = tmp_path / "new"
    new.mkdir()
    earlier_conversion(new)

    def fails_after_the_weights(self, folder, *args, **kwargs):
        (Path(folder) / "tokenizer.json").write_text("{half")
        raise OSError(28, "No space left on device")

    from transformers import Florence2Processor

    monkeypatch.setattr(Florence2Processor, "save_pretrained", fails_after_the_weights)
    with pytest.raises(OSError, match=rf"{new}: No space left on device .*{new} is as it was"):
        convert(remote, new, overwrite=True)
    assert _left_in(tmp_path) == ["new"]
    assert _left_in(new) == ["config.json", "keep.txt"]


def test_an_overwrite_that_fails_at_the_swap_puts_the_old_new_back(remote, tmp_path, monkeypatch):
    import florence_helpers.model.convert_output as checkpoints

    new = tmp_path / "new"
    new.mkdir()
    earlier_conversion(new)
    real, moves_in = os.replace, []

    def fails_moving_the_conversion_in(source, target):
        if Path(target) == new:
            moves_in.append(source)
            if len(moves_in) == 1:  # the conversion; the second one puts the old NEW back
                raise OSError(5, "Input/output error")
        return real(source, target)

    monkeypatch.setattr(checkpoints.os, "replace", fails_moving_the_conversion_in)
    with pytest.raises(OSError, match=r"Input/output error"):
        convert(remote, new, overwrite=True)
    assert _left_in(tmp_path) == ["new"]
    assert _left_in(new) == ["config.json", "keep.txt"]


def test_an_overwrite_through_a_link_keeps_the_link_and_the_folder_s_mode(remote, tmp_path):
    disk = tmp_path / "big-disk" / "model"
    disk.mkdir(parents=True)
    earlier_conversion(disk)
    disk.chmod(0o700)
    link = tmp_path / "current"
    link.symlink_to(disk)
    convert(remote, link, overwrite=True)
    assert link.is_symlink() and link.resolve() == disk
    assert checkpoint_layout(disk) == "native" and not (disk / "keep.txt").exists()
    assert disk.stat().st_mode & 0o777 == 0o700


def test_an_overwrite_replaces_the_old_new_whole(remote, tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    earlier_conversion(new)
    convert(remote, new, overwrite=True)
    assert checkpoint_layout(new) == "native"
    assert not (new / "keep.txt").exists()
    assert _left_in(tmp_path) == ["new"]


def test_converted_and_saved_files_get_the_usual_mode(remote, tmp_path, load_tiny):
    umask = os.umask(0o022)
    os.umask(umask)
    adapter = save_adapter(add_lora(load_tiny(), rank=2, seed=0), tmp_path / "adapter")
    for folder in (convert(remote, tmp_path / "new"), adapter):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert set(modes.values()) == {0o666 & ~umask}, modes


def test_convert_copies_an_adapters_own_small_files_and_nothing_a_link_points_to(
    remote_adapter, tmp_path
):
    # The adapter folder's other files go along, but a symbolic link once gave the new folder
    # (the one a user publishes) the file it pointed to: /proc/self/environ with the user's
    # tokens, ~/.ssh/id_rsa. And a sparse file of 3 GB (52 kB on disk) was written out whole.
    old = tmp_path / "old"
    shutil.copytree(remote_adapter, old)
    (old / "README.md").write_text("# my adapter\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("hf_token_of_the_user")
    (old / "notes.txt").symlink_to(secret)
    (old / "environ").symlink_to("/proc/self/environ")
    with open(old / "huge.log", "wb") as handle:
        handle.truncate(3 * 2**30)
    os.mkfifo(old / "pipe")
    (old / "checkpoint-100").mkdir()
    with pytest.warns(UserWarning, match=r"Not copied into .*") as warned:
        new = convert(old, tmp_path / "new")
    message = str(warned[0].message)
    for name in ("environ (", "huge.log (", "notes.txt (", "pipe ("):
        assert name in message
    assert sorted(p.name for p in new.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (new / "README.md").read_text() == "# my adapter\n"
    assert not any(b"hf_token" in p.read_bytes() for p in new.iterdir())


def test_convert_matches_rank_patterns_in_bounded_time(remote_adapter, tmp_path, monkeypatch):
    from florence_helpers.model import adapter_files

    old = tmp_path / "old"
    shutil.copytree(remote_adapter, old)
    config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(
        json.dumps({**config, "rank_pattern": {r"((\w|\.)+)+!": 2}})
    )
    monkeypatch.setattr(adapter_files, "PATTERN_SECONDS", 2.0)
    with pytest.raises(CheckpointError, match=r"take more than 2 s to match"):
        convert(old, tmp_path / "new")
    assert _left_in(tmp_path) == ["old"]
