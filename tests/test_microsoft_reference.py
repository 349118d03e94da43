"""``convert`` checked against Microsoft's own Florence-2 code, not against our own mapping.

``tests/data/microsoft`` was written by ``tools/microsoft_reference.py``, which ran Microsoft's
``modeling_florence2.py`` / ``processing_florence2.py`` (transformers 4.49) on a tiny
Florence-2 with the real vocabulary and random weights: the checkpoint in the hub layout
(fp16 ``pytorch_model.bin``, hand-written config) and as Microsoft's ``save_pretrained``
writes it (fp32 safetensors), two LoRA adapters made by peft on that model, and Microsoft's
outputs for fixed inputs. Nothing here was produced by this package.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from florence_helpers import load_model, run, run_tasks
from florence_helpers.language.results import parse_answer
from florence_helpers.model.adapters import load_adapter
from florence_helpers.model.checkpoint_files import native_name
from florence_helpers.model.convert import BANNED_GROUNDING_PHRASES, _native_config, convert
from florence_helpers.model.decoding import generate
from florence_helpers.model.weight_files import CheckpointError

DATA = Path(__file__).parent / "data" / "microsoft"
REFERENCE = json.loads((DATA / "reference.json").read_text())
TENSORS = load_file(DATA / "reference.safetensors")
VOCAB = REFERENCE["large_config"]["text_config"]["vocab_size"]  # 51289, Microsoft's rows
# fp32 against fp32, the same weights: only the order of floating-point operations differs.
# The hub layout's fp16 rounding alone moves these logits by 0.04, twenty times this.
LOGITS_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each layout and adapter converted once, from a copy (the test data stays as it is)."""
    root = tmp_path_factory.mktemp("microsoft")
    out = {}
    for name in ("hub", "saved", "adapter-all", "adapter-recipe"):
        shutil.copytree(DATA / name, root / f"{name}-original")
        out[name] = convert(root / f"{name}-original", root / name)
    return out


@pytest.fixture(scope="module")
def picture():
    return Image.open(DATA / "picture.png").convert("RGB")


def _model(converted, variant):
    if variant.startswith("adapter"):
        base = load_model(converted["saved"], device="cpu", dtype="float32")
        return load_adapter(base, converted[variant])
    return load_model(converted[variant], device="cpu", dtype="float32")


def _inputs(florence, picture, prompt):
    return florence.processor(
        text=prompt["task"] + prompt["text"], images=picture, return_tensors="pt"
    )


@pytest.mark.parametrize("variant", ["hub", "saved", "adapter-all", "adapter-recipe"])
def test_converted_models_compute_what_microsofts_model_computes(converted, picture, variant):
    florence = _model(converted, variant)
    model = florence.model
    for index, prompt in enumerate(REFERENCE["prompts"]):
        key = f"{variant}/{index}"
        inputs = _inputs(florence, picture, prompt)
        with torch.no_grad():
            features = model.get_image_features(inputs["pixel_values"]).pooler_output
            out = model(**inputs, decoder_input_ids=torch.tensor([REFERENCE["decoder_ids"]]))
        torch.testing.assert_close(features[0], TENSORS[f"{key}/image_features"], atol=1e-4, rtol=0)
        torch.testing.assert_close(
            out.encoder_last_hidden_state[0], TENSORS[f"{key}/encoder_states"], atol=1e-4, rtol=0
        )
        logits = out.logits[0]
        torch.testing.assert_close(
            logits[:, TENSORS["vocab_sample"]],
            TENSORS[f"{key}/logits_sample"],
            atol=LOGITS_TOLERANCE,
            rtol=0,
        )
        # Over Microsoft's whole vocabulary: a wrong row anywhere would move it.
        torch.testing.assert_close(
            torch.logsumexp(logits[:, :VOCAB], dim=-1),
            TENSORS[f"{key}/logsumexp"],
            atol=LOGITS_TOLERANCE,
            rtol=0,
        )


@pytest.mark.parametrize("variant", ["hub", "saved", "adapter-all", "adapter-recipe"])
def test_greedy_and_beam_tokens_are_microsofts(converted, picture, variant):
    """Microsoft's generate() used its own settings (3 beams, no repeated 3-grams, forced
    BOS); the converted checkpoint carries them, so plain generate() gives the same tokens,
    and so does the package's fast beam search."""
    florence = _model(converted, variant)
    limit = REFERENCE["max_new_tokens"]
    for prompt in REFERENCE["prompts"]:
        expected = prompt["tokens"][variant]
        inputs = _inputs(florence, picture, prompt)
        with torch.no_grad():
            default = florence.model.generate(**inputs, max_new_tokens=limit)
            greedy = florence.model.generate(**inputs, max_new_tokens=limit, num_beams=1)
        assert default[0].tolist() == expected["beams"], prompt["task"]
        assert greedy[0].tolist() == expected["greedy"], prompt["task"]
        fast, _ = generate(florence, inputs, num_beams=3, max_new_tokens=limit)
        assert fast[0].tolist() == expected["beams"], prompt["task"]


