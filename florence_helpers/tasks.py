"""The 15 Florence-2 task tokens: what each one takes and what it gives back."""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass


class Task(str, enum.Enum):
    """Florence-2 task tokens. The value is the token the processor expects."""

    CAPTION = "<CAPTION>"
    DETAILED_CAPTION = "<DETAILED_CAPTION>"
    MORE_DETAILED_CAPTION = "<MORE_DETAILED_CAPTION>"
    OCR = "<OCR>"
    OCR_WITH_REGION = "<OCR_WITH_REGION>"
    OD = "<OD>"
    DENSE_REGION_CAPTION = "<DENSE_REGION_CAPTION>"
    REGION_PROPOSAL = "<REGION_PROPOSAL>"
    CAPTION_TO_PHRASE_GROUNDING = "<CAPTION_TO_PHRASE_GROUNDING>"
    OPEN_VOCABULARY_DETECTION = "<OPEN_VOCABULARY_DETECTION>"
    REFERRING_EXPRESSION_SEGMENTATION = "<REFERRING_EXPRESSION_SEGMENTATION>"
    REGION_TO_SEGMENTATION = "<REGION_TO_SEGMENTATION>"
    REGION_TO_CATEGORY = "<REGION_TO_CATEGORY>"
    REGION_TO_DESCRIPTION = "<REGION_TO_DESCRIPTION>"
    REGION_TO_OCR = "<REGION_TO_OCR>"

    def __str__(self) -> str:
        return self.value


class InputKind(str, enum.Enum):
    """What a task needs besides the image."""

    NONE = "none"
    TEXT = "text"
    REGION = "region"


class ResultKind(str, enum.Enum):
    """What kind of parsed result a task gives."""

    TEXT = "text"
    BOXES = "boxes"
    POLYGONS = "polygons"
    OCR_REGIONS = "ocr_regions"


class AnswerSize(str, enum.Enum):
    """Typical answer length: short (under ~40 tokens), medium (~60-150), long (150+)."""

    SHORT = "short"
    MEDIUM = "medium"
    LONG = "long"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its token, the extra input it takes and the result it gives.

    ``answer_size`` is how long its answers usually are; :func:`run_tasks` decodes tasks of
    similar length together so short answers do not wait for long ones.
    """

    task: Task
    input: InputKind
    result: ResultKind
    description: str
    answer_size: AnswerSize = AnswerSize.SHORT

    @property
    def token(self) -> str:
        return self.task.value

    @property
    def name(self) -> str:
        return self.task.name


_SPECS = [
    TaskSpec(Task.CAPTION, InputKind.NONE, ResultKind.TEXT, "one-sentence caption"),
    TaskSpec(Task.DETAILED_CAPTION, InputKind.NONE, ResultKind.TEXT, "a few sentences"),
    TaskSpec(
        Task.MORE_DETAILED_CAPTION,
        InputKind.NONE,
        ResultKind.TEXT,
        "a paragraph",
        AnswerSize.MEDIUM,
    ),
    TaskSpec(Task.OCR, InputKind.NONE, ResultKind.TEXT, "all text in the image"),
    TaskSpec(
        Task.OCR_WITH_REGION,
        InputKind.NONE,
        ResultKind.OCR_REGIONS,
        "text lines with their quads",
        AnswerSize.MEDIUM,
    ),
    TaskSpec(
        Task.OD,
        InputKind.NONE,
        ResultKind.BOXES,
        "object detection: boxes with categories",
        AnswerSize.MEDIUM,
    ),
    TaskSpec(
        Task.DENSE_REGION_CAPTION,
        InputKind.NONE,
        ResultKind.BOXES,
        "boxes with short descriptions",
        AnswerSize.LONG,
    ),
    TaskSpec(
        Task.REGION_PROPOSAL,
        InputKind.NONE,
        ResultKind.BOXES,
        "boxes without labels",
        AnswerSize.MEDIUM,
    ),
    TaskSpec(
        Task.CAPTION_TO_PHRASE_GROUNDING,
        InputKind.TEXT,
        ResultKind.BOXES,
        "boxes for the phrases of a caption you give",
    ),
    TaskSpec(
        Task.OPEN_VOCABULARY_DETECTION,
        InputKind.TEXT,
        ResultKind.BOXES,
        "boxes for a phrase you give",
    ),
    TaskSpec(
        Task.REFERRING_EXPRESSION_SEGMENTATION,
        InputKind.TEXT,
        ResultKind.POLYGONS,
        "polygon mask of what a phrase you give refers to",
        AnswerSize.LONG,
    ),
    TaskSpec(
        Task.REGION_TO_SEGMENTATION,
        InputKind.REGION,
        ResultKind.POLYGONS,
        "polygon mask of the object in a box you give",
        AnswerSize.LONG,
    ),
    TaskSpec(
        Task.REGION_TO_CATEGORY, InputKind.REGION, ResultKind.TEXT, "category of a box you give"
    ),
    TaskSpec(
        Task.REGION_TO_DESCRIPTION,
        InputKind.REGION,
        ResultKind.TEXT,
        "short description of a box you give",
    ),
    TaskSpec(Task.REGION_TO_OCR, InputKind.REGION, ResultKind.TEXT, "text inside a box you give"),
]

TASKS: dict[Task, TaskSpec] = {spec.task: spec for spec in _SPECS}
"""Every task, keyed by its :class:`Task`."""


class UnknownTaskError(ValueError):
    """Raised for a task name that is not one of the 15 Florence-2 tasks."""


def task_spec(task: str | Task | TaskSpec) -> TaskSpec:
    """Look up a task by token (``"<OD>"``), name (``"OD"``, ``"od"``) or enum.

    Args:
        task: The task in any of the accepted spellings.

    Returns:
        The task's :class:`TaskSpec`.

    Raises:
        UnknownTaskError: The name matches no task; the message lists the closest names.

    Example:
        >>> task_spec("od").token
        '<OD>'
    """
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, Task):
        return TASKS[task]
    if not isinstance(task, str):
        raise UnknownTaskError(f"A task must be a string or Task, not {type(task).__name__}.")
    name = task.strip().strip("<>").strip().upper().replace(" ", "_").replace("-", "_")
    if name in Task.__members__:
        return TASKS[Task[name]]
    close = difflib.get_close_matches(name, list(Task.__members__), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownTaskError(
        f"Unknown Florence-2 task {task!r}.{hint} Known tasks: {', '.join(Task.__members__)}."
    )
