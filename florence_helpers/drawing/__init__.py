"""Drawing and converting results: matplotlib and PIL drawings, masks, COCO, supervision,
and short text summaries.

``plotting`` (``plot_result``, ``annotate`` and friends), ``conversions`` (masks, cut-outs,
COCO, supervision), ``summaries`` (a result in a line or as readable JSON).

Layer 1: may import ``language`` and ``boundary``.
"""
