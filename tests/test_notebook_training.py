"""The fine-tuning notebooks run top to bottom with the tiny model, settings set by the harness.

nbval runs the other notebooks as they are. These two fine-tune, and the settings a learner
sees are for a real checkpoint; the harness inserts a cell after the parameters cell (as
papermill does) with settings under which the tiny model learns its training data by heart
(measured in tests/test_finetune.py and tests/test_qa.py), evaluates on the training data
(the tiny model can only memorise), then reads the metrics the notebook computed.
"""

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def executed(path: Path, folder: Path, settings: str, after: dict[str, str], report: str):
    """Run the notebook in ``folder`` with ``settings`` after its parameters cell and each
    ``after`` cell inserted after the first cell containing its key; ``report`` runs last."""
    notebook = nbformat.read(path, as_version=4)
    cells = notebook.cells
    index = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    cells.insert(index + 1, nbformat.v4.new_code_cell(settings))
    for marker, source in after.items():
        index = next(i for i, c in enumerate(cells) if marker in c.source)
        cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    cells.append(nbformat.v4.new_code_cell(f"import json\n\nprint(json.dumps({report}))"))
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute()
    return json.loads(notebook.cells[-1].outputs[0]["text"])


def test_the_coco_fine_tuning_notebook_learns_its_images_by_heart(tmp_path):
    report = executed(
        NOTEBOOKS / "06_fine_tuning.ipynb",
        tmp_path,
        "NUM_IMAGES = 4\nEPOCHS = 600\nLEARNING_RATE = 5e-3",
        {"dataset.split(": "train_set = val_set = dataset  # the tiny model can only memorise"},
        '{"drop": history.loss_drop(), "after": after.map50, "before": before.map50}',
    )
    assert report["drop"] >= 0.9
    assert report["after"] == 1.0 > report["before"]


def test_the_document_vqa_notebook_runs_twice_and_learns_by_heart(tmp_path):
    for _ in range(2):  # a learner re-running it in the same folder gets the same results
        report = executed(
            NOTEBOOKS / "08_fine_tuning_document_vqa.ipynb",
            tmp_path,
            "NUM_RECEIPTS = 4\nEPOCHS = 600\nLEARNING_RATE = 5e-3\nBATCH_SIZE = 12\nLORA_RANK = 16",
            {},
            '{"before": before.summary(), "memorised": memorised.summary()}',
        )
        assert report["memorised"]["exact match"] == 1.0
        assert report["memorised"]["ANLS"] == 1.0
        assert report["before"]["exact match"] < 1.0
    assert (tmp_path / "docvqa_output" / "adapter").is_dir()
