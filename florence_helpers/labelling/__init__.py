"""Labelling a collection: one JSON line per image, resumable, errors recorded; on one machine
or on Ray Data.

``jobs`` (``label``, ``label_batch``, ``find_images``: running a job), ``files`` (the label
file: what it holds, whether a job may write it, resuming), ``reading`` (records read back,
COCO export), ``masks`` (SAM 2 masks in records), ``ray`` (the same job on Ray Data).

Layer 4: may import ``language``, ``boundary``, ``drawing``, ``model``, ``training`` and
``masks``; not ``serve``.

Example:
    >>> from florence_helpers.labelling import label, read_labels
"""

from .files import (
    LABEL_FILE_VERSION,
    LabelFileError,
    check_label_file,
    job_settings,
    resolved_path,
)
from .jobs import (
    IMAGE_SUFFIXES,
    UNREADABLE_IMAGE_SUFFIXES,
    LabellingInterrupted,
    LabelSummary,
    find_images,
    job_for,
    label,
    label_batch,
    read_images,
)
from .ray import FlorenceLabeller, label_with_ray
from .reading import export_coco, read_labels, record_result

__all__ = [
    "IMAGE_SUFFIXES",
    "LABEL_FILE_VERSION",
    "UNREADABLE_IMAGE_SUFFIXES",
    "FlorenceLabeller",
    "LabelFileError",
    "LabelSummary",
    "LabellingInterrupted",
    "check_label_file",
    "export_coco",
    "find_images",
    "job_for",
    "job_settings",
    "label",
    "label_batch",
    "label_with_ray",
    "read_images",
    "read_labels",
    "record_result",
    "resolved_path",
]
