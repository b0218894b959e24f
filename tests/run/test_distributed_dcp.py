"""DCP outputs (`--format dcp`) under torchrun (gloo, CPU): byte-identical to the single-process
output whatever the number of ranks, loaded back by `torch.distributed.checkpoint.load`, and a
failing rank leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from test_distributed import (
    LIMIT,
    TORCHRUN,
    _error_lines,
    _finish,
    _nodes_one_cannot_read,
    _series,
    _single,
    _stalled_launch,
    _temporaries,
    _torchrun,
    _two_nodes,
)

import ckptavg
from ckptavg.api import open_checkpoints
from ckptavg.formats import dtypes
from ckptavg.plan.plan import build_plan
from ckptavg.plan.spans import spans
from ckptavg.run import dcp_shared
from ckptavg.run.dcp_writer import DcpWriter
from ckptavg.run.split import describe_shares, shares
from ckptavg.schedules import swa

SAVER = Path(__file__).parents[1] / "formats" / "dcp_saver.py"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load in one process
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    return _series(tmp_path_factory.mktemp("series"))


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory) -> Path:
    """A run saved by `dcp.save` from an FSDP2 model on 2 ranks (dcp_saver.py): every tensor in 2 files."""
    out = tmp_path_factory.mktemp("dcp")
    saved = subprocess.run(
        [sys.executable, str(SAVER), str(out), "2"], capture_output=True, text=True, timeout=180
    )
    assert saved.returncode == 0, saved.stderr[-3000:]
    return out


def _same_folders(one: Path, two: Path) -> None:
    assert sorted(p.name for p in one.iterdir()) == [".metadata", "__0_0.distcp"]
    assert sorted(p.name for p in two.iterdir()) == [".metadata", "__0_0.distcp"]
    for name in (".metadata", "__0_0.distcp"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def _loaded(folder: Path, wanted: dict[str, torch.Tensor], key: str | None = None) -> None:
    """`dcp.load` of the folder into zeros equals `wanted`."""
    fresh = {name: torch.zeros_like(value) for name, value in wanted.items()}
    dcp.load({key: fresh} if key else fresh, checkpoint_id=folder)
    for name, value in wanted.items():
        assert torch.equal(fresh[name], value), name


@needs_torchrun
def test_two_ranks_write_the_dcp_output_one_writes(tmp_path, series):
    """Two outputs from one read (`--sigma-rel` twice), a tensor cut between the ranks."""
    with open_checkpoints(series) as checkpoints:
        plan = build_plan(checkpoints, swa(), output=tmp_path / "x", format="dcp")
        cut = [s for s in shares(plan, spans(plan), 2)[1].spans if s.start > 0]
        assert cut, "the split should cut a tensor between the ranks"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    args = ["ema", "--sigma-rel", "0.1", "--sigma-rel", "0.2", *map(str, series)]
    done = _single([*args, "-o", "ema_{sigma_rel}", "--format", "dcp"], one)
    assert done.returncode == 0, done.stderr
    done = _torchrun([*args, "-o", "ema_{sigma_rel}", "--format", "dcp"], two)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote ") == 2
    done = _single([*args, "-o", "ema_{sigma_rel}.safetensors"], one)
    assert done.returncode == 0, done.stderr
    for sigma in ("0.1", "0.2"):
        _same_folders(one / f"ema_{sigma}", two / f"ema_{sigma}")
        _loaded(two / f"ema_{sigma}", load_file(one / f"ema_{sigma}.safetensors"))
    assert _temporaries(two) == []


@needs_torchrun
def test_a_dcp_series_to_dcp_under_torchrun(tmp_path, dcp_run):
    """A run saved with its model under `model` (nested state dicts): the output keeps that key."""
    inputs = str(dcp_run / "nested" / "step-*")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    done = _single(["swa", inputs, "-o", "out", "--format", "dcp"], one)
    assert done.returncode == 0, done.stderr
    done = _torchrun(["swa", inputs, "-o", "out", "--format", "dcp"], two)
    assert done.returncode == 0, done.stderr
    _same_folders(one / "out", two / "out")
    ckptavg.average([dcp_run / "nested"], swa(), tmp_path / "swa.safetensors")
    _loaded(two / "out", load_file(tmp_path / "swa.safetensors"), "model")


def _payload(plan) -> dict[str, torch.Tensor]:
    """Some bytes for each output tensor, as a stand-in for its average."""
    g = torch.Generator().manual_seed(0)
    return {
        t.name: torch.randint(0, 256, (t.entry.nbytes,), dtype=torch.uint8, generator=g) for t in plan.tensors
    }


def test_the_file_does_not_depend_on_the_number_of_ranks(tmp_path, series):
    """Every split (1 to 5 ranks, written in chunks of odd sizes) gives the single writer's bytes."""
    with open_checkpoints(series) as checkpoints:
        plan = build_plan(checkpoints, swa(), output=tmp_path / "x", format="dcp")
    entries = [t.entry for t in plan.files[0].tensors]
    metadata, data = plan.metadata(), _payload(plan)
    (tmp_path / "single").mkdir()
    writer = DcpWriter(tmp_path / "single" / "__0_0.distcp", entries, metadata, "model", tmp_path)
    for name, values in data.items():
        for start in range(0, len(values), 1000):
            writer.write(name, start, values[start : start + 1000])
    writer.finish()
    for ranks in (1, 2, 3, 5):
        folder = tmp_path / f"ranks{ranks}"
        folder.mkdir()
        path = folder / "__0_0.distcp"
        dcp_shared.create(path, entries, metadata, path)
        pieces = []
        for share in shares(plan, spans(plan), ranks):
            rank = dcp_shared.SharedDcpWriter(path, entries, metadata, path, share.writes.get(0, 0))
            for part in share.spans:
                size = dtypes.itemsize(part.dtype)
                values = data[part.name][part.start * size : part.end * size]
                for offset in range(0, len(values), 777):
                    rank.write(part.name, part.start * size + offset, values[offset : offset + 777])
            rank.finish()
            pieces.append(rank.pieces)
        dcp_shared.complete(path, entries, metadata, "model", path, pieces)
        _same_folders(tmp_path / "single", folder)


