"""The language-model demo runs end to end (in its quick mode) and writes what the README shows."""

import subprocess
import sys
from pathlib import Path

from conftest import needed_module
from safetensors import safe_open

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ROWS = (
    "last stable checkpoint",
    "swa --last 3 (LAWA)",
    "ema --half-life 10",
    "anneal --shape linear",
    "anneal --shape 1-sqrt",
    "ema --sigma-rel 0.05",
    "ema --sigma-rel 0.1",
    "cooled-down run",
)


def test_train_lm_and_average_quick(tmp_path):
    needed_module("matplotlib")
    done = subprocess.run(
        [sys.executable, EXAMPLES / "train_lm_and_average.py", "--quick", "--output", tmp_path],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "results.md").read_text().splitlines()
    labels = [line.split(" | ")[0].removeprefix("| ") for line in table[2:]]
    assert len(labels) == len(ROWS), table
    assert all(label.startswith(row) for label, row in zip(labels, ROWS, strict=True)), labels
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    methods = {
        "swa": "swa",
        "ema": "ema",
        "anneal_linear": "anneal",
        "anneal_1-sqrt": "anneal",
        "ema_sigma_0.05": "power-ema",
        "ema_sigma_0.1": "power-ema",
    }
    for name, method in methods.items():
        with safe_open(tmp_path / "seed_0" / f"{name}.safetensors", "pt") as averaged:
            assert averaged.metadata()["ckptavg.method"] == method
