"""The task language: what Florence-2 is asked and how it answers.

``tasks`` (the 15 tasks and custom ones), ``prompts`` (a task's input checked and written as a
prompt), ``regions`` (pixel boxes and the ``<loc_N>`` bins), ``grammar`` (the answer grammar),
``results`` (typed results parsed from answers), ``ocr`` (reading order and lines).

Layer 0: imports nothing from the rest of the package.
"""
