"""The labelling job on Ray Data, for collections one machine cannot label in time.

Each Ray worker is an actor that loads the model once and labels batches with the same
:func:`~florence_helpers.labelling.label_batch` as the single-machine :func:`label`. Ray is an
optional extra: ``pip install "florence-helpers[ray]"``.

On a cluster, connect first (``ray.init("auto")`` on a node of the cluster, or
``ray.init("ray://head:10001")``), put the images and the output folder where every node can
read and write them (shared storage or ``s3://...``), set ``concurrency`` to the number of
model copies to run and ``num_gpus=1`` to give each copy a GPU. By default each copy gets a GPU
when the machine that starts the job has one, and loads the model in the same dtype as
``load_model`` would there, so a local Ray run answers like :func:`label`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from ..boundary.inputs import expand_path, is_url
from ..boundary.outputs import OutputError, check_folder_output
from ..language.tasks import Task, TaskSpec, task_spec


class FlorenceLabeller:
    """A Ray Data callable class: loads Florence-2 once per worker, labels batches of paths."""

    def __init__(
        self,
        model_id: str | None,
        task: str,
        text: str | None = None,
        region: tuple[float, float, float, float] | None = None,
        device: str = "auto",
        run_kwargs: dict[str, Any] | None = None,
        dtype: str = "auto",
    ) -> None:
        from ..model.loading import load_model

        self.florence = load_model(model_id, device=device, dtype=dtype)
        self.task = task
        self.text = text
        self.region = region
        self.run_kwargs = run_kwargs or {}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from .jobs import label_batch

        records = label_batch(
            self.florence,
            [str(path) for path in batch["image"]],
            self.task,
            text=self.text,
            region=self.region,
            **self.run_kwargs,
        )
        # Arrow needs one schema for every row: keep the parsed result as JSON text.
        return {
            "image": [r["image"] for r in records],
            "path": [r["path"] for r in records],
            "width": [r["width"] for r in records],
            "height": [r["height"] for r in records],
            "task": [r["task"] for r in records],
            "result": [None if r["result"] is None else json.dumps(r["result"]) for r in records],
            "error": [r["error"] for r in records],
        }


def label_with_ray(
    sources: Iterable[str | os.PathLike],
    task: str | Task | TaskSpec,
    output: str | os.PathLike,
    *,
    model_id: str | None = None,
    text: str | None = None,
    region: tuple[float, float, float, float] | None = None,
    batch_size: int = 8,
    concurrency: int = 1,
    num_gpus: float | None = None,
    output_format: str = "jsonl",
    device: str = "auto",
    dtype: str = "auto",
    **run_kwargs: Any,
) -> Any:
    """Label images with Ray Data: ``map_batches`` over actors that each hold the model.

    Args:
        sources: Image paths or URLs every worker can read.
        task: The task to run on every image.
        output: A new or empty folder for the output files (JSON lines or Parquet, one file
            per block); never one that is or holds an input.
        model_id: Hub id or directory every worker can load; default ``$FLORENCE_MODEL``.
        text, region: The task's extra input, the same for every image.
        batch_size: Images per batch given to a worker.
        concurrency: How many model copies (actors) to run.
        num_gpus: GPUs per actor; None gives each actor one GPU when this machine has CUDA,
            else none (on a cluster whose head has no GPU, pass 1).
        output_format: ``"jsonl"`` or ``"parquet"``.
        device: Device inside each actor (``"auto"`` picks the GPU Ray assigned).
        dtype: As for :func:`load_model`; ``"auto"`` picks what it picks on that device.
        **run_kwargs: Passed to :func:`run` (``num_beams``, ``max_new_tokens``, ``scores``).

    Returns:
        The output folder; read it back with :func:`read_labels` (JSON lines) or
        ``ray.data.read_parquet``.

    Raises:
        OutputError: ``output`` already holds files, or is or holds an input; checked before
            Ray starts.

    Example:
        >>> label_with_ray(find_images("images"), "CAPTION", "out/", concurrency=2)
        ... # doctest: +SKIP
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError(
            'label_with_ray needs Ray Data: pip install "florence-helpers[ray]"'
        ) from None
    if output_format not in ("jsonl", "parquet"):
        raise ValueError(f"output_format must be 'jsonl' or 'parquet', not {output_format!r}")
    sources = [os.fspath(source) for source in sources]
    _check_output_folder(output, sources)
    import torch

    spec = task_spec(task)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if num_gpus is None:
        num_gpus = 1 if torch.cuda.is_available() else 0
    dataset = ray.data.from_items([{"image": source} for source in sources])
    labelled = dataset.map_batches(
        FlorenceLabeller,
        fn_constructor_kwargs={
            "model_id": model_id or os.environ.get("FLORENCE_MODEL"),
            "task": spec.token,
            "text": text,
            "region": tuple(region) if region is not None else None,
            "device": device,
            "run_kwargs": run_kwargs,
            "dtype": dtype,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus,
    )
    if output_format == "parquet":
        labelled.write_parquet(str(output))
    else:
        labelled.write_json(str(output))
    return output


def _check_output_folder(output: str | os.PathLike, sources: list[str]) -> None:
    """Refuse, before Ray starts, an output folder that is or holds an input, and one that
    already holds files: Ray adds its block files beside them, and :func:`read_labels` reads
    every file of the folder, so a second run into it would label each image twice."""
    check_folder_output(output, [s for s in sources if not is_url(s)], name="output")
    folder = expand_path(output)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputError(
            f"The output folder {os.fspath(output)} already holds files (an earlier run's?): "
            "give a new or empty folder, or delete the old one first."
        )
