"""The notebook template, the stored-output policy and the single repository URL."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _tool():
    spec = importlib.util.spec_from_file_location("notebook_tool", REPO / "tools" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _tool()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_the_template_and_stores_no_model_output(path):
    assert tool.policy_problems(path) == []


def test_links_agree_with_the_repository_url():
    assert tool.sync(check_only=True) == []


def test_readme_lists_every_notebook_with_its_colab_link():
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme
        assert tool.colab_url(path.name) in readme


def test_changing_the_url_rewrites_badges_and_install_cells():
    import nbformat

    cells = nbformat.read(NOTEBOOKS[0], as_version=4).cells
    text = "\n".join(cell.source for cell in cells)
    new_url = "https://github.com/someone/elsewhere"
    rewritten = tool._synced_text(text, new_url)
    assert tool.repo_url() not in rewritten
    assert "colab.research.google.com/github/someone/elsewhere/blob/main/notebooks/" in rewritten
    assert f'REPO_URL = "{new_url}"' in rewritten


def test_policy_catches_a_stored_model_output(tmp_path):
    import nbformat

    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "run(" in c.source)
    cell.outputs = [nbformat.v4.new_output("stream", text="a caption")]
    copy = tmp_path / NOTEBOOKS[0].name
    nbformat.write(nb, copy)
    assert any("stores output" in problem for problem in tool.policy_problems(copy))


def test_colab_pins_are_the_tested_versions():
    """constraints-colab.txt is a subset of constraints.txt that pins transformers."""
    root = Path(__file__).resolve().parents[1]

    def pins(name):
        lines = (root / name).read_text().splitlines()
        return {line for line in lines if line and not line.startswith("#")}

    colab = pins("constraints-colab.txt")
    assert colab <= pins("constraints.txt")
    assert any(line.startswith("transformers==") for line in colab)
    assert not any(line.lower().startswith(("torch==", "numpy==", "pillow==")) for line in colab)


def _cells(name):
    import nbformat

    return nbformat.read(REPO / "notebooks" / name, as_version=4).cells


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_says_at_the_top_how_long_it_takes_and_where_that_was_measured(path):
    top = _cells(path.name)[0].source
    assert "**Time:**" in top and "measured on a 2-core" in top and "notebook_times.py" in top


def test_no_notebook_speaks_of_this_project_instead_of_what_was_measured():
    for path in NOTEBOOKS:
        text = "\n".join(cell.source for cell in _cells(path.name))
        for phrase in ("this project's 2-core", "walkthrough this project started from"):
            assert phrase not in text, (path.name, phrase)


def test_the_rocket_notebook_asks_about_what_the_photo_shows():
    """The photo: a rocket standing on its pad at dusk, no smoke; the box asked about is the
    rocket, as drawn by hand in images/annotations.json."""
    import json
    import re

    text = "\n".join(cell.source for cell in _cells("02_detection_and_grounding.ipynb"))
    for false in ("smoke", "lifts off", "launching"):
        assert false not in text.lower()
    region = [float(v) for v in re.search(r"^region = \(([^)]*)\)", text, re.M).group(1).split(",")]
    labelled = json.loads((REPO / "images" / "annotations.json").read_text())
    (rocket,) = [
        a["bbox"]
        for a in labelled["annotations"]
        if a["image_id"] == 2
        and a["category_id"] in {c["id"] for c in labelled["categories"] if c["name"] == "rocket"}
    ]
    x, y, w, h = rocket
    x1, y1, x2, y2 = region
    inter = max(0, min(x2, x + w) - max(x1, x)) * max(0, min(y2, y + h) - max(y1, y))
    union = (x2 - x1) * (y2 - y1) + w * h - inter
    assert inter / union >= 0.9
