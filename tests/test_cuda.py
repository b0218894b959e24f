"""The CUDA path gives the CPU path's results (skipped without a CUDA device)."""

import pytest
import torch
from conftest import save_series
from safetensors.torch import load_file

import ckptavg

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("schedule", [ckptavg.swa(), ckptavg.ema(0.9)], ids=["swa", "ema"])
def test_cuda_equals_cpu(tmp_path, states, monkeypatch, dtype, schedule):
    monkeypatch.setattr("ckptavg.engine.CHUNK_ELEMENTS", 50)  # several chunks per tensor
    paths = save_series(tmp_path / "ckpts", states, dtype=dtype)
    ckptavg.average(paths, schedule, out=tmp_path / "cpu.safetensors", device="cpu")
    ckptavg.average(paths, schedule, out=tmp_path / "cuda.safetensors", device="cuda")
    cpu, cuda = load_file(tmp_path / "cpu.safetensors"), load_file(tmp_path / "cuda.safetensors")
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        assert cuda[name].dtype == cpu[name].dtype
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1.3e-6, atol=1e-6)


def test_auto_picks_cuda():
    from ckptavg.engine import resolve_device

    assert resolve_device("auto").type == "cuda"
