"""The GPU check's benchmark commands run here on the CPU with a tiny architecture, so that the
one call a GPU session gets cannot fail on a typo or a missing argument."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_benchmark_command_on_the_cpu(tmp_path):
    report = tmp_path / "report.txt"
    env = {
        **os.environ,
        "STEPS": "benchmarks",
        "SIZES": "tiny",
        "BATCHES": "1",
        "TRAIN_BATCH": "2",
        "INSTALL": "0",
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(report)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    text = report.read_text()
    assert done.returncode == 0, text[-4000:]
    assert "every step passed on cpu" in text
    for expected in (
        "# Florence-2 device report",
        "torch.bfloat16, eager",
        "torch.bfloat16, compiled",
        "torch.float16, eager",
        "one caption at batch 1, 3 beam(s)",
        "OD, 3 beam(s)",
        "15 tasks: run_tasks",
        "ms/step",
    ):
        assert expected in text, expected
