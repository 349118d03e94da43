"""Harness cells the learner never sees, run with the notebooks.

nbval runs each notebook with them (see ``pytest_collect_file`` in the repository's
conftest.py), and tests/test_notebook_reruns.py runs the notebooks that write files a second
time in the same folder with them:

- first, a cell that moves the kernel into a private copy of the checkout (the notebook and
  ``images/``), so that what a notebook writes lands there and nowhere else;
- after each plain-library cell, a check that it gives the same numbers as the helper it
  explains (:data:`CHECKS`);
- at the end, the folded solution of every exercise, each of which must run (:data:`UNRUN`:
  those that download a checkpoint or start Ray);
- last, a check that the notebook wrote files in its folder exactly if it is one of
  :data:`WRITES_FILES` (those are run a second time in the same folder).
"""

import re
import textwrap

import nbformat

WRITES_FILES = ("07_batch_and_scale.ipynb",)
"""The notebooks that leave files in their folder, so that a second run starts elsewhere than
the first (the harness checks the list is exact)."""

# After the first cell containing the key: a check that the plain-library code gives the
# helper's numbers. A failed assert fails the run.
CHECKS: dict[str, dict[str, str]] = {
    "00_quickstart.ipynb": {
        "parsed = processor.post_process_generation(": """
import numpy as np
_helper = run(florence, image, "OD")
_boxes = np.asarray(parsed["<OD>"]["bboxes"], dtype=np.float32).reshape(-1, 4)
assert np.array_equal(_boxes, _helper.boxes), (_boxes, _helper.boxes)
assert len(parsed["<OD>"]["labels"]) == len(_helper.labels)
""",
    },
    "02_detection_and_grounding.ipynb": {
        'answer_text, task="<OPEN_VOCABULARY_DETECTION>"': """
import numpy as np
_plain = parsed["<OPEN_VOCABULARY_DETECTION>"]
_boxes = np.asarray(_plain["bboxes"], dtype=np.float32).reshape(-1, 4)
assert np.array_equal(_boxes, towers.boxes[: len(_boxes)]), (_boxes, towers.boxes)
""",
    },
    "03_ocr.ipynb": {
        'answer_text, task="<OCR_WITH_REGION>"': """
import numpy as np
_helper = run(florence, sign, "OCR_WITH_REGION")
_quads = np.asarray(parsed["<OCR_WITH_REGION>"]["quad_boxes"], dtype=np.float32)
assert np.array_equal(_quads.reshape(-1, 4, 2), _helper.quads), (_quads, _helper.quads)
""",
    },
    "04_segmentation.ipynb": {
        'answer_text, task="<REFERRING_EXPRESSION_SEGMENTATION>"': """
import numpy as np
_helper = run(florence, image, "REFERRING_EXPRESSION_SEGMENTATION", text="the cat")
_plain = parsed["<REFERRING_EXPRESSION_SEGMENTATION>"]["polygons"]
_shapes = [[np.asarray(f, np.float32).reshape(-1, 2) for f in inst if f] for inst in _plain]
assert [len(s) for s in _shapes] == [len(s) for s in _helper.polygons]
for _mine, _theirs in zip(_shapes, _helper.polygons):
    assert all(np.array_equal(a, b) for a, b in zip(_mine, _theirs))
""",
    },
    "05_confidence_scores.ipynb": {
        "by_hand = float(": "assert abs(by_hand - helper) < 1e-3, (by_hand, helper)",
    },
}
# Exercise solutions not run here, and why.
UNRUN = {
    ("00_quickstart.ipynb", 4): "downloads Florence-2-large",
    ("02_detection_and_grounding.ipynb", 4): "the tiny model's boxes are noise: can be empty",
    ("04_segmentation.ipynb", 3): "the tiny model's boxes are noise: can be empty",
    ("07_batch_and_scale.ipynb", 4): "starts Ray twice more (the notebook already runs it)",
}
_SOLUTION = re.compile(r"<summary>Solution</summary>.*?```python\n(.*?)```", re.S)
_EXERCISE = re.compile(r"^(\d+)\. ", re.M)


def solutions(notebook) -> list[tuple[int, str]]:
    """``(exercise number, code)`` of each folded Python solution in the Exercises cell."""
    (exercises,) = [c for c in notebook.cells if c.source.startswith("## Exercises")]
    found = []
    for block in re.split(r"(?m)^(?=\d+\. )", exercises.source):
        number = _EXERCISE.match(block)
        for code in _SOLUTION.findall(block):
            found.append((int(number.group(1)), textwrap.dedent(code)))
    return found


def with_harness(notebook, name: str, *, private: bool = False):
    """The notebook with its checks after their cells and its exercises' solutions at the end;
    ``private``: run in a private copy of the checkout, checked against :data:`WRITES_FILES`."""
    cells = notebook.cells
    for marker, check in CHECKS.get(name, {}).items():
        (index,) = [i for i, c in enumerate(cells) if marker in c.source and c.cell_type == "code"]
        cells.insert(index + 1, harness_cell(check))
    for number, code in solutions(notebook):
        if (name, number) not in UNRUN:
            cells.append(harness_cell(f"# exercise {number}\n{code}"))
    if private:
        first = next(i for i, c in enumerate(cells) if c.cell_type == "code")
        cells.insert(first, harness_cell(_PRIVATE_CHECKOUT.format(name=name)))
        cells.append(harness_cell(_WROTE_FILES.format(writes=name in WRITES_FILES, name=name)))
    return notebook


_PRIVATE_CHECKOUT = """
import os as _os
import pathlib as _pathlib
import shutil as _shutil
import tempfile as _tempfile

_checkout = _pathlib.Path(_tempfile.mkdtemp(prefix="notebook-checkout-"))
_shutil.copytree(_pathlib.Path("..", "images"), _checkout / "images")
(_checkout / "notebooks").mkdir()
_shutil.copy({name!r}, _checkout / "notebooks")
_os.chdir(_checkout / "notebooks")


def _files():
    return {{str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in _checkout.rglob("*")}}


_before = _files()
"""
_WROTE_FILES = """
_written = sorted(set(_files().items()) ^ set(_before.items()))
_os.chdir(_checkout.parent)
_shutil.rmtree(_checkout)
assert bool(_written) == {writes}, (
    "WRITES_FILES in tests/notebook_harness.py is wrong about {name}", _written[:5]
)
"""


def harness_cell(source: str):
    cell = nbformat.v4.new_code_cell(source.strip())
    cell.metadata["harness"] = True
    return cell
