"""The 15 Florence-2 task tokens, and custom prompts: what each takes and gives back."""

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

    ``task`` is a :class:`Task`, or for a custom task (:func:`custom_task`) its prompt token
    as a string. ``answer_size`` is how long its answers usually are; :func:`run_tasks`
    decodes tasks of similar length together so short answers do not wait for long ones.
    """

    task: Task | str
    input: InputKind
    result: ResultKind
    description: str
    answer_size: AnswerSize = AnswerSize.SHORT

    @property
    def token(self) -> str:
        return self.task.value if isinstance(self.task, Task) else self.task

    @property
    def name(self) -> str:
        return self.task.name if isinstance(self.task, Task) else self.task

    @property
    def is_custom(self) -> bool:
        """Whether this is a prompt of your own rather than one of the 15 task tokens."""
        return not isinstance(self.task, Task)


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


_RESULT_NAMES = {"text": ResultKind.TEXT, "boxes": ResultKind.BOXES}


_RESULT_NAMES.update(polygons=ResultKind.POLYGONS, ocr=ResultKind.OCR_REGIONS)


_RESULT_NAMES["ocr_regions"] = ResultKind.OCR_REGIONS


_DEFAULT_SIZE = {
    ResultKind.TEXT: AnswerSize.SHORT,
    ResultKind.BOXES: AnswerSize.MEDIUM,
    ResultKind.OCR_REGIONS: AnswerSize.MEDIUM,
    ResultKind.POLYGONS: AnswerSize.LONG,
}


def custom_task(
    prompt: str,
    *,
    takes: str | InputKind = "none",
    result: str | ResultKind = "text",
    description: str = "",
    answer_size: str | AnswerSize | None = None,
) -> TaskSpec:
    """A task of your own: a prompt a fine-tuned or community checkpoint answers.

    Use it wherever a task goes (:func:`run`, :func:`run_tasks`, ``label``, training
    samples). The prompt is sent as written, followed by the text or region the call gives;
    the answer is parsed as ``result`` says, with the same grammar and quantization as the
    built-in tasks.

    Args:
        prompt: The prompt, or its leading token, e.g. ``"<DocVQA>"`` or
            ``"<GENERATE_TAGS>"``. It must not contain one of the 15 built-in task tokens
            (the processor would rewrite it).
        takes: ``"none"``, ``"text"`` (appended to the prompt, e.g. a question) or
            ``"region"`` (a pixel box, appended as four location tokens).
        result: ``"text"``, ``"boxes"``, ``"polygons"`` or ``"ocr"`` (text regions).
        description: One line saying what it does.
        answer_size: ``"short"``, ``"medium"`` or ``"long"``; by default from ``result``.

    Raises:
        UnknownTaskError: An empty prompt, a built-in task token in it, or an unknown
            ``takes`` / ``result``.

    Example:
        >>> docvqa = custom_task("<DocVQA>", takes="text")
        >>> docvqa.token, docvqa.result.value
        ('<DocVQA>', 'text')
    """
    text = str(prompt).strip()
    if not text:
        raise UnknownTaskError("A custom task needs a prompt, e.g. custom_task('<DocVQA>').")
    inside = next((t for t in Task if t.value in text), None)
    if inside is not None:
        raise UnknownTaskError(
            f"The prompt {text!r} contains the built-in task token {inside.value}: run the task "
            f"{inside.name!r} itself, or choose a prompt of your own."
        )
    try:
        kind = result if isinstance(result, ResultKind) else _RESULT_NAMES[str(result).lower()]
        needs = InputKind(takes)
        size = _DEFAULT_SIZE[kind] if answer_size is None else AnswerSize(answer_size)
    except (KeyError, ValueError) as error:
        raise UnknownTaskError(
            f"Unknown setting for a custom task ({error}): takes is none, text or region; "
            "result is text, boxes, polygons or ocr; answer_size is short, medium or long."
        ) from None
    return TaskSpec(text, needs, kind, description or f"custom prompt {text}", size)


def task_spec(task: str | Task | TaskSpec) -> TaskSpec:
    """Look up a task by token (``"<OD>"``), name (``"OD"``, ``"od"``) or enum.

    Args:
        task: The task in any of the accepted spellings.

    Returns:
        The task's :class:`TaskSpec`.

    A custom prompt is never guessed from a string: make it with :func:`custom_task`, or
    pass ``prompt=`` to :func:`run`.

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
        f"Unknown Florence-2 task {task!r}.{hint} Known tasks: {', '.join(Task.__members__)}. "
        "For a prompt of your own, use custom_task(...) or run(..., prompt=...)."
    )
