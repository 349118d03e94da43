from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from florence_helpers import FlorenceModel, load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def florence(tiny_model_dir: Path) -> FlorenceModel:
    """The tiny Florence-2, loaded on the CPU in fp32."""
    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def processor(florence: FlorenceModel):
    return florence.processor


@pytest.fixture
def photo() -> Image.Image:
    """A 400x300 RGB test image with some structure."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
