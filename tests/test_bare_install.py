"""`pip install ckptavg` alone, no extras, into a fresh environment: it averages, inspects and plans.

The test extras pull in packages (numpy among them) that a user's environment may
not have, so the other tests cannot see a runtime dependency missing from
pyproject.toml. This one installs the project into a new virtual environment, as
a user would, and runs the installed command.
"""

import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from conftest import perturbed_states, save_series
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SECONDS = 900


@pytest.fixture(scope="module")
def bare_ckptavg(tmp_path_factory) -> Path:
    """The `ckptavg` command of a fresh virtual environment holding the project without extras."""
    env = tmp_path_factory.mktemp("bare") / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    done = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-input", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=INSTALL_SECONDS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    extras = subprocess.run(
        [
            python,
            "-c",
            "import importlib.util as u; print([m for m in ('pytest', 'hypothesis', "
            "'transformers', 'torchvision', 'sklearn') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
    )
    assert extras.stdout.strip() == "[]", f"extras leaked into the bare install: {extras.stdout}"
    return env / "bin" / "ckptavg"


def run(command: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([command, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert "unexpected" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    return done


def test_averages_inspects_and_plans(tmp_path, bare_ckptavg):
    states = perturbed_states(3)
    paths = save_series(tmp_path / "ckpts", states)
    torch.save(states[0], tmp_path / "ckpts" / "step_0.pt")

    run(bare_ckptavg, "swa", "ckpts/*.safetensors", "-o", "swa.safetensors", cwd=tmp_path)
    averaged = load_file(tmp_path / "swa.safetensors")
    expected = torch.stack([s["fc.weight"] for s in states]).mean(0)
    torch.testing.assert_close(averaged["fc.weight"], expected)

    run(bare_ckptavg, "ema", "--decay", "0.5", "ckpts/step_0.pt", *paths[:1], "-o", "ema.pt", cwd=tmp_path)
    assert set(torch.load(tmp_path / "ema.pt", weights_only=True)) == set(states[0])

    shown = run(bare_ckptavg, "inspect", "swa.safetensors", cwd=tmp_path).stdout
    assert "fc.weight" in shown and "ckptavg.method: swa" in shown
    planned = run(bare_ckptavg, "swa", "ckpts/*", "--dry-run", cwd=tmp_path).stdout
    assert "swa over 4 checkpoints" in planned and "dry run: nothing written" in planned
    assert sys.executable not in bare_ckptavg.read_text()  # the command runs the fresh environment


def test_a_url_without_its_extra_says_what_to_install(tmp_path, bare_ckptavg):
    done = subprocess.run(
        [bare_ckptavg, "swa", "s3://runs/step_*/", "-o", "swa.safetensors"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: s3://runs/step_*/: reading s3:// URLs needs its fsspec library: pip install 'ckptavg[s3]'"
    )
