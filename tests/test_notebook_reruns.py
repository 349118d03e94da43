"""A learner re-runs a notebook in the same folder: it runs again and shows the same results.

nbval runs every notebook once, with the harness cells of tests/notebook_harness.py, which
check among other things that only the notebooks in :data:`WRITES_FILES` leave files in their
folder. Here each of those is executed in a copy of the repository's ``notebooks/`` and
``images/`` folders of its own, and then a second time in the same folder: every output of the
second run must equal the first's, apart from what is measured afresh: times, rates, and
progress bars. A notebook that writes nothing starts a second run exactly as it started the
first, so nbval's run is all it needs. Both runs carry the harness cells.
The fine-tuning notebooks are run twice by tests/test_notebook_training.py.
"""

import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from notebook_harness import _EXERCISE, WRITES_FILES, with_harness

ROOT = Path(__file__).resolve().parents[1]
RERUN = sorted(WRITES_FILES)
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


def _two_runs_in_one_folder(root: Path, name: str) -> list[list[str]]:
    """The notebook's shown outputs of each of two runs in one copy of the checkout, both
    with the harness cells; the first must leave files there (or it needs no second run)."""
    shutil.copytree(ROOT / "images", root / "images")
    folder = root / "notebooks"
    folder.mkdir()
    shutil.copy(ROOT / "notebooks" / name, folder / name)
    runs, before = [], _files(root)
    for _ in range(2):
        notebook = with_harness(nbformat.read(folder / name, as_version=4), name)
        NotebookClient(
            notebook,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(folder)}},
        ).execute(env={**os.environ, "OMP_NUM_THREADS": "1"})  # beside another worker
        runs.append(_shown(notebook))
        assert _files(root) != before, f"{name} left no files: take it out of WRITES_FILES"
    return runs


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


@pytest.mark.parametrize("name", RERUN)
def test_a_second_run_in_the_same_folder_shows_the_same_results(tmp_path, name):
    first, second = _two_runs_in_one_folder(tmp_path, name)
    for index, (before, after) in enumerate(zip(first, second, strict=True)):
        assert after == before, f"{name}, code cell {index}: the second run shows other output"


def test_every_notebook_s_exercises_have_a_hint_and_a_folded_solution():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        (exercises,) = [c for c in notebook.cells if c.source.startswith("## Exercises")]
        blocks = [b for b in re.split(r"(?m)^(?=\d+\. )", exercises.source) if _EXERCISE.match(b)]
        assert blocks, path.name
        for block in blocks:
            assert "*Hint:*" in block, (path.name, block[:60])
            assert "<details><summary>Solution</summary>" in block, (path.name, block[:60])