def test_run_and_run_tasks_decode_with_the_checkpoints_settings(converted, picture):
    florence = _model(converted, "hub")
    limit = REFERENCE["max_new_tokens"]
    tasks = [(p["task"], p["text"]) if p["text"] else p["task"] for p in REFERENCE["prompts"]]
    for beams, kind in ((3, "beams"), (1, "greedy")):
        expected = [
            florence.processor.decode(p["tokens"]["hub"][kind], skip_special_tokens=False)
            for p in REFERENCE["prompts"]
        ]
        alone = [
            run(florence, picture, task, text or None, num_beams=beams, max_new_tokens=limit)
            for task, text in ((p["task"], p["text"]) for p in REFERENCE["prompts"])
        ]
        assert [r.raw for r in alone] == expected
        if beams == 1:  # run_tasks batches the tasks: token-identical for greedy answers
            together = run_tasks(florence, picture, tasks, num_beams=1, max_new_tokens=limit)
            assert [r.raw for r in together] == [r.raw for r in alone]
    # Every answer above ran into max_new_tokens: Microsoft's forced EOS closes it at the
    # limit, so the closing </s> does not mean the answer was complete.
    assert all(r.truncated for r in alone)


def test_no_repeat_ngram_size_can_be_turned_off_per_call(converted, picture):
    """Microsoft's no_repeat_ngram_size=3 forbids any 3 tokens twice in an answer: right for
    its task answers, wrong for free text that repeats itself (JSON keys, say)."""
    florence = _model(converted, "hub")
    prompt = REFERENCE["prompts"][0]
    kept = run(florence, picture, prompt["task"], num_beams=1, max_new_tokens=24)
    off = run(
        florence, picture, prompt["task"], num_beams=1, max_new_tokens=24, no_repeat_ngram_size=0
    )
    ids = florence.processor.tokenizer(off.raw, add_special_tokens=False)["input_ids"]
    trigrams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
    assert len(set(trigrams)) < len(trigrams)  # this noise repeats itself once allowed to
    assert off.raw != kept.raw


def test_the_generation_settings_are_microsofts(converted):
    for layout in ("hub", "saved"):
        written = json.loads((converted[layout] / "generation_config.json").read_text())
        for key, value in REFERENCE["generation_config"].items():
            if key in ("max_length", "length_penalty"):  # transformers' defaults, both sides
                continue
            assert written.get(key) == value, (layout, key)
        # Tokens Microsoft's model does not have (<image>, padding) can never be written.
        assert written["suppress_tokens"] == list(range(VOCAB, 51328))


def test_the_banned_grounding_phrases_are_microsofts(converted):
    assert sorted(BANNED_GROUNDING_PHRASES) == REFERENCE["banned_grounding_phrases"]
    florence = load_model(converted["hub"], device="cpu", dtype="float32")
    banned = florence.processor.post_processor.banned_grounding_tokens
    assert sorted(set(banned)) == REFERENCE["banned_grounding_phrases"]


def test_answers_parse_as_microsofts_processor_parses_them(converted):
    """Labels exactly as Microsoft's; coordinates are its floats truncated to whole pixels
    (transformers' native parser's rule)."""
    florence = load_model(converted["hub"], device="cpu", dtype="float32")
    size = Image.open(DATA / "picture.png").size
    for entry in REFERENCE["answers"]:
        result = parse_answer(florence.processor, entry["answer"], entry["task"], size)
        expected = entry["parsed"]
        if isinstance(expected, str):
            assert result.text == expected
            continue
        if "quad_boxes" in expected:
            # Microsoft's OCR parser leaves the answer's leading "</s>" in the first label.
            assert result.texts == [t.removeprefix("</s>") for t in expected["labels"]]
            coordinates, ours = expected["quad_boxes"], result.quads.reshape(len(result), -1)
        elif "polygons" in expected and "bboxes" not in expected:
            assert result.labels == expected["labels"]
            coordinates = [c for instance in expected["polygons"] for c in instance]
            ours = [p.reshape(-1) for instance in result.polygons for p in instance]
        else:
            assert result.labels == expected.get("bboxes_labels", expected.get("labels"))
            coordinates, ours = expected["bboxes"], result.boxes
        assert len(ours) == len(coordinates)
        for mine, theirs in zip(ours, coordinates, strict=True):
            assert [float(v) for v in mine] == [float(math.floor(v)) for v in theirs]


