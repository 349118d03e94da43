"""Record what Microsoft's own Florence-2 code does, as test data for the converter.

``florence_helpers.model.convert`` turns checkpoints written by Microsoft's remote code into the
native transformers format. Checking it against a remote-code layout that our own tests build
would share our mistakes, so this script runs Microsoft's files (``modeling_florence2.py``,
``configuration_florence2.py``, ``processing_florence2.py`` and the hub's ``config.json``,
``preprocessor_config.json`` and BART tokenizer files of ``microsoft/Florence-2-large``) and
writes, into ``tests/data/microsoft`` by default:

- ``hub/``: a tiny Florence-2 (the real 51,289-token vocabulary, tiny dimensions, every
  parameter random) in the hub layout: ``pytorch_model.bin`` in fp16 saved by Microsoft's
  classes, the hand-written ``config.json`` with tiny dimensions, the hub's own tokenizer,
  preprocessor (resized to 128 pixels) and ``generation_config.json``.
- ``saved/``: the same model as Microsoft's ``save_pretrained`` and its processor's write it
  (safetensors in fp32, re-serialised config, tokenizer with Florence-2's tokens added).
- ``adapter-*/``: LoRA adapters made by peft on Microsoft's model (attention, FFN, ``qkv``,
  ``proj`` and ``lm_head`` targets; and the target list of the widely copied Florence-2
  fine-tuning recipe).
- ``reference.json`` and ``reference.safetensors``: Microsoft's outputs for fixed inputs
  (processor ids and pixels, image features, encoder states, logits, greedy and 3-beam tokens
  under its own generation settings, post-processed answers, the banned grounding phrases,
  the effective generation config) and the weight names and shapes of the full-size base and
  large models.

Microsoft's code needs transformers 4.49 (it fails under 5.x) and two names from timm
(``DropPath``, ``trunc_normal_``); timm needs torchvision, which may not install, so a small
stand-in of those two is written next to the copied files. The script makes its own virtual
environment for that (``.cache/microsoft-reference``) unless ``--python`` names one, and never
touches the project's. Microsoft's code is read from the folder you give and is never copied
into the project.

Get the files from the hub repository ``microsoft/Florence-2-large`` (or a mirror such as the
GitHub repository ``zxyzxy8888/Florence-2-large`` at commit ``00d2f157``), then, from the repo
root::

    python tools/microsoft_reference.py path/to/Florence-2-large
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REFERENCE_VERSIONS = [
    "torch==2.13.0",
    "transformers==4.49.0",
    "tokenizers==0.21.4",
    "huggingface_hub==0.36.2",
    "peft==0.14.0",
    "einops==0.8.2",
    "safetensors==0.8.0",
    "pillow",
    "numpy",
]
MICROSOFT_FILES = (
    "modeling_florence2.py",
    "configuration_florence2.py",
    "processing_florence2.py",
    "config.json",
    "preprocessor_config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
)
CODE_FILES = MICROSOFT_FILES[:3]
HUB_DATA_FILES = MICROSOFT_FILES[4:]

IMAGE_SIDE = 128  # the tiny model's input: 4 x 4 patches after the vision tower, 17 tokens
TINY_VISION = {
    "dim_embed": [8, 16, 16, 32],
    "num_heads": [1, 2, 2, 4],
    "num_groups": [1, 2, 2, 4],
    "depths": [1, 1, 2, 1],
    "window_size": 2,
    "projection_dim": 8,
}
TINY_TEXT = {
    "d_model": 8,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "max_position_embeddings": 128,
}
# Florence-2-base differs from the large config.json in these fields (its hub config.json).
BASE_VISION = {
    "dim_embed": [128, 256, 512, 1024],
    "num_heads": [4, 8, 16, 32],
    "num_groups": [4, 8, 16, 32],
    "projection_dim": 768,
}
BASE_TEXT = {
    "d_model": 768,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 12,
    "decoder_attention_heads": 12,
    "encoder_ffn_dim": 3072,
    "decoder_ffn_dim": 3072,
    "max_position_embeddings": 1024,
}
ADAPTERS = {
    # Every kind of module people target: text attention and FFN, the vision tower's qkv and
    # proj (proj also names its patch-embedding convolutions), and the output layer.
    "adapter-all": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": [
            "q_proj",
            "k_proj",
            "v_proj",
            "out_proj",
            "fc1",
            "fc2",
            "qkv",
            "proj",
            "lm_head",
        ],
    },
    # The target list of the Florence-2 LoRA recipe most tutorials copy (o_proj, linear and
    # Conv2d match nothing in Florence-2), with its rsLoRA scaling.
    "adapter-recipe": {
        "r": 4,  # the recipe's rank is 8; 4 keeps the test data small
        "lora_alpha": 8,
        "use_rslora": True,
        "init_lora_weights": "gaussian",
        "task_type": "CAUSAL_LM",
        "target_modules": [
            "q_proj",
            "o_proj",
            "k_proj",
            "v_proj",
            "linear",
            "Conv2d",
            "lm_head",
            "fc2",
        ],
    },
}
# (task token, text input) pairs whose prompts, answers and tokens are recorded.
PROMPTS = [
    ("<CAPTION>", ""),
    ("<OD>", ""),
    ("<OCR_WITH_REGION>", ""),
    ("<CAPTION_TO_PHRASE_GROUNDING>", "A green car parked in front of a yellow building."),
    ("<OPEN_VOCABULARY_DETECTION>", "a traffic light"),
    ("<REGION_TO_DESCRIPTION>", "<loc_100><loc_200><loc_600><loc_700>"),
]
# Canned answers in Florence-2's grammar, post-processed by Microsoft's processor.
ANSWERS = [
    (
        "<CAPTION_TO_PHRASE_GROUNDING>",
        "</s><s>A man<loc_10><loc_20><loc_300><loc_400>it<loc_1><loc_2><loc_3><loc_4>"
        "the image<loc_0><loc_0><loc_999><loc_999>someone<loc_5><loc_6><loc_7><loc_8>"
        "a set<loc_9><loc_9><loc_90><loc_90>each other<loc_1><loc_1><loc_50><loc_50>"
        "my dog<loc_400><loc_500><loc_700><loc_900>other<loc_2><loc_2><loc_20><loc_20>"
        "lots<loc_3><loc_3><loc_30><loc_30>a red car<loc_100><loc_100><loc_200><loc_200>"
        "<loc_300><loc_300><loc_400><loc_400></s>",
    ),
    (
        "<OD>",
        "</s><s>car<loc_52><loc_333><loc_932><loc_774>wheel<loc_100><loc_600><loc_250>"
        "<loc_800><loc_700><loc_600><loc_850><loc_800></s>",
    ),
    (
        "<OCR_WITH_REGION>",
        "</s><s>FLORENCE CAFE<loc_100><loc_50><loc_900><loc_50><loc_900>"
        "<loc_150><loc_100><loc_150>Espresso 2.50<loc_120><loc_300><loc_500><loc_300><loc_500>"
        "<loc_360><loc_120><loc_360></s>",
    ),
    (
        "<REFERRING_EXPRESSION_SEGMENTATION>",
        "</s><s><loc_100><loc_100><loc_500><loc_120><loc_480><loc_600><loc_90><loc_580></s>",
    ),
    (
        "<OPEN_VOCABULARY_DETECTION>",
        "</s><s>a traffic light<loc_300><loc_100><loc_350><loc_300></s>",
    ),
    ("<CAPTION>", "</s><s>A green car parked in front of a yellow building.</s>"),
]
MAX_NEW_TOKENS = 24
DECODER_IDS = [2, 0, 50269, 50369, 50469, 50569, 2]  # </s><s><loc_0><loc_100><loc_200><loc_300></s>


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("microsoft", type=Path, help="folder with Microsoft's Florence-2 files")
    parser.add_argument("--out", type=Path, default=Path("tests/data/microsoft"))
    parser.add_argument(
        "--python",
        help="a Python with the reference versions installed (default: make a venv for them)",
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    missing = [name for name in MICROSOFT_FILES if not (args.microsoft / name).is_file()]
    if missing:
        sys.exit(f"{args.microsoft} lacks Microsoft's {', '.join(missing)}.")
    if not args.inside:
        python = args.python or _reference_venv()
        command = [python, __file__, str(args.microsoft), "--out", str(args.out), "--inside"]
        # peft keeps target_modules in a set: a fixed hash seed writes the same file each time.
        sys.exit(subprocess.call(command, env={**os.environ, "PYTHONHASHSEED": "0"}))
    record(args.microsoft.resolve(), args.out.resolve())


def _reference_venv() -> str:
    """A virtual environment with the versions Microsoft's code runs under (made once)."""
    venv = Path(".cache/microsoft-reference")
    python = venv / "bin" / "python"
    marker = venv / "installed.txt"
    if not marker.is_file() or marker.read_text() != "\n".join(REFERENCE_VERSIONS):
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
        subprocess.check_call([str(python), "-m", "pip", "install", "-q", *REFERENCE_VERSIONS])
        marker.write_text("\n".join(REFERENCE_VERSIONS))
    return str(python)