def test_the_dry_run_says_what_each_rank_writes(tmp_path, series):
    with open_checkpoints(series) as checkpoints:
        plan = build_plan(checkpoints, swa(), output=tmp_path / "x", format="dcp")
        lines = describe_shares(plan, shares(plan, spans(plan), 2), ["node0", "node1"])
    assert lines[1].startswith("  rank 0 (node0): reads ")
    assert "of __0_0.distcp, then the archives' records and CRC-32s, .metadata and the commit" in lines[1]
    assert lines[2].startswith("  rank 1 (node1): reads ") and lines[2].endswith("of __0_0.distcp")


@needs_torchrun
def test_an_input_one_rank_cannot_read_leaves_nothing(tmp_path, series):
    good, bad = _nodes_one_cannot_read(tmp_path, series)
    output = tmp_path / "shared" / "out"
    ckptavg.average(series, swa(), output, format="dcp")  # a previous DCP output ckptavg wrote
    previous = {p.name: p.read_bytes() for p in output.iterdir()}
    args = ["ema", "--decay", "0.5", "in/*.safetensors", "-o", str(output), "--force"]
    started = time.monotonic()
    results = _finish(_two_nodes(args, (good, bad)))
    assert all(code != 0 for code, _ in results)
    assert time.monotonic() - started < LIMIT
    lines = _error_lines(results[0][1])
    assert len(lines) == 1 and "rank 1" in lines[0] and "step_2.safetensors" in lines[0], results[0][1]
    assert {p.name: p.read_bytes() for p in output.iterdir()} == previous
    assert sorted(p.name for p in output.parent.iterdir()) == ["out"]
    assert _temporaries(tmp_path) == []


@needs_torchrun
def test_a_rank_killed_after_writing_its_part_leaves_nothing(tmp_path, series):
    """Rank 1 killed once its bytes are in the `.distcp` file rank 0 created, before `.metadata`."""
    output = tmp_path / "shared" / "out"
    ckptavg.average(series, swa(), output, format="dcp")
    previous = {p.name: p.read_bytes() for p in output.iterdir()}
    process, pid = _stalled_launch(tmp_path, series, output)
    assert any(".ckptavg-tmp" in p.name for p in output.parent.iterdir())  # the file rank 0 created
    os.kill(pid, signal.SIGKILL)
    ((code, text),) = _finish([process])
    assert code != 0
    assert {p.name: p.read_bytes() for p in output.iterdir()} == previous
    assert _temporaries(tmp_path) == []
    assert "Traceback" not in "\n".join(_error_lines(text))
