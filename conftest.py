"""Test session set-up shared by the unit tests and the notebooks run by nbval.

A tiny random-weight Florence-2 is built once per session. ``FLORENCE_MODEL`` points at it
unless you set it yourself, so notebooks executed by nbval (whose kernels inherit this
process's environment) load it instead of reaching for the hub. The fine-tuning notebooks are
run by tests/test_notebook_training.py instead, which inserts the tiny model's settings.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from florence_helpers.testing import build_tiny_model

_TINY_DIR: Path | None = None

# The fine-tuning notebooks show settings for a real checkpoint; tests/test_notebook_training.py
# runs them with the tiny model's settings inserted by the harness, instead of nbval as they are.
collect_ignore = ["notebooks/06_fine_tuning.ipynb", "notebooks/08_fine_tuning_document_vqa.ipynb"]


def pytest_configure(config: pytest.Config) -> None:
    global _TINY_DIR
    _TINY_DIR = Path(tempfile.mkdtemp(prefix="tiny-florence2-"))
    build_tiny_model(_TINY_DIR)
    os.environ.setdefault("FLORENCE_MODEL", str(_TINY_DIR))
    # Notebooks draw with matplotlib; never open a window.
    os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _TINY_DIR is not None:
        shutil.rmtree(_TINY_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Directory of the tiny Florence-2 built for this session."""
    assert _TINY_DIR is not None
    return _TINY_DIR
