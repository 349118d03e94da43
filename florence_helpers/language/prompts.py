"""Check a task's extra input and write the prompt the native processor expects."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .regions import box_to_loc_tokens
from .tasks import TASKS, InputKind, Task, TaskSpec, task_spec

_FOUR_LOC_TOKENS = re.compile(r"^\s*(<loc_\d{1,3}>){4}\s*$")


Region = Sequence[float]
"""A pixel box ``(x1, y1, x2, y2)`` in the original image."""


class TaskInputError(ValueError):
    """Raised when a task gets text or a region it does not take, or misses one it needs."""


def build_prompt(
    task: str | Task | TaskSpec,
    image_size: tuple[int, int],
    text: str | None = None,
    region: Region | None = None,
) -> str:
    """Validate a task's input and return its prompt, e.g. ``"<OPEN_VOCABULARY_DETECTION>a cat"``.

    Args:
        task: The task.
        image_size: ``(width, height)`` of the image; region tasks need it to quantize.
        text: Free text, for the tasks that take it (grounding, open-vocabulary detection,
            referring segmentation).
        region: A pixel box ``(x1, y1, x2, y2)``, for the ``REGION_TO_*`` tasks.

    Raises:
        TaskInputError: The task got input it does not take, or lacks input it needs.
        RegionError: The region is malformed or outside the image.

    Example:
        >>> build_prompt("REGION_TO_CATEGORY", (640, 480), region=(10, 20, 300, 400))
        '<REGION_TO_CATEGORY><loc_15><loc_41><loc_468><loc_833>'
    """
    spec = task_spec(task)
    if text is not None and not isinstance(text, str):
        raise TaskInputError(
            f"text must be a string, got {type(text).__name__} {text!r:.60} (a number, a list "
            "or bytes is not turned into text)."
        )
    if text is not None and not _is_unicode(text):
        raise TaskInputError(
            "text is not valid Unicode text (it holds bytes that are not UTF-8, such as a file "
            "name or argument in another encoding): decode it first."
        )
    has_text = text is not None and str(text).strip() != ""
    if spec.input is InputKind.NONE:
        if has_text or region is not None:
            given = f"text {text!r}" if has_text else f"region {tuple(region)!r}"
            raise TaskInputError(
                f"{spec.token} takes only the image, but got {given}. "
                "Tasks that take text: "
                f"{', '.join(t.name for t in _tasks_taking(InputKind.TEXT))}; tasks that take "
                f"a region: {', '.join(t.name for t in _tasks_taking(InputKind.REGION))}."
            )
        return spec.token
    if spec.input is InputKind.TEXT:
        if region is not None:
            raise TaskInputError(f"{spec.token} takes text, not a region.")
        if not has_text:
            raise TaskInputError(f"{spec.token} needs text: pass text='...' ({spec.description}).")
        _reject_task_tokens(str(text), spec)
        return spec.token + str(text).strip()
    # Region tasks.
    if region is not None:
        if has_text:
            raise TaskInputError(f"{spec.token} takes a region, not text as well.")
        return spec.token + box_to_loc_tokens(region, image_size)
    if has_text and _FOUR_LOC_TOKENS.match(str(text)):
        return spec.token + str(text).strip()
    raise TaskInputError(
        f"{spec.token} needs a region: pass region=(x1, y1, x2, y2) in pixels of the image"
        + (f", not text {text!r}." if has_text else ".")
    )


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _tasks_taking(kind: InputKind) -> list[Task]:
    return [task for task, spec in TASKS.items() if spec.input is kind]


def _reject_task_tokens(text: str, spec: TaskSpec) -> None:
    for task in Task:
        if task.value in text:
            raise TaskInputError(
                f"The text for {spec.token} contains the task token {task.value}: pass the task "
                "as `task` and only your words as `text`."
            )
