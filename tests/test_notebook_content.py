"""What the notebooks say and show agrees with the photos, the pages they build and the helpers.

The fine-tuning notebooks (06, 08) build their LoRA adapter with plain peft beside
``add_lora``, and their training batch by hand beside ``collate``: their cells run here, with the
tiny model, and must give what the helpers give.
"""

import contextlib
import io
import json
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
FINE_TUNING = ["06_fine_tuning.ipynb", "08_fine_tuning_document_vqa.ipynb"]


def _cells(name: str) -> list:
    return nbformat.read(NOTEBOOKS / name, as_version=4).cells


def _code(name: str, marker: str) -> str:
    """The source of the one code cell of ``name`` that contains ``marker``."""
    (source,) = [c.source for c in _cells(name) if c.cell_type == "code" and marker in c.source]
    return source


def _execute(source: str, namespace: dict) -> str:
    """Run a cell's source in ``namespace``; what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "<notebook cell>", "exec"), namespace)
    return printed.getvalue()


def _peft_cells(name: str, florence) -> tuple[dict, str]:
    """The notebook's plain-peft cell and its add_lora cell, run on ``florence``; the namespace
    and what the peft cell printed. The peft model the cell deletes is kept, to compare."""
    namespace = {"os": os, "florence": florence}
    (parameters,) = [c.source for c in _cells(name) if "parameters" in c.metadata.get("tags", [])]
    _execute(parameters, namespace)
    peft_cell = _code(name, "from peft import LoraConfig, get_peft_model")
    assert "del plain" in peft_cell
    printed = _execute(peft_cell.replace("del plain", "pass"), namespace)
    if "lora" not in namespace:  # 06 calls add_lora in the next cell
        _execute(_code(name, "lora = add_lora(florence"), namespace)
    return namespace, printed


@pytest.mark.parametrize("name", FINE_TUNING)
def test_the_plain_peft_adapter_is_the_one_add_lora_makes(name, load_tiny):
    from peft.utils import get_peft_model_state_dict

    from florence_helpers.model.adapters import trainable_parameters

    namespace, printed = _peft_cells(name, load_tiny())
    plain, lora = namespace["plain"], namespace["lora"].model
    assert plain.peft_config["default"].to_dict() == lora.peft_config["default"].to_dict()
    assert trainable_parameters(plain)[0] == trainable_parameters(lora)[0] > 0
    assert sorted(plain.targeted_module_names) == sorted(lora.targeted_module_names)
    # The same seed: the same initial weights, not only the same shapes.
    mine, theirs = get_peft_model_state_dict(plain), get_peft_model_state_dict(lora)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[key], theirs[key]) for key in mine)
    # The count of wrapped modules heads its own line; the module names follow, one a line.
    lines = printed.splitlines()
    assert re.fullmatch(r"\d+ modules wrapped, for example:", lines[0]), lines
    assert all("." in line and " " not in line for line in lines[1:4]), lines


def _train_set(name: str, folder: Path):
    from florence_helpers.training.coco import read_coco
    from florence_helpers.training.qa import read_qa
    from florence_helpers.training.sample_data import make_receipts, make_shapes_dataset

    if name.startswith("06_"):
        return read_coco(make_shapes_dataset(folder, num_images=4))
    return read_qa(make_receipts(folder, num_images=2))


@pytest.mark.parametrize("name", FINE_TUNING)
def test_the_batch_built_by_hand_is_the_one_collate_makes(name, florence, tmp_path):
    """The notebooks show the -100 padding of the labels as plain code, not inside collate."""
    from florence_helpers import load_image
    from florence_helpers.training import collate

    source = _code(name, "batch = dict(")
    assert '.masked_fill(answers["attention_mask"] == 0, -100)' in source
    namespace = {
        "train_set": _train_set(name, tmp_path),
        "lora": florence,  # the batch does not depend on the adapter
        "load_image": load_image,
    }
    _execute(source, namespace)
    batch, pair = namespace["batch"], namespace["pair"]
    assert len(pair[0].target) < len(pair[1].target)  # one answer is padded
    expected = collate(florence.processor, pair)
    assert batch.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(batch[key], tensor), key
    assert (batch["labels"][0] == -100).any()


def test_the_quickstart_describes_the_astronaut_s_suit_as_it_is():
    """images/astronaut.jpg: Eileen Collins in an orange launch-and-entry suit."""
    text = "\n".join(c.source for c in _cells("00_quickstart.ipynb"))
    assert "orange space suit" in text and "white space suit" not in text


def test_the_ocr_page_is_the_sheet_the_text_names():
    """The page built in 03 has the size in pixels of the A-series sheet named beside it."""
    cells = _cells("03_ocr.ipynb")
    (index,) = [i for i, c in enumerate(cells) if 'page = Image.new("RGB"' in c.source]
    found = re.search(
        r'\((\d+), (\d+)\), "white"\)\s+# (A\d) \((\d+) x (\d+) mm\) at (\d+) dpi',
        cells[index].source,
    )
    assert found, cells[index].source
    width, height, sheet, short_mm, long_mm, dpi = found.groups()
    # ISO 216: A0 is 841 x 1189 mm; each next size halves the long side (rounded down).
    side = (841, 1189)
    for _ in range(int(sheet[1:])):
        side = (side[1] // 2, side[0])
    assert (int(short_mm), int(long_mm)) == side
    assert (int(width), int(height)) == tuple(round(mm / 25.4 * int(dpi)) for mm in side)
    assert f"an {sheet} sheet" in cells[index - 1].source  # the text that introduces the page


def test_the_box_around_the_cat_covers_the_cat():
    """The box given to <REGION_TO_SEGMENTATION> in 04 covers the cat as drawn by hand in
    images/annotations.json (the cat fills most of the close-up), not only its face."""
    code = _code("04_segmentation.ipynb", '"REGION_TO_SEGMENTATION", region=region')
    region = [float(v) for v in re.search(r"^region = \(([^)]*)\)", code, re.M).group(1).split(",")]
    labelled = json.loads((REPO / "images" / "annotations.json").read_text())
    (cat_id,) = [c["id"] for c in labelled["categories"] if c["name"] == "cat"]
    (image_id,) = [i["id"] for i in labelled["images"] if i["file_name"] == "cat.jpg"]
    (cat,) = [
        a["bbox"]
        for a in labelled["annotations"]
        if a["image_id"] == image_id and a["category_id"] == cat_id
    ]
    x, y, w, h = cat
    x1, y1, x2, y2 = region
    inter = max(0, min(x2, x + w) - max(x1, x)) * max(0, min(y2, y + h) - max(y1, y))
    assert inter / (w * h) >= 0.85
