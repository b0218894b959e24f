"""DeepSpeed checkpoints as inputs, saved by DeepSpeed itself (two ranks, ZeRO-2 and ZeRO-3) and
averaged against DeepSpeed's own reassembly (`zero_to_fp32`) or the saved module."""

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import needed_module
from safetensors.torch import load_file

from ckptavg.cli import main
from ckptavg.formats.deepspeed import Pieces
from ckptavg.formats.readers import open_checkpoint

SAVER = Path(__file__).with_name("deepspeed_saver.py")
STEPS = (1, 2, 3)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """Training runs saved by two ranks: stage -> run folder (`global_step1..3`, `latest`)."""
    needed_module("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    saved = subprocess.run(
        [sys.executable, SAVER, out, "2", "2,3"], capture_output=True, text=True, timeout=300
    )
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr[-3000:]
    return {stage: out / f"zero{stage}" for stage in (2, 3)}


def zero_to_fp32(run_folder: Path, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(run_folder), f"global_step{step}")


def mean64(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The average in float64; integer tensors (BatchNorm's count) are the last checkpoint's, as ckptavg's."""
    return {
        name: sum(s[name].double() for s in states) / len(states)
        if value.is_floating_point()
        else states[-1][name]
        for name, value in states[0].items()
    }


def assert_average(output: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(output)
    assert set(got) == set(expected)
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name].double(), value, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(got[name], value), name


class TestMasterWeights:
    def test_zero3_run_folder_is_the_average_of_zero_to_fp32(self, runs, tmp_path):
        result = run("swa", runs[3], "-o", tmp_path / "avg.safetensors")
        assert result.exit_code == 0, result.output
        assert "DeepSpeed ZeRO-3, fp32 master weights from 2 optimizer partitions" in result.output
        assert_average(tmp_path / "avg.safetensors", mean64([zero_to_fp32(runs[3], s) for s in STEPS]))

    def test_zero2_master_weights(self, runs, tmp_path):
        result = run("swa", runs[2], "--master-weights", "-o", tmp_path / "avg.safetensors")
        assert result.exit_code == 0, result.output
        assert_average(tmp_path / "avg.safetensors", mean64([zero_to_fp32(runs[2], s) for s in STEPS]))

    def test_each_tensor_is_deepspeeds(self, runs):
        """Tensor by tensor, whole and sliced in chunks across the ranks' partitions."""
        for stage, folder in runs.items():
            expected = zero_to_fp32(folder, 2)
            with open_checkpoint(folder / "global_step2", master_weights=True) as checkpoint:
                assert set(checkpoint.tensors) == set(expected)
                assert ["emb.weight", "head.weight"] in checkpoint.tied
                for name, value in expected.items():
                    assert torch.equal(checkpoint.get(name), value), (stage, name)
                    flat = checkpoint.get_run([name])
                    chunks = [flat[i : i + 4] for i in range(0, flat.numel(), 4)]
                    assert torch.equal(torch.cat(chunks), value.reshape(-1)), (stage, name)

    def test_a_parameter_of_two_partitions_is_assembled_one_chunk_at_a_time(self, runs):
        with open_checkpoint(runs[3] / "global_step1") as checkpoint:
            flat = checkpoint.get_run(["a.weight"])  # 35 values: 18 on rank 0, 17 on rank 1
            assert isinstance(flat, Pieces) and flat.numel() == 35
            assert flat[16:20].numel() == 4
            inside = flat[2:6]
            assert inside._base is not None  # within one partition: a view of the mapped file


class TestModuleWeights:
    def test_zero2_run_folder_is_the_average_of_the_saved_modules(self, runs, tmp_path):
        result = run("swa", runs[2], "-o", tmp_path / "avg.safetensors")
        assert result.exit_code == 0, result.output
        assert "DeepSpeed ZeRO-1/2, key 'module' of mp_rank_00_model_states.pt" in result.output
        modules = [
            torch.load(runs[2] / f"global_step{s}" / "mp_rank_00_model_states.pt", weights_only=False)[
                "module"
            ]
            for s in STEPS
        ]
        assert_average(tmp_path / "avg.safetensors", mean64(modules))

    def test_one_step_folder_is_one_checkpoint(self, runs, tmp_path):
        result = run("swa", runs[2] / "global_step2", runs[2] / "global_step3", "--dry-run")
        assert result.exit_code == 0, result.output
        assert "swa over 2 checkpoints" in result.output


class TestRunFolders:
    def test_steps_and_order_come_from_global_step_folders(self, runs, tmp_path):
        run_folder = tmp_path / "run"
        shutil.copytree(runs[3], run_folder)
        (run_folder / "global_step3").rename(run_folder / "global_step10")
        result = run("ema", "--decay", "0.5", run_folder, "--dry-run")
        assert result.exit_code == 0, result.output
        assert (run_folder / "latest").exists()
        rows = re.findall(r" (\d+)  \S+/(global_step\d+)  \(DeepSpeed ZeRO-3", result.output)
        assert rows == [("1", "global_step1"), ("2", "global_step2"), ("10", "global_step10")]

    def test_a_trainer_checkpoint_folder_holding_a_deepspeed_save(self, runs, tmp_path):
        trainer = tmp_path / "out" / "checkpoint-2"
        trainer.mkdir(parents=True)
        shutil.copytree(runs[3] / "global_step2", trainer / "global_step2")
        (trainer / "latest").write_text("global_step2")
        result = run("swa", tmp_path / "out", "--dry-run")
        assert result.exit_code == 0, result.output
        assert "checkpoint-2/global_step2" in result.output


class TestRefusals:
    def test_zero3_model_states_named_directly(self, runs, tmp_path):
        path = runs[3] / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        result = run("swa", path, "-o", tmp_path / "avg.safetensors")
        assert result.exit_code == 1
        (line,) = result.output.strip().splitlines()
        assert line.startswith(f"error: {path}: a DeepSpeed ZeRO-3 model-states file")
        assert "tensor 'emb.weight' has no values, [11, 5] in the model" in line
        assert f"give the folder {path.parent}" in line and "zero_to_fp32.py" in line
        assert not (tmp_path / "avg.safetensors").exists()

    def test_model_parallel_ranks(self, runs, tmp_path):
        folder = tmp_path / "global_step1"
        shutil.copytree(runs[2] / "global_step1", folder)
        shutil.copy(folder / "mp_rank_00_model_states.pt", folder / "mp_rank_01_model_states.pt")
        result = run("swa", folder, "--dry-run")
        assert result.exit_code == 1
        assert result.output.count("\n") == 1 and "model (tensor) parallelism" in result.output

    def test_a_missing_rank(self, runs, tmp_path):
        folder = tmp_path / "global_step1"
        shutil.copytree(runs[3] / "global_step1", folder)
        (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
        result = run("swa", folder, "--dry-run")
        assert result.exit_code == 1
        assert "holds 1 *_optim_states.pt files, but the checkpoint was saved by 2 ranks" in result.output

    def test_master_weights_of_a_plain_file(self, runs, tmp_path):
        path = runs[2] / "global_step1" / "mp_rank_00_model_states.pt"
        result = run("swa", path, "--master-weights", "--dry-run")
        assert result.exit_code == 1
        assert "--master-weights reads DeepSpeed checkpoint folders" in result.output
