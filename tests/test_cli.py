"""The command line, run as a user would: a separate process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "images" / "astronaut.jpg"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "florence_helpers", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture
def tiny_env(tiny_model_dir) -> dict[str, str]:
    return {**os.environ, "FLORENCE_MODEL": str(tiny_model_dir)}


def test_detection_writes_a_picture_and_prints_json(tiny_env, tmp_path):
    out = tmp_path / "x.png"
    done = cli(
        str(SAMPLE), "--task", "OD", "--out", str(out), "--max-new-tokens", "30", env=tiny_env
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["task"] == "<OD>"
    assert payload["image_size"] == list(Image.open(SAMPLE).size)
    assert len(payload["boxes"]) == len(payload["labels"])
    assert Image.open(out).size == Image.open(SAMPLE).size
    assert f"wrote {out}" in done.stderr


def test_scores_flag_adds_one_score_per_box(tiny_env):
    done = cli(str(SAMPLE), "--task", "OD", "--scores", "--max-new-tokens", "30", env=tiny_env)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert len(payload["scores"]) == len(payload["boxes"])


def test_json_flag_prints_one_line_with_the_raw_answer(tiny_env):
    done = cli(str(SAMPLE), "--task", "CAPTION", "--json", "--max-new-tokens", "5", env=tiny_env)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    assert json.loads(done.stdout)["raw"].startswith("</s>")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "OBJECTS"], "Unknown Florence-2 task 'OBJECTS'"),
        (["--task", "OD", "--text", "a cat"], "takes only the image"),
        (["--task", "OPEN_VOCABULARY_DETECTION"], "needs text"),
        (["--task", "REGION_TO_CATEGORY", "--region", "0", "0", "99999", "5"], "outside the"),
    ],
)
def test_bad_input_exits_2_with_the_reason(args, message):
    done = cli(str(SAMPLE), *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_image_exits_2(tmp_path):
    done = cli(str(tmp_path / "missing.jpg"), "--task", "OD")
    assert done.returncode == 2
    assert "Image file not found" in done.stderr


def test_no_reachable_model_exits_3_with_the_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FLORENCE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    done = cli(str(SAMPLE), "--task", "OD", "--out", str(tmp_path / "x.png"), env=env)
    assert done.returncode == 3
    assert "'florence-community/Florence-2-base'" in done.stderr
    assert "could not be reached" in done.stderr
    assert "FLORENCE_MODEL" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_classes_flag_detects_each_class(tiny_env):
    done = cli(str(SAMPLE), "--classes", "car, person", "--max-new-tokens", "20", env=tiny_env)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["task"] == "<OPEN_VOCABULARY_DETECTION>"
    assert set(payload["labels"]) <= {"car", "person"}
    assert len(payload["boxes"]) == len(payload["labels"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([str(SAMPLE), "--classes", "car", "--task", "OD"], "does not go with --task OD"),
        ([str(SAMPLE), "--classes", " , "], "classes is empty"),
        ([str(SAMPLE), "--classes", "car", "--text", "a car"], "takes the place of --text"),
        (["label", str(REPO / "images"), "--out", "x.jsonl"], "Give --task"),
    ],
)
def test_bad_classes_exit_2_with_the_reason(args, message):
    done = cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
