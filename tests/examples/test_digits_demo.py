"""The digits demo runs end to end (in its quick mode) and writes what the README shows."""

import subprocess
import sys
from pathlib import Path

from conftest import needed_module

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_train_and_average_quick(tmp_path):
    needed_module("sklearn")
    needed_module("matplotlib")
    done = subprocess.run(
        [sys.executable, EXAMPLES / "train_and_average.py", "--quick", "--output", tmp_path],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "results.md").read_text()
    for method in ("last checkpoint", "EMA", "SWA (constant-rate phase)", "SWA + bn-update"):
        assert method in table
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    for name in ("ema.safetensors", "swa.safetensors", "swa_bn.safetensors"):
        assert (tmp_path / "seed_0" / name).exists()
    assert "ckptavg.bn:" in done.stdout and "ckptavg.method: swa" in done.stdout
