"""Keep every quoted benchmark figure equal to its one source, docs/figures.json.

    python tools/figures.py check   # every marked number agrees with docs/figures.json
    python tools/figures.py sync    # rewrite the marked numbers from docs/figures.json
    python tools/figures.py where   # each figure and the places that quote it

docs/figures.json groups the figures by the run that measured them::

    {"runs": {"inference_speed": {"processor": "...", "date": "2026-12-01",
                                  "command": "python benchmarks/inference_speed.py",
                                  "torch": "2.13 CPU",
                                  "figures": {"caption_bf16_s": 1.93, ...}}}}

Each run needs ``processor``, ``date`` (YYYY-MM-DD), ``command`` and ``torch`` (strings) and
``figures`` (JSON numbers); other fields (``notes``, ``openvino``) are free text.

The rule. In README.md, docs/*.md and the markdown and code cells of notebooks/*.ipynb, a
quoted figure is written right after an invisible marker, with no space between them::

    <!--fig:RUN.KEY-->1.93 s          the number, then its unit
    <!--fig:RUN.KEY:.2f-->0.90 s      a Python format spec after a second colon

The text after the marker is ``format(value, spec)``, where ``value`` is
``runs[RUN]["figures"][KEY]`` and ``spec`` is empty unless the marker gives one. An empty spec
writes the value as Python's ``str`` does (``1.93``, ``134``, ``23.0``; a JSON ``2.10`` loads
as ``2.1``); give ``.2f`` to keep a trailing zero (``0.90``) or ``,`` for thousands
(``51,289``). The number the text shows is read as an optional minus, digits with optional
comma-grouped thousands, and optional decimals. A range is two markers:
``<!--fig:run.low_s-->4.7-<!--fig:run.high_s-->5.0 s``. Markers count wherever they stand,
code blocks included, so write an example marker without its closing ``-->``.

``check`` reports a marker whose run or key is missing, one with no number after it, a bad
spec, and a number that differs from the JSON. ``sync`` rewrites the numbers after known
markers and leaves the rest for ``check`` to report. In a notebook it changes only those
characters of the cell sources and writes the file back in the notebook's own JSON layout (it
refuses a notebook whose layout it cannot reproduce). Exit status: 0 when, after the command,
every marked figure agrees with figures.json; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures.json"
RUN_FIELDS = ("processor", "date", "command", "torch")

MARKER = re.compile(
    r"<!--fig:(?P<run>[\w-]+)\.(?P<key>[\w-]+)(?::(?P<spec>[^>]*?))?-->"
    r"(?P<number>-?\d+(?:,\d{3})*(?:\.\d+)?)?"
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# The JSON layouts nbformat and common editors write; sync keeps whichever the file has.
_NOTEBOOK_LAYOUTS = (
    {"indent": 1, "sort_keys": True, "ensure_ascii": False},
    {"indent": 1, "ensure_ascii": False},
    {"indent": 2, "sort_keys": True, "ensure_ascii": False},
    {"indent": 2, "ensure_ascii": False},
)


class Marker(NamedTuple):
    """One marked figure: where it is, what it names and the number the text shows."""

    path: Path
    line: int  # 1-based; in a notebook, the line within the cell's source
    cell: int | None  # notebook cell index, None for a markdown file
    run: str
    key: str
    spec: str
    number: str | None

    def where(self) -> str:
        name = _relative(self.path)
        if self.cell is None:
            return f"{name}:{self.line}"
        return f"{name}:cell {self.cell}:{self.line}"


def load(path: Path = FIGURES) -> dict[str, Any]:
    """docs/figures.json as a dict."""
    return json.loads(path.read_text(encoding="utf-8"))


def default_paths(root: Path = ROOT) -> list[Path]:
    """The files scanned: README.md, docs/*.md and notebooks/*.ipynb."""
    paths = [root / "README.md"]
    paths += sorted((root / "docs").glob("*.md"))
    paths += sorted((root / "notebooks").glob("*.ipynb"))
    return [path for path in paths if path.exists()]


def schema_problems(figures: dict[str, Any]) -> list[str]:
    """What in figures.json breaks the layout described in this module's docstring."""
    runs = figures.get("runs") if isinstance(figures, dict) else None
    if not isinstance(runs, dict) or not runs:
        return ['figures.json: needs a non-empty "runs" object']
    problems = []
    for name, run in runs.items():
        if not isinstance(run, dict):
            problems.append(f"figures.json: run {name} is not an object")
            continue
        for field in RUN_FIELDS:
            if not isinstance(run.get(field), str) or not run[field].strip():
                problems.append(f"figures.json: run {name} needs a {field!r} string")
        if isinstance(run.get("date"), str) and not _DATE.match(run["date"]):
            problems.append(f"figures.json: run {name} date {run['date']!r} is not YYYY-MM-DD")
        values = run.get("figures")
        if not isinstance(values, dict) or not values:
            problems.append(f"figures.json: run {name} needs a non-empty 'figures' object")
            continue
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"figures.json: {name}.{key} is {value!r}, not a number")
    return problems


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _text_markers(text: str, path: Path, cell: int | None) -> list[Marker]:
    found = []
    for match in MARKER.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.append(
            Marker(
                path,
                line,
                cell,
                match["run"],
                match["key"],
                match["spec"] or "",
                match["number"],
            )
        )
    return found


def _cell_source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _scanned_cells(notebook: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    return [
        (index, cell)
        for index, cell in enumerate(notebook.get("cells", []))
        if cell.get("cell_type") in ("markdown", "code")
    ]


def markers(path: Path) -> list[Marker]:
    """Every marker in one file (a notebook: in its markdown and code cells' sources)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return _text_markers(text, path, None)
    found = []
    for index, cell in _scanned_cells(json.loads(text)):
        found += _text_markers(_cell_source(cell), path, index)
    return found


def expected(figures: dict[str, Any], run: str, key: str, spec: str) -> str:
    """The text a marker's number must be. Raises KeyError (unknown figure), ValueError (spec)."""
    value = figures["runs"][run]["figures"][key]
    return format(value, spec)


def _problem(figures: dict[str, Any], marker: Marker) -> str | None:
    name = f"{marker.run}.{marker.key}"
    runs = figures.get("runs", {})
    if marker.run not in runs:
        return f"{marker.where()}: {name}: no run {marker.run!r} in docs/figures.json"
    if marker.key not in runs[marker.run].get("figures", {}):
        return f"{marker.where()}: {name}: run {marker.run!r} has no figure {marker.key!r}"
    try:
        want = expected(figures, marker.run, marker.key, marker.spec)
    except (ValueError, TypeError) as error:
        return f"{marker.where()}: {name}: format spec {marker.spec!r}: {error}"
    if marker.number is None:
        return f"{marker.where()}: {name}: no number right after the marker (want {want})"
    if marker.number != want:
        return f"{marker.where()}: {name}: the text says {marker.number}, figures.json {want}"
    return None


def check(paths: list[Path] | None = None, figures: dict[str, Any] | None = None) -> list[str]:
    """Every problem with figures.json and the markers in ``paths`` (default: all scanned)."""
    figures = load() if figures is None else figures
    problems = schema_problems(figures)
    if problems:
        return problems
    for path in default_paths() if paths is None else paths:
        for marker in markers(path):
            problem = _problem(figures, marker)
            if problem:
                problems.append(problem)
    return problems


def _synced(text: str, figures: dict[str, Any]) -> str:
    def replace(match: re.Match[str]) -> str:
        try:
            want = expected(figures, match["run"], match["key"], match["spec"] or "")
        except (KeyError, ValueError, TypeError):
            return match[0]  # check reports it
        if match["number"] is None:
            return match[0]  # no number to rewrite: check reports it
        return match[0][: match.start("number") - match.start()] + want

    return MARKER.sub(replace, text)


def _notebook_layout(text: str, notebook: dict[str, Any]) -> dict[str, Any] | None:
    for layout in _NOTEBOOK_LAYOUTS:
        written = json.dumps(notebook, **layout)
        if written == text or written + "\n" == text:
            return layout
    return None


def sync_file(path: Path, figures: dict[str, Any]) -> bool:
    """Rewrite the marked numbers in one file; whether it changed. Raises ValueError when a
    notebook's JSON layout cannot be reproduced (so nothing else would stay as it was)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        new = _synced(text, figures)
        if new != text:
            path.write_text(new, encoding="utf-8")
        return new != text
    notebook = json.loads(text)
    changed = False
    for _, cell in _scanned_cells(notebook):
        source = cell.get("source", "")
        if isinstance(source, list):
            new_source = [_synced(line, figures) for line in source]
        else:
            new_source = _synced(source, figures)
        if new_source != source:
            cell["source"], changed = new_source, True
    if not changed:
        return False
    layout = _notebook_layout(text, json.loads(text))
    if layout is None:
        name = _relative(path)
        raise ValueError(f"{name}: cannot keep its JSON layout; edit the numbers by hand")
    written = json.dumps(notebook, **layout)
    path.write_text(written + ("\n" if text.endswith("\n") else ""), encoding="utf-8")
    return True


def sync(paths: list[Path] | None = None, figures: dict[str, Any] | None = None) -> list[str]:
    """Rewrite every marked number from figures.json; the files changed."""
    figures = load() if figures is None else figures
    problems = schema_problems(figures)
    if problems:
        raise ValueError("; ".join(problems))
    return [
        _relative(path)
        for path in (default_paths() if paths is None else paths)
        if sync_file(path, figures)
    ]


def where(paths: list[Path] | None = None, figures: dict[str, Any] | None = None) -> dict:
    """Each run.key of figures.json and the places that quote it (an empty list: none)."""
    figures = load() if figures is None else figures
    places: dict[str, list[str]] = {
        f"{run}.{key}": [] for run, data in figures["runs"].items() for key in data["figures"]
    }
    for path in default_paths() if paths is None else paths:
        for marker in markers(path):
            places.setdefault(f"{marker.run}.{marker.key}", []).append(marker.where())
    return places


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("check", "sync", "where"))
    args = parser.parse_args(argv)
    if args.command == "where":
        for name, places in where().items():
            print(f"{name}: {', '.join(places) or 'not quoted'}")
        return 0
    if args.command == "sync":
        try:
            changed = sync()
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        for name in changed:
            print(f"rewrote {name}")
    problems = check()
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.command == "check" and not problems:
        print("every marked figure agrees with docs/figures.json")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
