"""The explorer as a learner uses it: JupyterLab in headless Chromium, driven by Playwright.

Starts JupyterLab on 127.0.0.1 with a notebook that opens ``explore`` on the tiny model, then
clicks through a caption, object detection, a region task with a box drawn by the mouse, a
missing text, Enter in the text box and an unreadable image. Screenshots go to
``$FLORENCE_SCREENSHOTS`` (default ``.cache/browser-screenshots``).

Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright`` package (the
dev extra); Playwright's own browser download is never used. Without Chromium it is skipped with
a message saying so. Run it alone with ``make test-browser``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium")
# The flags a sandboxed machine without internet needs: no background connections, no GPU.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Each generation step of the tiny model waits this long, so that a run lasts long enough
# (about 64 steps) for the busy state to be seen and photographed.
STEP_SECONDS = 0.04

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="browser test skipped: no Chromium found (apt-get install chromium, or set "
        "CHROMIUM to its path)",
    ),
]

# The notebook the learner would write, plus a slowed-down decoder (the harness's only addition).
NOTEBOOK_CODE = """\
import time

from transformers import LogitsProcessor, LogitsProcessorList

from florence_helpers import load_model
from florence_helpers.widgets import explore


class SlowSteps(LogitsProcessor):
    def __call__(self, input_ids, scores):
        time.sleep({step})
        return scores


