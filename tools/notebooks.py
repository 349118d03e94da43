"""Keep the notebooks consistent with the repository URL and the notebook policy.

    python tools/notebooks.py sync      # rewrite Colab badges and install cells from the URL
    python tools/notebooks.py outputs   # re-run notebooks, keep only checked outputs
    python tools/notebooks.py check     # report what is out of date or against the policy

The public repository URL is written once, in pyproject.toml ([project.urls] Repository).
``sync`` derives every Colab badge, every install cell and the README's notebook links from it.
``outputs`` executes each notebook (with the tiny offline model unless FLORENCE_MODEL is set),
keeps the outputs of cells tagged ``nbval-check-output`` (cell metadata, out of the learner's
view; nbval compares them; they carry the execution count 1, since nbval skips cells that look
unrun) and clears everything else: model outputs, other execution counts, widget state.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
README = ROOT / "README.md"
CHECK_TAG = "nbval-check-output"
# The Colab install cells' pins: the tested versions of transformers and its neighbours.
COLAB_CONSTRAINTS = "-c constraints-colab.txt"
# nbval skips cells that look unrun, so checked cells carry a count; a constant keeps diffs quiet.
CHECKED_COUNT = 1

_BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^\s\"')]+?/notebooks/[\w.-]+")
_REPO_LINE = re.compile(r'REPO_URL = "[^"]*"')


def repo_url() -> str:
    """The repository URL from pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^Repository\s*=\s*"([^"]+)"', text, flags=re.MULTILINE)
    if not match:
        raise SystemExit("pyproject.toml has no [project.urls] Repository entry")
    return match.group(1).rstrip("/").removesuffix(".git")


def colab_url(notebook_name: str, url: str | None = None) -> str:
    """The Colab link that opens ``notebooks/<notebook_name>`` of the repository's main branch."""
    url = url or repo_url()
    owner_repo = url.split("github.com/", 1)[1]
    return (
        f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{notebook_name}"
    )


def _synced_text(text: str, url: str) -> str:
    text = _BADGE.sub(lambda m: colab_url(m.group(0).rsplit("/", 1)[1], url), text)
    return _REPO_LINE.sub(f'REPO_URL = "{url}"', text)


def sync(check_only: bool = False) -> list[str]:
    """Rewrite (or, with ``check_only``, list) files whose links disagree with the URL."""
    url = repo_url()
    stale = []
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        changed = False
        for cell in nb.cells:
            new = _synced_text(cell.source, url)
            if new != cell.source:
                cell.source, changed = new, True
        if changed:
            stale.append(str(path.relative_to(ROOT)))
            if not check_only:
                nbformat.write(nb, path)
    text = README.read_text()
    new = _synced_text(text, url)
    if new != text:
        stale.append("README.md")
        if not check_only:
            README.write_text(new)
    return stale


def is_checked(cell: Any) -> bool:
    """Whether nbval compares this cell's output with the stored one."""
    return CHECK_TAG in cell.get("metadata", {}).get("tags", [])


def policy_problems(path: Path) -> list[str]:
    """What in a notebook breaks the template or the no-stored-output policy."""
    nb = nbformat.read(path, as_version=4)
    name = path.name
    problems = []
    if "widgets" in nb.metadata:
        problems.append(f"{name}: widget state stored in metadata")
    sources = [cell.source for cell in nb.cells]
    first = sources[0] if sources else ""
    if not first.startswith("# "):
        problems.append(f"{name}: first cell must start with an H1 title")
    if colab_url(name) not in first:
        problems.append(f"{name}: first cell must hold the Colab badge {colab_url(name)}")
    if not any(s.startswith("## Setup") for s in sources):
        problems.append(f"{name}: no '## Setup' section")
    install = [c for c in nb.cells if c.cell_type == "code" and "pip install" in c.source]
    if not install or 'if "google.colab" in sys.modules:' not in install[0].source:
        problems.append(f"{name}: the install cell must run only inside Colab")
    if install and COLAB_CONSTRAINTS not in install[0].source:
        problems.append(f"{name}: the install cell must pin tested versions: {COLAB_CONSTRAINTS}")
    if any("torch" in c.source.split("pip install", 1)[1] for c in install):
        problems.append(f"{name}: the install cell must not (re)install torch")
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if not params or "MODEL_ID" not in params[0].source or "FLORENCE_MODEL" not in params[0].source:
        problems.append(f"{name}: needs a 'parameters' cell setting MODEL_ID from FLORENCE_MODEL")
    for heading in ("## Summary", "## Exercises"):
        if not any(s.startswith(heading) for s in sources):
            problems.append(f"{name}: no '{heading}' section")
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        checked = is_checked(cell)
        if cell.get("execution_count") != (CHECKED_COUNT if checked else None):
            problems.append(f"{name}: cell {index} has execution count {cell.execution_count}")
        if cell.outputs and not checked:
            problems.append(f"{name}: cell {index} stores output but is not tagged {CHECK_TAG}")
        if checked and not cell.outputs:
            problems.append(f"{name}: cell {index} is tagged {CHECK_TAG} but stores no output")
        if "execution" in cell.get("metadata", {}):
            problems.append(f"{name}: cell {index} stores execution timestamps in its metadata")
        if "NBVAL" in cell.source:
            problems.append(f"{name}: cell {index} shows an nbval marker: use the cell tag")
    return problems


def refresh_outputs(paths: list[Path]) -> None:
    """Execute notebooks and keep only the outputs nbval checks."""
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory() as tiny:
        if "FLORENCE_MODEL" not in os.environ:
            from florence_helpers.testing import build_tiny_model

            os.environ["FLORENCE_MODEL"] = str(build_tiny_model(tiny))
        os.environ.setdefault("MPLBACKEND", "Agg")
        for path in (p.resolve() for p in paths):
            nb = nbformat.read(path, as_version=4)
            if any(is_checked(cell) for cell in nb.cells):  # else there is nothing to keep
                NotebookClient(
                    nb,
                    timeout=1200,
                    record_timing=False,  # no timestamps in the cells: quiet diffs
                    resources={"metadata": {"path": str(NOTEBOOKS)}},
                ).execute()
            for cell in nb.cells:
                if cell.cell_type != "code":
                    continue
                if is_checked(cell):
                    cell.execution_count = CHECKED_COUNT
                    for output in cell.outputs:
                        if "execution_count" in output:
                            output["execution_count"] = CHECKED_COUNT
                else:
                    cell.execution_count = None
                    cell.outputs = []
            nb.metadata.pop("widgets", None)
            nbformat.write(nb, path)
            print(f"refreshed {path.relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["sync", "outputs", "check"])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: all")
    args = parser.parse_args()
    if args.command == "sync":
        for name in sync():
            print(f"rewrote {name}")
        return 0
    if args.command == "outputs":
        refresh_outputs(args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb")))
        return 0
    problems = [f"{name}: links disagree with pyproject's Repository" for name in sync(True)]
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        problems += policy_problems(path)
    print("\n".join(problems) or "notebooks OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
