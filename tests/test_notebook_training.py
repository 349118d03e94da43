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
# After the notebooks' training step written by hand: the loss it printed is the helper's.
STEP_IS_THE_HELPERS = {
    "loss_after = model.eval()": (
        "from florence_helpers.training import validation_loss\n"
        "assert abs(validation_loss(lora.model, [batch]) - loss_before) < 1e-4, loss_before"
    )
}


def executed(
    path: Path,
    folder: Path,
    settings: str,
    after: dict[str, str],
    report: str,
    edits: dict[str, str] | None = None,
):
    """Run the notebook in ``folder`` with ``settings`` after its parameters cell and each
    ``after`` cell inserted after the first cell containing its key; ``report`` runs last.
    ``edits`` replaces text in the one cell that holds it, as a learner doing an exercise would."""
    notebook = nbformat.read(path, as_version=4)
    cells = notebook.cells
    for old, new in (edits or {}).items():
        (cell,) = [c for c in cells if old in c.source]
        cell.source = cell.source.replace(old, new)
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
        {
            "dataset.split(": "train_set = val_set = dataset  # the tiny model can only memorise",
            **STEP_IS_THE_HELPERS,
        },
        '{"drop": history.loss_drop(), "after": after.map50, "before": before.map50,'
        ' "validation": history.validation_losses, "phrase": phrase, "same": len(same),'
        ' "referred": len(found)}',
    )
    # The ms-swift section's referring phrase names one object, and its target has one box.
    assert report["referred"] == 1
    assert report["phrase"].startswith("the leftmost " if report["same"] > 1 else "the ")
    assert report["drop"] >= 0.9
    assert report["after"] == 1.0 > report["before"]
    assert len(report["validation"]) == 600 and report["validation"][-1] < report["validation"][0]


def test_the_exercises_of_the_coco_notebook_start_from_it_in_the_same_folder(tmp_path):
    """Each exercise of 06 as a learner does it, one after the other in one folder (the first
    twice, with the same results): before training started afresh by default, the second of
    these stopped at the old checkpoint."""
    from florence_helpers.training.sample_data import make_shapes_dataset

    memorise = {"dataset.split(": "train_set = val_set = dataset"}
    report = (
        '{"steps": len(history.losses), "task": str(train_set[0].task), "samples": len(dataset),'
        ' "trainable": trainable, "metrics": after.summary(), "losses": history.losses}'
    )
    run = {
        "path": NOTEBOOKS / "06_fine_tuning.ipynb",
        "folder": tmp_path,
        "after": memorise,
        "report": report,
    }
    # Exercises 2 and 3: fewer epochs, a smaller LoRA rank; run twice, with the same results.
    small, again = (
        executed(**run, settings="NUM_IMAGES = 4\nEPOCHS = 2", edits={"rank=16": "rank=4"})
        for _ in range(2)
    )
    assert again == small
    assert small["steps"] == 2  # one step per epoch: 4 images, batch size 4
    assert "mAP@.5" in small["metrics"]
    # Exercises 1, 2 and 3 again: one open-vocabulary prompt per category, more epochs, rank 32.
    per_class = executed(
        **run,
        settings="NUM_IMAGES = 4\nEPOCHS = 5",
        edits={
            'on_error="skip")': 'on_error="skip", task="OPEN_VOCABULARY_DETECTION")',
            "rank=16": "rank=32",
        },
    )
    assert per_class["task"] == "<OPEN_VOCABULARY_DETECTION>" and per_class["steps"] >= 5
    assert small["trainable"] < per_class["trainable"]
    # Exercise 4: a COCO export of your own.
    export = make_shapes_dataset(tmp_path / "my_export", num_images=6, seed=3)
    own = executed(**run, settings=f"COCO_FILE = {str(export)!r}\nEPOCHS = 2")
    assert own["samples"] == 6 and own["steps"] == 4  # 6 images in batches of 4


def test_the_document_vqa_notebook_runs_twice_and_learns_by_heart(tmp_path):
    for _ in range(2):  # a learner re-running it in the same folder gets the same results
        report = executed(
            NOTEBOOKS / "08_fine_tuning_document_vqa.ipynb",
            tmp_path,
            "NUM_RECEIPTS = 4\nEPOCHS = 600\nLEARNING_RATE = 5e-3\nBATCH_SIZE = 12\nLORA_RANK = 16",
            STEP_IS_THE_HELPERS,
            '{"before": before.summary(), "memorised": memorised.summary()}',
        )
        assert report["memorised"]["exact match"] == 1.0
        assert report["memorised"]["ANLS"] == 1.0
        assert report["before"]["exact match"] < 1.0
    assert (tmp_path / "docvqa_output" / "adapter").is_dir()
