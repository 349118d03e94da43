"""Masks from words: Florence-2 finds each object's box, Segment Anything 2 draws its mask.

``sam`` (load SAM 2 with transformers' native classes), ``prompts`` (SAM 2's inputs and masks
as ``Sam2Processor`` makes them, with or without torchvision), ``results`` (:class:`MasksResult`:
masks, areas, cut-outs, COCO RLE, supervision; :func:`plot_masks`), ``segment`` (the pipeline).

Layer 3: imports ``language``, ``boundary``, ``drawing`` and ``model``.

Example:
    >>> from florence_helpers import load_model
    >>> from florence_helpers.masks import load_sam, plot_masks, segment
    >>> florence, sam = load_model(), load_sam()  # doctest: +SKIP
    >>> found = segment(florence, sam, "images/cat.jpg", "the cat")  # doctest: +SKIP
    >>> plot_masks("images/cat.jpg", found)  # doctest: +SKIP
"""

from .prompts import predict_masks
from .results import MasksResult, plot_masks
from .sam import DEFAULT_SAM_ID, SAM_CHECKPOINTS, SamModel, load_sam, torchvision_works
from .segment import segment

__all__ = [
    "DEFAULT_SAM_ID",
    "SAM_CHECKPOINTS",
    "MasksResult",
    "SamModel",
    "load_sam",
    "plot_masks",
    "predict_masks",
    "segment",
    "torchvision_works",
]
