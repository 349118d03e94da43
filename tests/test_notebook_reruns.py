"""A learner re-runs a notebook in the same folder: it runs again and shows the same results.

nbval runs every notebook once. Here each one that nbval runs is executed in a copy of the
repository's ``notebooks/`` and ``images/`` folders of its own, and, where that run left files
there (such as 07's labelling output), a second time in the same folder: every output of the
second run must equal the first's, apart from what is measured afresh: times, rates, and
progress bars. A notebook that writes nothing starts a second run exactly as it started the
first, so it runs once. Different notebooks run at the same time, each in its own kernel.

Every run carries harness cells the learner never sees: after each plain-library cell, a check
that it gives the same numbers as the helper it explains (:data:`CHECKS`); and at the end, the
folded solution of every exercise, each of which must run (:data:`UNRUN`: those that download a
checkpoint or start Ray).
The fine-tuning notebooks are run twice by tests/test_notebook_training.py.
"""

import os
import re
import shutil
import textwrap
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
RERUN = sorted(
    path.name
    for path in (ROOT / "notebooks").glob("*.ipynb")
    if not path.name.startswith(("06_", "08_"))
)
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
# Measured afresh on every run: "3.2 s", "41 ms", "1.5 images/s", "12.0 it/s", tqdm bars.
# Leading spaces go with the figure: a table right-aligns 9.8 s and 10.2 s differently.
_MEASURED = re.compile(
    r" *\d+(?:\.\d+)?(?:e-?\d+)?\s*(?:s|ms|µs|min|it/s|s/it|(?:images?|tokens?|requests?)/s|x)\b"
    r"|\d{2}:\d{2}(?::\d{2})?"
    r"|\d+ generate calls"  # how requests arriving together were batched: timing decides
    r"|127\.0\.0\.1:\d+"  # a free port, picked afresh
)


def _shown(notebook) -> list[str]:
    """Per code cell, its printed text, results and errors with measured figures masked.

    Images are left out (the same figure can encode to different bytes), and so is stderr
    (progress bars, library notices). Printed text is joined first: how the kernel splits it
    into chunks varies from run to run.
    """
    cells = []
    for cell in notebook.cells:
        if cell.cell_type != "code" or cell.metadata.get("harness"):
            continue
        texts = []
        for output in cell.outputs:
            if output.output_type == "stream":
                texts.append(output.text if output.name == "stdout" else "")
            elif output.output_type == "error":
                texts.append(f"{output.ename}: {output.evalue}\n")
            else:
                texts.append(output.get("data", {}).get("text/plain", "") + "\n")
        cells.append(_MEASURED.sub("<measured>", "".join(texts)))
    return cells


def solutions(notebook) -> list[tuple[int, str]]:
    """``(exercise number, code)`` of each folded Python solution in the Exercises cell."""
    (exercises,) = [c for c in notebook.cells if c.source.startswith("## Exercises")]
    found = []
    for block in re.split(r"(?m)^(?=\d+\. )", exercises.source):
        number = _EXERCISE.match(block)
        for code in _SOLUTION.findall(block):
            found.append((int(number.group(1)), textwrap.dedent(code)))
    return found


def _with_harness(notebook, name: str):
    """The notebook with its checks after their cells and its exercises' solutions at the end."""
    cells = notebook.cells
    for marker, check in CHECKS.get(name, {}).items():
        (index,) = [i for i, c in enumerate(cells) if marker in c.source and c.cell_type == "code"]
        cells.insert(index + 1, _harness_cell(check))
    for number, code in solutions(notebook):
        if (name, number) not in UNRUN:
            cells.append(_harness_cell(f"# exercise {number}\n{code}"))
    return notebook


def _harness_cell(source: str):
    cell = nbformat.v4.new_code_cell(source.strip())
    cell.metadata["harness"] = True
    return cell


def _run_again_if_it_left_files(root: Path, name: str) -> list[list[str]]:
    """The notebook's shown outputs per run: a second run only where the first left files in
    the checkout (a notebook that writes nothing starts the second run as it started the first).
    Both runs carry the harness cells."""
    shutil.copytree(ROOT / "images", root / "images")
    folder = root / "notebooks"
    folder.mkdir()
    shutil.copy(ROOT / "notebooks" / name, folder / name)
    runs, before = [], _files(root)
    while len(runs) < 2:
        notebook = _with_harness(nbformat.read(folder / name, as_version=4), name)
        NotebookClient(
            notebook,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(folder)}},
        ).execute(env={**os.environ, "OMP_NUM_THREADS": "1"})  # three kernels at a time
        runs.append(_shown(notebook))
        if _files(root) == before:
            break
    return runs


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="module")
def reruns(tmp_path_factory) -> Iterator[dict[str, Future]]:
    """Each notebook run in a copy of the checkout of its own, three notebooks at a time.

    Every notebook has a kernel of its own, and most of a run is starting it and importing
    torch, so runs of different notebooks overlap well even on two cores, given one thread
    each: with torch's default of every core per kernel, their OpenMP threads spin waiting for
    each other (509 s against 191 s for these runs, measured on 2 cores).
    """
    pool = ThreadPoolExecutor(max_workers=3)
    yield {
        name: pool.submit(_run_again_if_it_left_files, tmp_path_factory.mktemp("checkout"), name)
        for name in RERUN
    }
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("name", RERUN)
def test_a_second_run_in_the_same_folder_shows_the_same_results(reruns, name):
    first, *again = reruns[name].result()
    for second in again:
        for index, (before, after) in enumerate(zip(first, second, strict=True)):
            assert after == before, f"{name}, code cell {index}: the second run shows other output"


def test_a_notebook_that_writes_files_is_run_twice(reruns):
    assert len(reruns["07_batch_and_scale.ipynb"].result()) == 2


def test_every_notebook_s_exercises_have_a_hint_and_a_folded_solution():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        (exercises,) = [c for c in notebook.cells if c.source.startswith("## Exercises")]
        blocks = [b for b in re.split(r"(?m)^(?=\d+\. )", exercises.source) if _EXERCISE.match(b)]
        assert blocks, path.name
        for block in blocks:
            assert "*Hint:*" in block, (path.name, block[:60])
            assert "<details><summary>Solution</summary>" in block, (path.name, block[:60])