florence = load_model()
explore(florence, {images}, logits_processor=LogitsProcessorList([SlowSteps()]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_notebook(folder: Path) -> Path:
    broken = folder / "broken.jpg"
    broken.write_text("not a picture")
    images = [str(ROOT / "images" / "astronaut.jpg"), str(ROOT / "images" / "poster.png")]
    images.append(str(broken))
    code = NOTEBOOK_CODE.format(step=STEP_SECONDS, images=json.dumps(images))
    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "explorer",
                "metadata": {},
                "outputs": [],
                "source": code,
            }
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = folder / "explorer.ipynb"
    path.write_text(json.dumps(notebook))
    return path


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory, tiny_model_dir):
    """A JupyterLab server on 127.0.0.1 serving a folder with the explorer notebook."""
    pytest.importorskip("playwright", reason="browser test skipped: pip install playwright")
    folder = tmp_path_factory.mktemp("lab")
    _write_notebook(folder)
    settings = folder / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No news or update checks: this machine has no internet, and the pop-up would cover cells.
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "FLORENCE_MODEL": str(tiny_model_dir),
        "MPLBACKEND": "Agg",
        "JUPYTERLAB_SETTINGS_DIR": str(folder / ".settings"),
        "JUPYTER_RUNTIME_DIR": str(folder / ".runtime"),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    log = (folder / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={folder}",
            "--allow-root",  # CI machines and containers often run as root
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "JupyterLab did not start:\n" + (folder / "jupyterlab.log").read_text()
                    ) from None
                time.sleep(0.5)
        yield f"{base}/lab/tree/explorer.ipynb?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def page(jupyterlab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 2400})
        page.set_default_timeout(30_000)
        page.goto(jupyterlab)
        cell = page.locator(".jp-Cell .cm-content").first
        cell.wait_for()
        # Shift+Enter before the kernel is connected is silently dropped.
        page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
        cell.click()
        page.keyboard.press("Shift+Enter")
        # Importing torch and transformers in a fresh kernel takes a while on a small CPU.
        page.locator(".florence-explorer").wait_for(timeout=180_000)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def shots():
    folder = Path(os.environ.get("FLORENCE_SCREENSHOTS", ROOT / ".cache" / "browser-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _panel(page):
    return page.locator(".florence-explorer")


def _choose(page, label: str, option_prefix: str) -> None:
    """Pick the option starting with ``option_prefix`` in the dropdown labelled ``label``."""
    select = _panel(page).get_by_label(label, exact=True)
    options = select.locator("option").all_inner_texts()
    select.select_option(label=next(o for o in options if o.startswith(option_prefix)))


def _run_and_wait(page) -> None:
    _panel(page).get_by_role("button", name="Run").click()
    _panel(page).locator(".florence-explorer-done").wait_for(timeout=120_000)


def _no_traceback(page) -> None:
    outputs = " ".join(page.locator(".jp-OutputArea-output").all_inner_texts())
    assert "Traceback" not in outputs, outputs


def test_a_caption_shows_the_busy_state_then_the_result(page, shots):
    panel = _panel(page)
    # The chosen image is on screen before anything runs.
    assert panel.locator("img").first.is_visible()
    run_button = panel.get_by_role("button", name="Run")
    run_button.click()
    busy = panel.locator(".florence-explorer-busy")
    busy.wait_for()
    assert run_button.is_disabled()
    page.wait_for_timeout(1200)  # let the elapsed time tick once
    assert "Running CAPTION on astronaut.jpg" in busy.inner_text()
    assert busy.inner_text().rstrip().endswith(" s")
    page.screenshot(path=shots / "1-busy.png", full_page=True)
    panel.locator(".florence-explorer-done").wait_for(timeout=120_000)
    assert run_button.is_enabled()
    assert "Text:" in panel.locator(".florence-explorer-summary").inner_text()
    _no_traceback(page)


def test_changing_the_task_clears_the_old_result_and_runs_fresh(page, shots):
    panel = _panel(page)
    _choose(page, "Task", "OD:")
    assert "Inputs changed" in panel.locator(".florence-explorer-stale").inner_text()
    assert not panel.locator(".florence-explorer-drawing").is_visible()
    _run_and_wait(page)
    assert panel.locator(".florence-explorer-drawing").is_visible()
    summary = panel.locator(".florence-explorer-summary").inner_text()
    assert "boxes" in summary
    page.screenshot(path=shots / "2-od-after-task-change.png", full_page=True)
    panel.get_by_text("Result as JSON").click()
    shown = panel.locator(".florence-explorer-json")
    shown.wait_for()
    assert json.loads(shown.inner_text())["task"] == "<OD>"
    page.screenshot(path=shots / "2b-json-unfolded.png", full_page=True)
    _no_traceback(page)


def test_a_box_drawn_on_the_image_is_the_region(page, shots):
    panel = _panel(page)
    _choose(page, "Task", "REGION_TO_DESCRIPTION:")
    picture = panel.locator(".florence-explorer-canvas img").first
    picture.wait_for()
    box = picture.bounding_box()
    page.mouse.move(box["x"] + 0.25 * box["width"], box["y"] + 0.2 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + 0.7 * box["height"], steps=8)
    page.mouse.up()
    corners = panel.locator(".florence-explorer-region input")
    page.wait_for_function(
        """() => {
            const v = [...document.querySelectorAll('.florence-explorer-region input')]
                .map((input) => parseFloat(input.value));
            return v[0] < v[2] && v[1] < v[3];
        }"""
    )
    x1, y1, x2, y2 = (float(corners.nth(i).input_value()) for i in range(4))
    assert 0 < x1 < x2 and 0 < y1 < y2
    _run_and_wait(page)
    assert "Text:" in panel.locator(".florence-explorer-summary").inner_text()
    page.screenshot(path=shots / "3-drawn-region.png", full_page=True)
    _no_traceback(page)


def test_missing_text_is_a_styled_error_and_enter_runs(page, shots):
    panel = _panel(page)
    _choose(page, "Task", "OPEN_VOCABULARY_DETECTION:")
    panel.get_by_role("button", name="Run").click()
    error = panel.locator(".florence-explorer-error")
    error.wait_for()
    assert "Type what to look for in the Text box" in error.inner_text()
    page.screenshot(path=shots / "4-missing-text-error.png", full_page=True)
    text = panel.get_by_label("Text", exact=True)
    text.fill("a rocket")
    text.press("Enter")
    panel.locator(".florence-explorer-done").wait_for(timeout=120_000)
    assert not error.is_visible()
    _no_traceback(page)


def test_an_unreadable_image_is_named_in_the_panel(page, shots):
    panel = _panel(page)
    _choose(page, "Image", "broken.jpg")
    error = panel.locator(".florence-explorer-error")
    error.wait_for()
    assert "broken.jpg" in error.inner_text()
    page.screenshot(path=shots / "5-unreadable-image.png", full_page=True)
    _no_traceback(page)
