"""The README and docs/: one source for every figure, links that resolve, no lab diary."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
TOPIC_PAGES = (
    "speed",
    "checkpoints",
    "labelling",
    "serving",
    "fine-tuning",
    "offline-testing",
    "gpu",
)
# Words of a lab diary: a page states today's figures; history belongs in CHANGELOG.md.
DIARY_WORDS = (
    "the evening before",
    "yesterday",
    "earlier today",
    "the day before",
    "last session",
    "tried and dropped",
)


def _tool():
    spec = importlib.util.spec_from_file_location("figures_tool", REPO / "tools" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = _tool()


def diary_words(text: str) -> list[str]:
    """The diary words in ``text``, whatever their case and however the lines wrap them."""
    found = []
    for words in DIARY_WORDS:
        pattern = r"\b" + r"\s+".join(map(re.escape, words.split())) + r"\b"
        if re.search(pattern, text, flags=re.IGNORECASE):
            found.append(words)
    return found


def _without_code(text: str) -> str:
    """Markdown without fenced code blocks or inline code, where links and headings are not."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _without_code(path.read_text(encoding="utf-8"))
    return {_slug(m) for m in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE)}


def _links(path: Path) -> list[str]:
    text = _without_code(path.read_text(encoding="utf-8"))
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_marked_figure_equals_figures_json():
    assert figures.check() == []


def test_figures_json_gives_every_run_a_processor_date_and_command():
    data = figures.load()
    assert figures.schema_problems(data) == []
    assert figures.schema_problems({"runs": {"r": {"figures": {"a": "1.93"}}}})  # caught


def test_every_marker_names_a_figure_that_exists():
    runs = figures.load()["runs"]
    quoted = 0
    for path in figures.default_paths():
        for marker in figures.markers(path):
            assert marker.key in runs.get(marker.run, {}).get("figures", {}), marker.where()
            quoted += 1
    assert figures.markers(README) and figures.markers(REPO / "docs" / "speed.md")
    assert quoted > 100


def test_check_catches_a_wrong_number_an_unknown_figure_and_a_missing_number(tmp_path):
    data = {
        "runs": {
            "run": {
                "processor": "p",
                "date": "2026-12-01",
                "command": "c",
                "torch": "t",
                "figures": {"a": 1.93, "b": 0.9},
            }
        }
    }
    page = tmp_path / "page.md"
    page.write_text(
        "<!--fig:run.a-->1.93 s, <!--fig:run.b:.2f-->0.90 s, <!--fig:run.b-->0.9 s\n"
        "<!--fig:run.a-->1.95 s\n<!--fig:run.c-->1 s\n<!--fig:other.a-->1 s\n"
        "<!--fig:run.a--> 1.93 s\n<!--fig:run.b:q-->0.9 s\n"
    )
    problems = figures.check([page], data)
    assert len(problems) == 5, problems
    assert "the text says 1.95, figures.json 1.93" in problems[0]
    assert "no figure 'c'" in problems[1] and "no run 'other'" in problems[2]
    assert "no number right after the marker" in problems[3] and "format spec" in problems[4]


def test_sync_rewrites_the_numbers_in_a_page_and_nothing_else(tmp_path):
    data = figures.load()
    page = tmp_path / "page.md"
    page.write_text(
        "a <!--fig:inference_speed.caption_bf16_s-->9.99 s, 9.99 s unmarked,\n"
        "<!--fig:inference_speed.vision_encoder_bf16_s:.2f-->1 s and <!--fig:no.such-->3 s\n"
    )
    assert figures.sync([page], data) == [str(page)]
    assert page.read_text() == (
        "a <!--fig:inference_speed.caption_bf16_s-->1.93 s, 9.99 s unmarked,\n"
        "<!--fig:inference_speed.vision_encoder_bf16_s:.2f-->0.90 s and <!--fig:no.such-->3 s\n"
    )
    assert figures.sync([page], data) == []  # nothing left to change


