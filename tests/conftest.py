"""Fixtures: tiny seeded checkpoints of a real model with BatchNorm, written with safetensors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# No test talks to the real Hub, and huggingface_hub reads these once, when first imported.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)

import pytest
import torch
from safetensors.torch import save_file
from torch import nn


class SmallNet(nn.Module):
    """A conv, a BatchNorm (float running stats, int64 num_batches_tracked) and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def perturbed_states(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` state dicts of SmallNet, as if saved along a training run."""
    torch.manual_seed(seed)
    model = SmallNet()
    states = []
    for step in range(count):
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(torch.randn_like(tensor) * 0.1)
            model.bn.running_var.abs_()
            model.bn.num_batches_tracked.fill_(100 * (step + 1))
        states.append({k: v.clone().contiguous() for k, v in model.state_dict().items()})
    return states


def save_series(folder: Path, states, *, dtype: torch.dtype | None = None, name="step_{}") -> list[Path]:
    """Save states as `step_1.safetensors`, ... (optionally casting floating tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, state in enumerate(states, 1):
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        path = folder / f"{name.format(i)}.safetensors"
        save_file(state, path, metadata={"format": "pt"})
        paths.append(path)
    return paths


@pytest.fixture
def states():
    return perturbed_states(5)


@pytest.fixture
def series(tmp_path, states) -> list[Path]:
    """Five fp32 checkpoints of SmallNet in tmp_path/ckpts, step_1 ... step_5."""
    return save_series(tmp_path / "ckpts", states)


def poisoned_series(folder: Path, states, name: str, index) -> list[Path]:
    """The first four states saved as a series, with a NaN at `index` of tensor `name` in the third."""
    paths = save_series(folder, states[:4])
    bad = dict(states[2])
    bad[name] = bad[name].clone()
    bad[name][index] = float("nan")
    save_file(bad, paths[2])
    return paths


@pytest.fixture(scope="session")
def large_inputs(tmp_path_factory):
    """Three 400 MB inputs: a run over them is still reading and writing when a test interrupts it,
    truncates an input or kills it (made once, then removed)."""
    folder = tmp_path_factory.mktemp("large")
    paths = [folder / f"s{i}.safetensors" for i in range(3)]
    for i, path in enumerate(paths):
        save_file({"w": torch.full((96, 2**20), float(i)), "b": torch.ones(8)}, path)
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def missing(reason: str) -> None:
    """A tool a test needs is not here: skip on a developer's machine, fail in CI (CI=true), where
    everything the tests need is installed, so that a missing one is never silently untested."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must have this: {reason}")
    pytest.skip(reason)


def installed_command() -> Path:
    """The `ckptavg` console script of this environment."""
    command = Path(sys.executable).with_name("ckptavg")
    if not command.exists():
        missing("ckptavg is not installed next to this Python (pip install -e .)")
    return command


def needed_module(name: str):
    """Import a module a test needs, else `missing`."""
    try:
        return __import__(name)
    except ImportError:
        missing(f"the test needs {name}: install the test extras (pip install -e '.[dev]')")


@pytest.fixture
def ckptavg_command() -> Path:
    return installed_command()


def temp_files(folder: Path) -> list[Path]:
    """Leftovers of an output transaction anywhere under `folder`."""
    return [p for p in folder.rglob("*") if ".ckptavg-tmp" in p.name]


def require_o_direct(folder: Path) -> None:
    """Skip unless files in `folder` can be opened for writing with O_DIRECT."""
    if not hasattr(os, "O_DIRECT"):
        missing("no O_DIRECT on this platform")
    probe = folder / "o_direct.probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        missing("the temporary folder's file system refuses O_DIRECT")
    finally:
        probe.unlink()


@pytest.fixture(params=["direct", "page-cache"])
def output_io(request, tmp_path, monkeypatch) -> str:
    """Outputs written past the page cache (O_DIRECT), or through it as where there is no O_DIRECT."""
    if request.param == "page-cache":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)  # as on macOS
    else:
        require_o_direct(tmp_path)
    return request.param


def save_torch_shards(folder: Path, state: dict, split: int) -> None:
    """A Hugging Face folder of two `pytorch_model-0000N-of-00002.bin` shards (the sorted names
    before `split`, then the rest) and their `pytorch_model.bin.index.json`."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[:split],
        "pytorch_model-00002-of-00002.bin": names[split:],
    }
    for shard, keys in halves.items():
        torch.save({n: state[n] for n in keys}, folder / shard)
    index = {"metadata": {}, "weight_map": {n: shard for shard, keys in halves.items() for n in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
