"""Test session set-up shared by the unit tests and the notebooks run by nbval.

A tiny random-weight Florence-2 and a tiny SAM 2 are built once per session.
``FLORENCE_MODEL`` and ``SAM_MODEL`` point at them unless you set them yourself, so notebooks
executed by nbval (whose kernels inherit this process's environment) load them instead of
reaching for the hub. The fine-tuning notebooks are
run by tests/test_notebook_training.py instead, which inserts the tiny model's settings.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from florence_helpers.testing import build_tiny_model, build_tiny_sam

_TINY_DIR: Path | None = None
_TINY_SAM_DIR: Path | None = None

# The fine-tuning notebooks show settings for a real checkpoint; tests/test_notebook_training.py
# runs them with the tiny model's settings inserted by the harness, instead of nbval as they are.
collect_ignore = ["notebooks/06_fine_tuning.ipynb", "notebooks/08_fine_tuning_document_vqa.ipynb"]


# `make test` runs the tests in parallel with pytest-xdist. A file's tests share fixtures (a
# notebook's cells share one kernel), so each file runs in one worker, except these, whose
# tests are long and independent; and the longest files start first, so that no worker is left
# with one of them at the end.
_SPLIT = ("tests/test_finetune.py", "tests/test_qa.py")
_FIRST = (
    "tests/test_notebook_reruns.py",
    "tests/test_benchmarks.py",
    "tests/test_notebook_training.py",
)


def pytest_configure(config: pytest.Config) -> None:
    global _TINY_DIR, _TINY_SAM_DIR
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _share_the_cores()
    _TINY_DIR = Path(tempfile.mkdtemp(prefix="tiny-florence2-"))
    build_tiny_model(_TINY_DIR)
    os.environ.setdefault("FLORENCE_MODEL", str(_TINY_DIR))
    _TINY_SAM_DIR = Path(tempfile.mkdtemp(prefix="tiny-sam2-"))
    build_tiny_sam(_TINY_SAM_DIR)
    os.environ.setdefault("SAM_MODEL", str(_TINY_SAM_DIR))
    # Notebooks draw with matplotlib; never open a window.
    os.environ.setdefault("MPLBACKEND", "Agg")


def _share_the_cores() -> None:
    """Give each xdist worker its share of the cores, for torch and for every kernel,
    subprocess and Ray worker it starts (they read ``OMP_NUM_THREADS``). With torch's default
    of every core in every worker, OpenMP threads spin waiting for each other: measured on 2
    cores, the notebook re-runs took 509 s that way and 191 s with one thread each."""
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _file(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (see :data:`_FIRST`)."""
    items.sort(
        key=lambda item: (
            _FIRST.index(_file(item.nodeid)) if _file(item.nodeid) in _FIRST else len(_FIRST)
        )
    )


if importlib.util.find_spec("xdist") is not None:

    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        """Whole files to a worker, in the order collected, but :data:`_SPLIT`'s tests one by one.

        (xdist's ``loadgroup`` marks cannot group a notebook's cells: nbval's items ignore the
        group xdist adds to their ids.)
        """
        from xdist.scheduler import LoadScopeScheduling

        class ByFile(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return nodeid if _file(nodeid) in _SPLIT else _file(nodeid)

        return ByFile(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Any:
    """nbval's notebooks with the harness cells the learner never sees (a private checkout,
    checks, exercise solutions: see tests/notebook_harness.py) run in the same kernel."""
    collected = yield
    if file_path.suffix != ".ipynb" or not collected:
        return collected
    from nbval.plugin import IPyNbFile

    return [
        _harnessed().from_parent(parent, path=file_path) if type(found) is IPyNbFile else found
        for found in collected
    ]


def _harnessed() -> type:
    """nbval's notebook collector, with the harness cells inserted among the notebook's."""
    from collections import defaultdict
    from copy import deepcopy

    from nbval.plugin import IPyNbCell, IPyNbFile

    from tests.notebook_harness import with_harness

    class HarnessedNotebook(IPyNbFile):
        def collect(self) -> Any:
            plain = iter(list(super().collect()))  # reads the notebook into self.nb
            notebook = with_harness(deepcopy(self.nb), self.path.name, private=True)
            code = [cell for cell in notebook.cells if cell.cell_type == "code"]
            for number, cell in enumerate(code):
                if not cell.metadata.get("harness"):
                    yield next(plain)
                    continue
                yield IPyNbCell.from_parent(
                    self,
                    name=f"Harness cell {number}",
                    cell_num=number,
                    cell=cell,
                    options=defaultdict(bool, check=False),
                )

    return HarnessedNotebook


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in (_TINY_DIR, _TINY_SAM_DIR):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Directory of the tiny Florence-2 built for this session."""
    assert _TINY_DIR is not None
    return _TINY_DIR
