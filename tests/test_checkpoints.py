"""Remote-code checkpoints and adapters converted to the native classes, and clear errors.

A remote-code checkpoint is built here from the tiny native model, with the names, config and
tokenizer laid out as Microsoft's original repositories have them (the reverse of the mapping
in transformers' conversion script, written independently of the converter under test).
"""

import json
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Florence2ForConditionalGeneration

from florence_helpers import ModelNotAvailableError, load_model
from florence_helpers.adapters import add_lora, load_adapter, save_adapter
from florence_helpers.checkpoints import (
    FLORENCE_SPECIAL_TOKENS,
    CheckpointError,
    checkpoint_layout,
    convert,
    convert_checkpoint,
)
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

    import florence_helpers.model as model

    monkeypatch.setattr(model, "_hub_reachable", lambda name: True)

    def failing(*args, **kwargs):
        raise ValueError(detail)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", failing)
    with pytest.raises(ModelNotAvailableError) as raised:
        load_model("someone/Florence-2-x", device="cpu")
    assert expected in str(raised.value)
    assert "could not be reached" not in str(raised.value)
