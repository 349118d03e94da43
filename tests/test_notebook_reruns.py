"""A learner re-runs a notebook in the same folder: it runs again and shows the same results.

nbval runs every notebook once. Here each one that nbval runs is executed twice in one copy of
the repository's ``notebooks/`` and ``images/`` folders (so files written by the first run, such
as 07's labelling output, are there for the second), and every output of the second run must
equal the first's, apart from what is measured afresh: times, rates, and progress bars.
Different notebooks run at the same time, each in its own kernel.
The fine-tuning notebooks are run twice by tests/test_notebook_training.py.
"""

import re
import shutil
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


def _run_twice(folder: Path, name: str) -> list[list[str]]:
    runs = []
    for _ in range(2):
        notebook = nbformat.read(folder / name, as_version=4)
        NotebookClient(
            notebook,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(folder)}},
        ).execute()
        runs.append(_shown(notebook))
    return runs


@pytest.fixture(scope="module")
def reruns(tmp_path_factory) -> Iterator[dict[str, Future]]:
    """Each notebook run twice in one copy of the checkout, three notebooks at a time.

    Every notebook has a kernel of its own, and most of a run is starting it and importing
    torch, so runs of different notebooks overlap well even on two cores.
    """
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(ROOT / "images", root / "images")
    folder = root / "notebooks"
    folder.mkdir()
    for name in RERUN:
        shutil.copy(ROOT / "notebooks" / name, folder / name)
    pool = ThreadPoolExecutor(max_workers=3)
    yield {name: pool.submit(_run_twice, folder, name) for name in RERUN}
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("name", RERUN)
def test_a_second_run_in_the_same_folder_shows_the_same_results(reruns, name):
    first, second = reruns[name].result()
    for index, (before, after) in enumerate(zip(first, second, strict=True)):
        assert after == before, f"{name}, code cell {index}: the second run shows other output"
