import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from florence_helpers import FlorenceModel, load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def device() -> str:
    """Where device-agnostic tests run: ``$FLORENCE_TEST_DEVICE`` (e.g. ``cuda``), else the CPU.

    Tests about the CPU itself (its bf16 autocast, thread counts, Ray workers) stay on it.
    """
    return os.environ.get("FLORENCE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def load_tiny(tiny_model_dir: Path, device: str) -> Callable[..., FlorenceModel]:
    """``load_model`` for a fresh tiny model on the test device, in fp32 unless told."""

    def load(**kwargs: Any) -> FlorenceModel:
        return load_model(tiny_model_dir, **{"device": device, "dtype": "float32", **kwargs})

    return load


@pytest.fixture(scope="session")
def florence(load_tiny: Callable[..., FlorenceModel]) -> FlorenceModel:
    """The tiny Florence-2 shared by a session's tests, in fp32 on the test device."""
    return load_tiny()


@pytest.fixture(scope="session")
def processor(florence: FlorenceModel):
    return florence.processor


@pytest.fixture
def photo() -> Image.Image:
    """A 400x300 RGB test image with some structure."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