@pytest.mark.parametrize("adapter", ["adapter-all", "adapter-recipe"])
def test_adapters_wrap_the_modules_microsofts_model_wrapped(converted, adapter):
    florence = _model(converted, adapter)
    wrapped = sorted(
        name
        for name, module in florence.model.named_modules()
        if hasattr(module, "lora_A") and len(module.lora_A)
    )
    prefix = "base_model.model."
    expected = sorted(
        prefix + native_name(name.removeprefix(prefix))
        for name in REFERENCE["adapters"][adapter]["wrapped_modules"]
    )
    assert wrapped == expected
    # proj also names the patch-embedding convolutions, conv in the native model.
    if adapter == "adapter-all":
        assert f"{prefix}model.vision_tower.convs.0.conv" in wrapped
    # lm_head's LoRA is padded to the native vocabulary, the extra rows zero.
    weights = load_file(converted[adapter] / "adapter_model.safetensors")
    lora_b = weights[f"{prefix}lm_head.lora_B.weight"]
    assert lora_b.shape[0] == 51328 and not lora_b[VOCAB:].any()


@pytest.mark.parametrize("size", ["base", "large"])
def test_full_size_weight_names_and_shapes_map_one_to_one(size):
    """Microsoft's Florence-2-base and -large weights (names and shapes recorded from its
    model) land on every weight of a native model built from the converted configuration."""
    from transformers import Florence2ForConditionalGeneration

    config = REFERENCE[f"{size}_config"]
    native_config = _native_config(config, image_token_id=VOCAB, vocab=VOCAB)
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(native_config)
    native = {name: list(t.shape) for name, t in model.state_dict().items()}
    theirs = REFERENCE["shapes"][size]
    mapped = {
        native_name(name): shape[::-1] if name == "image_projection" else shape
        for name, shape in theirs.items()
        if name != "language_model.final_logits_bias"
    }
    assert mapped == native
    layers = config["text_config"]["encoder_layers"]
    assert native_config.text_config.encoder_layers == layers


def _copy_with(tmp_path, layout, change):
    """A copy of a test checkpoint with its weights changed by ``change(state)``."""
    folder = tmp_path / f"{layout}-{change.__name__}"
    shutil.copytree(DATA / layout, folder)
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors")
    return folder


def test_a_zero_output_bias_is_dropped_and_a_trained_one_is_refused(converted, tmp_path):
    # Microsoft's checkpoints carry BART's all-zero final_logits_bias; it converted above.
    assert not load_file(DATA / "saved" / "model.safetensors")[
        "language_model.final_logits_bias"
    ].any()
    assert converted["saved"].is_dir()

    def trained(state):
        state["language_model.final_logits_bias"][0, 5] = 0.25

    with pytest.raises(CheckpointError, match=r"final_logits_bias is not zero \(1 of 51289"):
        convert(_copy_with(tmp_path, "saved", trained), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_that_would_be_lost_or_left_random_are_named(tmp_path):
    def drop_one(state):
        del state["language_model.model.encoder.layers.0.fc1.weight"]

    with pytest.raises(CheckpointError, match=r"Missing \(1\): .*encoder\.layers\.0\.fc1\.weight"):
        convert(_copy_with(tmp_path, "saved", drop_one), tmp_path / "a")

    def add_one(state):
        state["language_model.model.encoder.extra.weight"] = torch.zeros(2)

    with pytest.raises(CheckpointError, match=r"Not used \(1\): .*encoder\.extra\.weight"):
        convert(_copy_with(tmp_path, "saved", add_one), tmp_path / "b")


def test_an_adapter_that_cannot_convert_whole_is_refused(tmp_path):
    folder = tmp_path / "with-modules-to-save"
    shutil.copytree(DATA / "adapter-all", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["modules_to_save"] = ["image_proj_norm"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"also saves whole modules"):
        convert(folder, tmp_path / "out")
    folder = tmp_path / "not-lora"
    shutil.copytree(DATA / "adapter-all", folder)
    config["modules_to_save"], config["peft_type"] = None, "IA3"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'IA3', not LoRA"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