def test_sync_changes_only_marked_numbers_in_a_notebooks_cell_sources(tmp_path):
    notebook = tmp_path / "nb.ipynb"
    shutil.copy(REPO / "notebooks" / "00_quickstart.ipynb", notebook)
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    marked = "took <!--fig:inference_speed.vision_encoder_fp32_s-->9.99 s.\n"
    markdown = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    markdown["source"].insert(0, marked)
    code["source"] = "# " + marked + "".join(code["source"])  # a source written as one string
    code["outputs"] = [{"name": "stdout", "output_type": "stream", "text": [marked]}]
    before = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    notebook.write_text(before, encoding="utf-8")

    assert figures.check([notebook]) != []
    assert figures.sync([notebook]) == [str(notebook)]
    synced = marked.replace("9.99", "1.46")
    markdown["source"][0] = synced
    code["source"] = code["source"].replace(marked, synced)
    expected = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    after = notebook.read_text(encoding="utf-8")
    assert after == expected and after != before
    assert after.count("9.99") == 1  # the stored output is left as it was
    assert figures.check([notebook]) == []


def test_sync_refuses_a_notebook_whose_layout_it_cannot_keep(tmp_path):
    notebook = tmp_path / "nb.ipynb"
    nb = {
        "cells": [{"cell_type": "markdown", "metadata": {}, "source": ["<!--fig:x.y-->1 s"]}],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    notebook.write_text(json.dumps(nb, indent=3))
    data = {"runs": {"x": {"processor": "p", "date": "2026-01-01", "command": "c"}}}
    data["runs"]["x"].update(torch="t", figures={"y": 2})
    with pytest.raises(ValueError, match="layout"):
        figures.sync([notebook], data)


def test_the_command_line_check_passes():
    tool = [sys.executable, str(REPO / "tools" / "figures.py"), "check"]
    result = subprocess.run(tool, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("topic", TOPIC_PAGES)
def test_the_readme_links_each_topic_page(topic):
    assert f"(docs/{topic}.md" in README.read_text()


def test_every_docs_page_the_readme_links_exists():
    linked = [link for link in _links(README) if link.startswith("docs/")]
    assert len(linked) >= len(TOPIC_PAGES)
    for link in linked:
        assert (REPO / link.split("#")[0]).exists(), link


@pytest.mark.parametrize(
    "page", [*PAGES, REPO / "CHANGELOG.md"], ids=lambda p: str(p.relative_to(REPO))
)
def test_relative_links_and_their_anchors_resolve(page):
    for link in _links(page):
        if re.match(r"[a-z]+:", link):
            continue  # a web address
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), (page.name, link)
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), (page.name, link)


def test_the_readme_reads_in_five_minutes():
    assert len(README.read_text().splitlines()) < 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_page_reads_like_a_lab_diary(page):
    assert diary_words(page.read_text(encoding="utf-8")) == []


def test_the_diary_check_finds_diary_words_however_they_are_written():
    assert diary_words("The same run the evening\nbefore gave 2.67 s.") == ["the evening before"]
    assert diary_words("YESTERDAY it was slower; int8 was tried and dropped") == [
        "yesterday",
        "tried and dropped",
    ]
    assert diary_words("the day beforehand, a last sessions list") == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_a_page_that_quotes_figures_names_their_processor_and_date(page):
    runs = figures.load()["runs"]
    text = _flat(page.read_text(encoding="utf-8"))
    for name in sorted({marker.run for marker in figures.markers(page)}):
        assert _flat(runs[name]["processor"]) in text, (page.name, name)
        assert runs[name]["date"] in text, (page.name, name)


def test_the_readme_notebook_times_are_the_measured_ones():
    """The notebooks table must keep its form, so its times carry no markers: compare here."""
    rows = {
        m[1]: m[2].strip()
        for m in re.finditer(
            r"^\| \[`(\w+)`\]\(notebooks/\1\.ipynb\) \|(?:[^|]*\|){1}([^|]+)\| \[!\[Open",
            README.read_text(),
            flags=re.MULTILINE,
        )
    }
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        assert path.stem in rows, path.name
    times = figures.load()["runs"]["notebook_times"]["figures"]
    for key, minutes in times.items():
        assert rows[key.removesuffix("_min")] == f"{minutes} min", key


def test_the_readme_keeps_the_ci_command_the_security_section_and_its_package_role():
    readme = README.read_text()
    assert "make test" in readme and "make test" in (REPO / ".ci" / "run").read_text()
    assert re.search(r"^### Security$", readme, flags=re.MULTILINE)
    assert re.search(r'^readme = "README.md"$', (REPO / "pyproject.toml").read_text(), re.M)
