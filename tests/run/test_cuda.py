"""The CUDA path gives the CPU path's results (skipped without a CUDA device).

Chunks are made tiny so every tensor spans several of them: the GPU path keeps
one chunk in flight while the host reads the next, and these tests are where a
missing synchronisation would show as a wrong value.
"""

import pytest
import torch
from click.testing import CliRunner
from conftest import poisoned_series, save_series
from safetensors.torch import load_file

import ckptavg
from ckptavg.cli import main
from ckptavg.errors import NonFiniteError

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr("ckptavg.run.engine.CHUNK_ELEMENTS", 50)


def assert_same_files(cpu_path, cuda_path):
    """Equal to fp32 rounding; a 16-bit output may then round one step apart."""
    cpu, cuda = load_file(cpu_path), load_file(cuda_path)
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        assert cuda[name].dtype == cpu[name].dtype, name
        torch.testing.assert_close(cuda[name], cpu[name], msg=lambda message, name=name: f"{name}: {message}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("schedule", [ckptavg.swa(), ckptavg.ema(0.9)], ids=["swa", "ema"])
def test_cuda_equals_cpu(tmp_path, states, dtype, schedule):
    paths = save_series(tmp_path / "ckpts", states, dtype=dtype)
    ckptavg.average(paths, schedule, out=tmp_path / "cpu.safetensors", device="cpu")
    ckptavg.average(paths, schedule, out=tmp_path / "cuda.safetensors", device="cuda")
    assert_same_files(tmp_path / "cpu.safetensors", tmp_path / "cuda.safetensors")


def test_large_tensors_match_torch_on_the_gpu(tmp_path, monkeypatch):
    """Full-size chunks and a tensor that ends mid-chunk, against the sum done by torch itself."""
    monkeypatch.setattr("ckptavg.run.engine.CHUNK_ELEMENTS", 2**20)
    generator = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3 * 2**20 + 7, generator=generator).to(torch.bfloat16)} for _ in range(6)]
    paths = save_series(tmp_path / "big", states)
    ckptavg.average(paths, ckptavg.swa(), out=tmp_path / "o.safetensors", device="cuda")
    expected = torch.stack([s["w"].float() for s in states]).mean(0).to(torch.bfloat16)
    torch.testing.assert_close(load_file(tmp_path / "o.safetensors")["w"], expected)


def test_several_sigma_rel_outputs_from_one_pass(tmp_path, states):
    paths = save_series(tmp_path / "ckpts", states, name="step_{}000")
    for device in ("cpu", "cuda"):
        result = CliRunner().invoke(
            main,
            ["ema", "--sigma-rel", "0.05", "--sigma-rel", "0.2", *map(str, paths), "--device", device,
             "-o", str(tmp_path / f"{device}_{{sigma_rel}}.safetensors")],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    for sigma_rel in ("0.05", "0.2"):
        assert_same_files(
            tmp_path / f"cpu_{sigma_rel}.safetensors", tmp_path / f"cuda_{sigma_rel}.safetensors"
        )


def test_nan_is_found_and_named_as_on_the_cpu(tmp_path, states):
    paths = poisoned_series(tmp_path / "ckpts", states, "fc.weight", (-1, -1))
    with pytest.raises(NonFiniteError, match=r"step_3\.safetensors: tensor 'fc\.weight' holds NaN or Inf"):
        ckptavg.average(paths, ckptavg.swa(), out=tmp_path / "o.safetensors", device="cuda")
    assert not (tmp_path / "o.safetensors").exists()
    for device in ("cpu", "cuda"):
        ckptavg.average(
            paths,
            ckptavg.swa(),
            out=tmp_path / f"{device}.safetensors",
            device=device,
            nonfinite="skip-checkpoint",
        )
    assert_same_files(tmp_path / "cpu.safetensors", tmp_path / "cuda.safetensors")


def test_cli_device_cuda(tmp_path, series):
    result = CliRunner().invoke(
        main, ["swa", *map(str, series), "--device", "cuda", "-o", str(tmp_path / "o.safetensors")]
    )
    assert result.exit_code == 0, result.output
    ckptavg.average(series, ckptavg.swa(), out=tmp_path / "cpu.safetensors", device="cpu")
    assert_same_files(tmp_path / "cpu.safetensors", tmp_path / "o.safetensors")


def test_auto_picks_cuda():
    from ckptavg.run.engine import resolve_device

    assert resolve_device("auto").type == "cuda"
