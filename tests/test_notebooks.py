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
