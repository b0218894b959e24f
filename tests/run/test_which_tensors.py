"""Which tensors are averaged: --include/--exclude rules by name, and no average of empty inputs."""

import pytest
import torch
from click.testing import CliRunner
from conftest import save_series
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.cli import main
from ckptavg.errors import InputError
from ckptavg.options import ReadOptions


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def swa_of(states, names) -> dict:
    """What the average holds: the float64 mean of the floating tensors, the last integer ones."""
    return {
        name: torch.stack([s[name].double() for s in states]).mean(dim=0).float()
        if states[0][name].is_floating_point()
        else states[-1][name]
        for name in names
    }


def assert_holds(path, expected):
    out = load_file(path)
    assert out.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, rtol=1e-6, atol=1e-7, msg=name)


class TestRules:
    def test_exclude(self, tmp_path, series, states):
        report = run("swa", *series, "--exclude", "fc.*", "-o", tmp_path / "out.safetensors")
        assert "names:      --exclude fc.*: 2 tensors removed" in report
        assert_holds(tmp_path / "out.safetensors", swa_of(states, [n for n in states[0] if n[:3] != "fc."]))

    def test_include_then_exclude(self, tmp_path, series, states):
        report = run(
            "swa",
            *series,
            *("--include", "conv.*", "--include", "bn.*", "--exclude", "*.num_batches_tracked"),
            *("-o", tmp_path / "out.safetensors"),
        )
        assert "names:      --include conv.* keeps 2, --include bn.* keeps 5: 2 tensors removed" in report
        assert "names:      --exclude *.num_batches_tracked: 1 tensor removed" in report
        kept = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
        assert_holds(tmp_path / "out.safetensors", swa_of(states, kept))

    def test_rules_match_the_names_after_strip_prefix(self, tmp_path, states):
        paths = [tmp_path / f"step_{i}.pt" for i in range(1, 4)]
        for path, state in zip(paths, states, strict=False):
            torch.save({f"module.{k}": v for k, v in state.items()}, path)
        out = tmp_path / "out.safetensors"
        run("swa", *paths, "--strip-prefix", "module.", "--include", "fc.*", "-o", out)
        assert_holds(out, swa_of(states[:3], ["fc.weight", "fc.bias"]))

    def test_applied_before_the_same_model_check(self, tmp_path, states):
        paths = save_series(tmp_path / "ckpts", states[:3])
        save_file({**states[2], "aux.head": torch.ones(3)}, paths[2])  # one input has an extra head
        failed = invoke("swa", *paths, "-o", tmp_path / "a.safetensors")
        assert failed.exit_code == 1 and "has 1 tensor that" in failed.output
        report = run("swa", *paths, "--exclude", "aux.*", "-o", tmp_path / "b.safetensors")
        assert "--exclude aux.*: 0 to 1 tensor removed" in report
        assert_holds(tmp_path / "b.safetensors", swa_of(states[:3], states[0]))

    def test_a_rule_that_matches_nothing_is_a_warning(self, tmp_path, series, states):
        result = invoke("swa", *series, "--exclude", "head.*", "-o", tmp_path / "out.safetensors")
        assert result.exit_code == 0, result.output
        assert (
            "warning: --exclude head.* matches no tensor in any checkpoint "
            "(names are matched after --strip-prefix)" in result.output
        )
        assert_holds(tmp_path / "out.safetensors", swa_of(states, states[0]))

    def test_leaving_nothing_is_one_error(self, tmp_path, series):
        result = invoke("swa", *series, "--include", "conv.*", "--exclude", "conv*", "-o", tmp_path / "o.pt")
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert f"{series[0]}: --include conv.*, --exclude conv* leave none of its 9 tensors" in result.output
        assert "Traceback" not in result.output and not (tmp_path / "o.pt").exists()

    def test_python_api(self, tmp_path, series, states):
        plan = ckptavg.average(series, ckptavg.swa(), tmp_path / "out.safetensors", exclude="bn.*")
        assert "names:      `exclude=bn.*`: 5 tensors removed" in plan.describe()
        assert_holds(
            tmp_path / "out.safetensors", swa_of(states, ["conv.weight", "conv.bias", "fc.weight", "fc.bias"])
        )
        with ckptavg.open_checkpoints(series, ReadOptions(include=("fc.*",))) as checkpoints:
            assert [list(ck.tensors) for ck in checkpoints] == [["fc.bias", "fc.weight"]] * 5
        leaves_none = pytest.raises(InputError, match=r"`exclude=\*` leave none of its 9 tensors")
        with leaves_none, ckptavg.open_checkpoints(series, exclude=["*"]):
            pass


def hollow(state):
    """A placeholder of `state`: every floating tensor saved empty (ZeRO-3 style), integers kept."""
    return {k: torch.empty(0, dtype=v.dtype) if v.is_floating_point() else v for k, v in state.items()}


class TestHollowAverage:
    def test_an_input_without_weights_beside_real_ones(self, tmp_path, states):
        paths = save_series(tmp_path / "ckpts", states[:3])
        save_file(hollow(states[1]), paths[1])
        result = invoke("swa", *paths, "-o", tmp_path / "out.safetensors")
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(
            f"error: {paths[1]}: holds no weights: its 8 floating tensors are empty ('bn.bias', "
        )
        assert f"while {paths[0]} holds 178 parameters" in result.output
        assert not (tmp_path / "out.safetensors").exists()

    def test_inputs_that_all_hold_nothing(self, tmp_path, states):
        paths = save_series(tmp_path / "ckpts", [hollow(s) for s in states[:2]])
        with pytest.raises(InputError, match=r"step_1.safetensors: holds no weights: its 8 floating tensors"):
            ckptavg.average(paths, ckptavg.swa(), tmp_path / "out.safetensors")

    def test_rules_that_leave_only_integers(self, tmp_path, series):
        result = invoke(
            "swa", *series, "--include", "*.num_batches_tracked", "-o", tmp_path / "o.safetensors"
        )
        assert result.exit_code == 1, result.output
        assert (
            "holds no weights: it has no floating tensor left by --include/--exclude, "
            "only 1 integer or bool tensor; there is nothing to average" in result.output
        )
