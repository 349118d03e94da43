"""A learner re-runs a notebook in the same folder: it runs again and shows the same results.

nbval runs every notebook once. Here each one that nbval runs is executed twice in one copy of
the repository's ``notebooks/`` and ``images/`` folders (so files written by the first run, such
as 07's labelling output, are there for the second), and every output of the second run must
equal the first's, apart from what is measured afresh: times, rates, and progress bars.
The fine-tuning notebooks are run twice by tests/test_notebook_training.py.
"""

import re
import shutil
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
# Measured afresh on every run: "3.2 s", "41 ms", "1.5 images/s", "12.0 it/s", tqdm bars.
_MEASURED = re.compile(
    r"\d+(?:\.\d+)?(?:e-?\d+)?\s*(?:s|ms|µs|min|it/s|s/it|images?/s|tokens?/s|x)\b"
    r"|\d{2}:\d{2}(?::\d{2})?"
)


def _shown(notebook) -> list[str]:
    """Per code cell, its printed text, results and errors with measured figures masked.

    Images are left out (the same figure can encode to different bytes), and so is stderr
    (progress bars, library notices). Printed text is joined first: how the kernel splits it
    into chunks varies from run to run.
    """
    cells = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
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


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the notebooks and sample images, as a learner's checkout would have them."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(ROOT / "images", root / "images")
    (root / "notebooks").mkdir()
    for name in RERUN:
        shutil.copy(ROOT / "notebooks" / name, root / "notebooks" / name)
    return root / "notebooks"


@pytest.mark.parametrize("name", RERUN)
def test_a_second_run_in_the_same_folder_shows_the_same_results(workspace, name):
    runs = []
    for _ in range(2):
        notebook = nbformat.read(workspace / name, as_version=4)
        NotebookClient(
            notebook,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(workspace)}},
        ).execute()
        runs.append(_shown(notebook))
    first, second = runs
    for index, (before, after) in enumerate(zip(first, second, strict=True)):
        assert after == before, f"{name}, code cell {index}: the second run shows other output"