# --- Everything below runs inside the reference environment. ------------------------------

TIMM_STAND_IN = '''"""Stand-ins for the two timm names Microsoft's Florence-2 code imports."""
import torch
from torch import nn


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


class DropPath(nn.Module):
    """Stochastic depth: drops whole residual branches while training, identity in eval."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep
'''


def _import_microsoft(folder: Path, work: Path):
    """Microsoft's three modules, importable as a package, with the timm stand-in."""
    package = work / "microsoft_florence2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in CODE_FILES:
        shutil.copy2(folder / name, package / name)
    layers = work / "timm" / "models"
    layers.mkdir(parents=True)
    (work / "timm" / "__init__.py").write_text("")
    (layers / "__init__.py").write_text("")
    (layers / "layers.py").write_text(TIMM_STAND_IN)
    sys.path.insert(0, str(work))
    import microsoft_florence2.configuration_florence2 as configuration
    import microsoft_florence2.modeling_florence2 as modeling
    import microsoft_florence2.processing_florence2 as processing

    return configuration, modeling, processing


def _picture():
    """A fixed 160 x 120 picture with structure in every channel."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:120, 0:160]
    pixels = np.stack([x * 255 // 159, y * 255 // 119, (x * y) % 256], axis=-1)
    return Image.fromarray(pixels.astype("uint8"), "RGB")


def _randomise(model, seed: int) -> None:
    """Every parameter random (norm weights around 1), buffers as Microsoft's code sets them."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * noise)
            elif name.endswith("shared.weight"):  # also the output layer: spread the logits
                parameter.copy_(2.0 * noise)
            else:
                parameter.copy_(0.5 * noise)


