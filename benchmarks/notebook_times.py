"""How long each notebook takes to run top to bottom on this machine, for the time line at the
top of every notebook.

    python benchmarks/notebook_times.py [NOTEBOOK ...]     # all of them by default

No weights are downloaded. The full-size Florence-2-base architecture is built with random
weights and Florence-2's real tokenizer (from tests/data/microsoft, converted), so prompts have
their real length; every answer of ``run``, ``run_tasks`` and the helpers built on them ends at
the length Florence-2 writes for its task (the ``ANSWER_TOKENS`` of
benchmarks/inference_speed.py), the few plain ``generate`` calls and Ray's workers near 40
tokens (transformers' ``exponential_decay_length_penalty``); each notebook runs with its own
settings, in the dtype ``load_model()`` picks here. The fine-tuning notebooks train for one
epoch; their training time is scaled to the notebook's number of epochs from the measured time
per epoch.
Prints one JSON object: per notebook the minutes, and the cells that took more than a minute.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbformat
import torch
from inference_speed import ANSWER_TOKENS, ARCHITECTURES, VOCAB
from nbclient import NotebookClient

from florence_helpers.model.convert import MICROSOFT_GENERATION_SETTINGS, POST_PROCESSOR_CONFIG
from florence_helpers.model.devices import cpu_has_native_bf16
from florence_helpers.model.kernels import cpuinfo_field
from florence_helpers.testing import build_random_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LENGTH = 40  # answers of calls the harness does not see (plain generate, Ray workers)
TRAINING = ("06_fine_tuning.ipynb", "08_fine_tuning_document_vqa.ipynb")

# Runs in the notebook's kernel before its first cell: each run/run_tasks call asks for answers
# of its task's usual length (a generate setting, so the answers stay the model's own tokens).
_LENGTHS = """
import florence_helpers, florence_helpers.model.inference as _inference
from florence_helpers.labelling import jobs as _labelling
from florence_helpers.model import detection as _detection, tiling as _tiling
from florence_helpers.serve import batching as _batching
from florence_helpers.language.tasks import task_spec as _spec
from transformers import LogitsProcessor, LogitsProcessorList

_TOKENS = {lengths!r}
_run, _run_tasks = _inference.run, _inference.run_tasks


class _EndAt(LogitsProcessor):
    # Each row's answer ends after its task's usual number of tokens (its own tokens till then).
    def __init__(self, lengths):
        self.lengths = list(lengths)

    def select_rows(self, rows):
        return _EndAt([self.lengths[i] for i in rows])

    def __call__(self, input_ids, scores):
        rows, step = input_ids.shape[0], input_ids.shape[1] - 1
        per = max(1, rows // len(self.lengths))
        for row in range(rows):
            if step >= self.lengths[min(row // per, len(self.lengths) - 1)] - 1:
                scores[row] = float("-inf")
                scores[row, 2] = 0.0
        return scores


def _length(task):
    try:
        return _TOKENS.get(_spec(task).name, {default})
    except Exception:
        return {default}


_NO_DECAY = (100_000, 1.0)  # the model's default end near 40 tokens, switched off here


def _timed_run(florence, images, task=None, text=None, **kwargs):
    kwargs.setdefault("logits_processor", LogitsProcessorList([_EndAt([_length(task)])]))
    kwargs.setdefault("exponential_decay_length_penalty", _NO_DECAY)
    return _run(florence, images, task, text, **kwargs)


def _timed_run_tasks(florence, image, tasks, **kwargs):
    lengths = [_length(t[0] if isinstance(t, tuple) else t) for t in tasks]
    kwargs.setdefault("logits_processor", LogitsProcessorList([_EndAt(lengths)]))
    kwargs.setdefault("exponential_decay_length_penalty", _NO_DECAY)
    return _run_tasks(florence, image, tasks, **kwargs)


for _module in (florence_helpers, _inference, _labelling, _tiling, _batching):
    if hasattr(_module, "run"):
        _module.run = _timed_run
for _module in (florence_helpers, _inference, _detection):
    if hasattr(_module, "run_tasks"):
        _module.run_tasks = _timed_run_tasks
"""


def build_model(folder: Path) -> Path:
    """The full-size base architecture, random weights, Florence-2's real tokenizer."""
    from transformers import AutoProcessor, CLIPImageProcessor, Florence2Processor

    from florence_helpers.model.convert import convert

    converted = convert(ROOT / "tests/data/microsoft/hub", folder / "real-tokenizer")
    tokenizer = AutoProcessor.from_pretrained(converted).tokenizer
    image_processor = CLIPImageProcessor(
        size={"height": 768, "width": 768},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    image_processor.image_seq_length = 577
    processor = Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config=POST_PROCESSOR_CONFIG,
    )
    spec = ARCHITECTURES["base"]
    vision = {"depths": [1, 1, 9, 1], "window_size": 12, **spec["vision"]}
    model = build_random_model(processor, vision=vision, text=spec["text"], vocab_size=VOCAB)
    for name, value in MICROSOFT_GENERATION_SETTINGS.items():
        setattr(model.generation_config, name, value)
    model.generation_config.exponential_decay_length_penalty = (DEFAULT_LENGTH, 1.5)
    # Random rows past the tokenizer would decode to nothing: never write them.
    model.generation_config.suppress_tokens = list(range(len(tokenizer), VOCAB))
    out = folder / "random-base"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def time_notebook(path: Path, model: Path, work: Path) -> dict:
    """Run one notebook in a copy of notebooks/ and images/; its minutes and long cells."""
    folder = work / path.stem
    shutil.copytree(ROOT / "images", folder / "images")
    (folder / "notebooks").mkdir(parents=True)
    notebook = nbformat.read(path, as_version=4)
    lengths = {task.name: tokens for task, tokens in ANSWER_TOKENS.items()}
    harness = [_LENGTHS.format(lengths=lengths, default=DEFAULT_LENGTH)]
    epochs = None
    if path.name in TRAINING:  # one epoch, scaled afterwards
        parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
        epochs = int(re.search(r"^EPOCHS = (\d+)", parameters.source, re.M).group(1))
        harness.append("EPOCHS = 1")
    index = next(
        i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])
    )
    for offset, source in enumerate(harness):
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["harness"] = True
        notebook.cells.insert(index + 1 + offset, cell)
    if epochs:
        report = nbformat.v4.new_code_cell("print(history.seconds)")
        report.metadata["harness"] = True
        notebook.cells.append(report)
    import os

    os.environ["FLORENCE_MODEL"] = str(model)
    started = time.perf_counter()
    NotebookClient(
        notebook,
        timeout=7200,
        kernel_name="python3",
        resources={"metadata": {"path": str(folder / "notebooks")}},
    ).execute()
    total = time.perf_counter() - started
    cells = []
    for number, cell in enumerate(notebook.cells):
        timing = cell.metadata.get("execution", {})
        if cell.cell_type != "code" or cell.metadata.get("harness") or not timing:
            continue
        seconds = (
            datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
            - datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
        ).total_seconds()
        cells.append((number, seconds, cell.source.splitlines()[0][:60]))
    result = {"minutes": round(total / 60, 1)}
    if epochs:
        per_epoch = float(notebook.cells[-1].outputs[0]["text"])
        result["training_minutes_per_epoch"] = round(per_epoch / 60, 1)
        result["epochs"] = epochs
        result["minutes_with_all_epochs"] = round((total + per_epoch * (epochs - 1)) / 60, 1)
    result["cells_over_a_minute"] = [
        {"cell": n, "minutes": round(s / 60, 1), "starts": text} for n, s, text in cells if s > 60
    ]
    return result


def _processor() -> str:
    """The CPU's model name (it changes between this project's machines)."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument(
        "--model-cache", type=Path, help="keep the random model here and reuse it next time"
    )
    args = parser.parse_args()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    work = Path(tempfile.mkdtemp(prefix="notebook-times-"))
    try:
        cache = args.model_cache
        if cache is not None and (cache / "random-base" / "config.json").is_file():
            model = cache / "random-base"
        else:
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
            model = build_model(cache or work)
        times = {}
        for path in paths:
            times[path.name] = time_notebook(path.resolve(), model, work)
            print(json.dumps({path.name: times[path.name]}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "processor": _processor(),
                "native_bf16": cpu_has_native_bf16(),
                "threads": torch.get_num_threads(),
                "notebooks": times,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