def _shapes(modeling, configuration, config: dict) -> dict[str, list[int]]:
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():  # full size, so skip the random init: only names and shapes count
        model = modeling.Florence2ForConditionalGeneration(configuration.Florence2Config(**config))
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def _vocab_sample(vocab: int) -> list[int]:
    """Token ids whose logits are stored (with each position's logsumexp over all of them):
    every 37th of BART's ids, every 7th location token and Florence-2's other tokens."""
    florence = range(50265, vocab)
    return sorted({*range(0, 50265, 37), *florence[4:1004:7], *florence[:4], *florence[1004:]})


def record(microsoft: Path, out: Path) -> None:
    import peft
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import BartTokenizerFast, CLIPImageProcessor

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="microsoft-florence2-"))
    configuration, modeling, processing = _import_microsoft(microsoft, work)
    hub_config = json.loads((microsoft / "config.json").read_text())

    tiny = json.loads(json.dumps(hub_config))
    tiny["vision_config"].update(TINY_VISION)
    tiny["text_config"].update(TINY_TEXT)
    tiny["projection_dim"] = TINY_VISION["projection_dim"]
    base = json.loads(json.dumps(hub_config))
    base["vision_config"].update(BASE_VISION)
    base["text_config"].update(BASE_TEXT)
    base["projection_dim"] = BASE_VISION["projection_dim"]

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    # The processor as the hub's files make it, at the tiny model's input size.
    preprocessor = json.loads((microsoft / "preprocessor_config.json").read_text())
    preprocessor.update(
        size={"height": IMAGE_SIDE, "width": IMAGE_SIDE},
        crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE},
        image_seq_length=1 + (IMAGE_SIDE // 32) ** 2,
    )
    image_processor = CLIPImageProcessor(
        **{k: v for k, v in preprocessor.items() if k not in ("auto_map", "_valid_processor_keys")}
    )
    tokenizer = BartTokenizerFast.from_pretrained(microsoft)
    processor = processing.Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)

    config = configuration.Florence2Config(**tiny)
    torch.manual_seed(0)
    model = modeling.Florence2ForConditionalGeneration(config)
    _randomise(model, seed=0)
    model.eval()

    # Hub layout: fp16 .bin saved by Microsoft's classes, the hand-written config, hub files.
    hub = out / "hub"
    copy.deepcopy(model).half().save_pretrained(hub, safe_serialization=False)
    (hub / "config.json").write_text(json.dumps(tiny, indent=2) + "\n")
    for name in HUB_DATA_FILES:
        shutil.copy2(microsoft / name, hub / name)
    (hub / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    # The reference for the hub layout is the model as stored there: weights rounded to fp16.
    hub_model = modeling.Florence2ForConditionalGeneration.from_pretrained(
        hub, torch_dtype=torch.float32
    ).eval()

    # What Microsoft's save_pretrained writes: safetensors in fp32, config re-serialised.
    saved = out / "saved"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)

    picture = _picture()
    picture.save(out / "picture.png")
    tensors: dict[str, torch.Tensor] = {}
    sample = torch.tensor(_vocab_sample(config.text_config.vocab_size))
    tensors["vocab_sample"] = sample
    reference: dict = {
        "made_with": {
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
            "peft": peft.__version__,
            "microsoft_files_sha256": {
                name: hashlib.sha256((microsoft / name).read_bytes()).hexdigest()[:16]
                for name in MICROSOFT_FILES
            },
        },
        "banned_grounding_phrases": sorted(processor.post_processor.black_list_of_phrase_grounding),
        "generation_config": {
            k: v
            for k, v in model.language_model.generation_config.to_dict().items()
            if k
            in (
                "num_beams",
                "no_repeat_ngram_size",
                "forced_bos_token_id",
                "forced_eos_token_id",
                "early_stopping",
                "max_length",
                "length_penalty",
                "decoder_start_token_id",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
            )
        },
        "max_new_tokens": MAX_NEW_TOKENS,
        "decoder_ids": DECODER_IDS,
        "prompts": [],
        "answers": [],
        "shapes": {
            "base": _shapes(modeling, configuration, base),
            "large": _shapes(modeling, configuration, hub_config),
        },
        "base_config": base,
        "large_config": hub_config,
    }

    variants = {"hub": hub_model, "saved": model}
    for name, settings in ADAPTERS.items():
        adapted = _adapter(model, settings, out / name, seed=len(name))
        variants[name] = adapted
        reference.setdefault("adapters", {})[name] = {
            "wrapped_modules": sorted(
                n for n, m in adapted.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)
            ),
        }

    with torch.no_grad():
        for index, (task, text) in enumerate(PROMPTS):
            inputs = processor(text=task + text, images=picture, return_tensors="pt")
            entry = {"task": task, "text": text, "input_ids": inputs["input_ids"][0].tolist()}
            if index == 0:
                tensors["pixel_values"] = inputs["pixel_values"][0].contiguous()
            for variant, chosen in variants.items():
                core = _core(chosen)
                features = core._encode_image(inputs["pixel_values"])
                embeds = core.get_input_embeddings()(inputs["input_ids"])
                embeds, mask = core._merge_input_ids_with_image_features(features, embeds)
                states = core.language_model.get_encoder()(
                    inputs_embeds=embeds, attention_mask=mask
                ).last_hidden_state
                decoder_ids = torch.tensor([DECODER_IDS])
                logits = chosen(
                    input_ids=inputs["input_ids"],
                    pixel_values=inputs["pixel_values"],
                    decoder_input_ids=decoder_ids,
                ).logits[0]
                key = f"{variant}/{index}"
                tensors[f"{key}/image_features"] = features[0].contiguous()
                tensors[f"{key}/encoder_states"] = states[0].contiguous()
                tensors[f"{key}/logits_sample"] = logits[:, sample].contiguous()
                tensors[f"{key}/logsumexp"] = torch.logsumexp(logits, dim=-1).contiguous()
                # Its own generate(), with its own generation settings: 3 beams by default.
                beams = core.generate(
                    input_ids=inputs["input_ids"],
                    pixel_values=inputs["pixel_values"],
                    max_new_tokens=MAX_NEW_TOKENS,
                )
                greedy = core.generate(
                    input_ids=inputs["input_ids"],
                    pixel_values=inputs["pixel_values"],
                    max_new_tokens=MAX_NEW_TOKENS,
                    num_beams=1,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
                margins = [
                    float(step[0].topk(2).values[0] - step[0].topk(2).values[1])
                    for step in greedy.scores
                    if torch.isfinite(step[0].topk(2).values).all()
                ]
                entry.setdefault("tokens", {})[variant] = {
                    "beams": beams[0].tolist(),
                    "greedy": greedy.sequences[0].tolist(),
                    "smallest_greedy_margin": min(margins) if margins else None,
                }
            reference["prompts"].append(entry)

    size = picture.size
    for task, answer in ANSWERS:
        parsed = processor.post_process_generation(answer, task=task, image_size=size)
        reference["answers"].append({"task": task, "answer": answer, "parsed": parsed[task]})

    save_file(tensors, out / "reference.safetensors")
    (out / "reference.json").write_text(json.dumps(reference, indent=1, default=_json) + "\n")
    for folder in [hub, saved, *(out / n for n in ADAPTERS)]:
        for leftover in folder.glob("*.py"):
            leftover.unlink()  # never keep a copy of Microsoft's code
    (out / "README.md").write_text(_readme(reference))
    print(
        json.dumps(
            {
                "written": str(out),
                "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
            },
            indent=1,
        )
    )


def _core(model):
    """Microsoft's Florence2ForConditionalGeneration, unwrapped from peft."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _adapter(model, settings: dict, folder: Path, seed: int):
    """A LoRA adapter made by peft on a copy of Microsoft's model, with random weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(lora_dropout=0.0, **settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    adapted.eval()
    adapted.save_pretrained(folder)
    return adapted


def _json(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value)}")


def _readme(reference: dict) -> str:
    made = reference["made_with"]
    return (
        "# Microsoft's Florence-2, as the converter's reference\n\n"
        "Written by `tools/microsoft_reference.py` from Microsoft's own Florence-2 files "
        f"(transformers {made['transformers']}, torch {made['torch']}, peft {made['peft']}). "
        "A tiny model (real vocabulary, tiny dimensions, random weights): its answers are "
        "noise, and are here only to compare two implementations token by token.\n\n"
        "- `hub/`: the hub layout (fp16 `pytorch_model.bin`, hand-written `config.json`, the "
        "hub's tokenizer and preprocessor files; Microsoft's `.py` files left out).\n"
        "- `saved/`: what Microsoft's `save_pretrained` writes (fp32 safetensors).\n"
        "- `adapter-all/`, `adapter-recipe/`: LoRA adapters made by peft on Microsoft's model.\n"
        "- `reference.json`, `reference.safetensors`: Microsoft's outputs for fixed inputs.\n\n"
        "SHA-256 prefixes of the files it was made from: "
        + ", ".join(f"`{k}` {v}" for k, v in made["microsoft_files_sha256"].items())
        + ".\n"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
