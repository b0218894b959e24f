"""Numbers at the edges: no silently wrong output, no "unexpected" error, through the real CLI."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import temp_files
from safetensors.torch import load_file, save_file

from ckptavg.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "unexpected" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def save_states(folder, states, metadata=None):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, state in enumerate(states, 1):
        path = folder / f"step_{i}.safetensors"
        save_file(state, path, metadata=(metadata[i - 1] if metadata else None))
        paths.append(path)
    return paths


class TestNarrowOutputDtype:
    """Values beyond float16's range became Inf with no warning: the check ran before the cast."""

    @pytest.fixture
    def wide(self, tmp_path):
        return save_states(
            tmp_path / "ckpts", [{"w": torch.full((8,), 7e4 + i), "b": torch.ones(2)} for i in range(3)]
        )

    def test_error_names_the_tensor_and_writes_nothing(self, tmp_path, wide):
        out = tmp_path / "o.safetensors"
        line = one_error_line(run("swa", *wide, "-o", out, "--dtype", "float16"), "'w'", "float16")
        assert "--dtype" in line and not out.exists() and temp_files(tmp_path) == []

    def test_a_single_checkpoint_cast_is_checked_too(self, tmp_path, wide):
        out = tmp_path / "o.safetensors"
        one_error_line(run("swa", wide[0], "-o", out, "--dtype", "float16", "-q"), "'w'")
        assert not out.exists()

    def test_warn_writes_the_infinities_and_says_so(self, tmp_path, wide):
        out = tmp_path / "o.safetensors"
        result = run("swa", *wide, "-o", out, "--dtype", "float16", "--nonfinite", "warn", "-q")
        assert result.exit_code == 0, result.output
        assert "warning: tensor 'w'" in result.output and "(--nonfinite warn)" in result.output
        assert torch.isinf(load_file(out)["w"]).all()

    def test_within_range_is_untouched(self, tmp_path):
        paths = save_states(tmp_path / "ckpts", [{"w": torch.full((8,), 6e4)} for _ in range(2)])
        out = tmp_path / "o.safetensors"
        assert run("swa", *paths, "-o", out, "--dtype", "float16", "-q").exit_code == 0
        assert load_file(out)["w"].tolist() == [6e4] * 8


def test_float64_tensors_are_summed_in_float64(tmp_path):
    """1e-300 is 0 in float32; the average of float64 values must be the float64 average."""
    values = [torch.tensor([1e-300, 3e-300, 1.0 + 2**-40], dtype=torch.float64) * (i + 1) for i in range(3)]
    paths = save_states(tmp_path / "ckpts", [{"d": v, "f": torch.ones(2)} for v in values])
    out = tmp_path / "o.safetensors"
    result = run("swa", *paths, "-o", out)
    assert result.exit_code == 0, result.output
    assert "2 averaged: 2 in float64, correctly rounded" in result.output
    result = run("swa", *paths, "-o", out, "--force", "--accum-dtype", "float32")
    assert "2 averaged: 1 in float64, correctly rounded, 1 in float32" in result.output
    expected = torch.stack(values).mean(0)
    assert torch.equal(load_file(out)["d"], expected)


class TestFloat8:
    @pytest.fixture
    def originals(self):
        torch.manual_seed(0)
        return [{"a": torch.randn(64) * 4, "b": torch.randn(3, 5)} for _ in range(3)]

    @pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
    def test_averaged_in_float32_and_cast_back(self, tmp_path, originals, dtype):
        stored = [{k: v.to(dtype) for k, v in state.items()} for state in originals]
        paths = save_states(tmp_path / "ckpts", stored)
        out = tmp_path / "o.safetensors"
        result = run("swa", *paths, "-o", out, "-q")
        assert result.exit_code == 0, result.output
        averaged = load_file(out)
        for name in ("a", "b"):
            expected = torch.stack([s[name].float() for s in stored]).mean(0).to(dtype)
            assert averaged[name].dtype == dtype
            assert torch.equal(averaged[name].view(torch.uint8), expected.view(torch.uint8))

    @pytest.mark.parametrize("count", [1, 3])
    def test_nan_in_float8_is_found(self, tmp_path, originals, count):
        stored = [{k: v.to(torch.float8_e5m2) for k, v in state.items()} for state in originals[:count]]
        poisoned = stored[-1]["a"].float()
        poisoned[5] = float("nan")
        stored[-1]["a"] = poisoned.to(torch.float8_e5m2)
        paths = save_states(tmp_path / "ckpts", stored)
        one_error_line(run("swa", *paths, "-o", tmp_path / "o.safetensors"), str(paths[-1]), "'a'", "NaN")


class TestBestByMetric:
    @pytest.fixture
    def run_with_losses(self, tmp_path):
        losses = ["0.9", "nan", "0.5", "0.7"]
        states = [{"w": torch.full((4,), float(i))} for i in range(4)]
        return save_states(tmp_path / "ckpts", states, [{"loss": loss} for loss in losses])

    def test_nan_is_never_best_and_the_plan_says_which_were_left_out(self, tmp_path, run_with_losses):
        out = tmp_path / "o.safetensors"
        result = run("swa", *run_with_losses, "--best", "2", "--metric", "loss", "--mode", "min", "-o", out)
        assert result.exit_code == 0, result.output
        assert "left out 1 whose loss is NaN" in result.output and "step_2.safetensors" in result.output
        assert load_file(out)["w"].tolist() == [2.5] * 4  # steps 3 and 4: losses 0.5 and 0.7

    def test_every_metric_nan(self, tmp_path):
        states = [{"w": torch.ones(2)} for _ in range(2)]
        paths = save_states(tmp_path / "ckpts", states, [{"loss": "nan"}, {"loss": "nan"}])
        one_error_line(run("swa", *paths, "--best", "1", "--metric", "loss", "--dry-run"), "NaN")


METRICS_FILES = {
    "deeply nested JSON": ("m.json", b"[" * 100_000),
    "Latin-1 CSV": ("m.csv", b"step,loss\n1,caf\xe9\n2,1\n"),
    "text where a number belongs": ("m.csv", b"step,loss\n1,abc\n2,1\n"),
    "a JSON string": ("m.json", b'"hello"'),
    "a JSON list of numbers": ("m.json", b"[1, 2]"),
    "a JSON list for a value": (
        "m.json",
        json.dumps([{"step": 1, "loss": [1]}, {"step": 2, "loss": 2}]).encode(),
    ),
    "a number too large for a float": (
        "m.json",
        b'[{"step": 1, "loss": 1' + b"0" * 400 + b'}, {"step": 2, "loss": 1}]',
    ),
}


@pytest.mark.parametrize("case", list(METRICS_FILES))
def test_malformed_metrics_file_is_one_line(tmp_path, case):
    name, content = METRICS_FILES[case]
    metrics = tmp_path / name
    metrics.write_bytes(content)
    paths = save_states(tmp_path / "ckpts", [{"w": torch.ones(2)} for _ in range(2)])
    result = run(
        "swa",
        *paths,
        "--best",
        "1",
        "--metric",
        "loss",
        "--metrics",
        metrics,
        "-o",
        tmp_path / "o.safetensors",
    )
    one_error_line(result, str(metrics))


def test_weights_near_the_float_maximum_are_normalized(tmp_path):
    paths = save_states(tmp_path / "ckpts", [{"w": torch.full((2,), float(i))} for i in range(3)])
    out = tmp_path / "o.safetensors"
    result = run("avg", "--weights", "1e308,1e308,0", *paths, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert load_file(out)["w"].tolist() == [0.5, 0.5]


def test_a_huge_gamma_puts_all_weight_on_the_last_checkpoint(tmp_path):
    paths = save_states(tmp_path / "ckpts", [{"w": torch.full((2,), float(i))} for i in range(3)])
    out = tmp_path / "o.safetensors"
    result = run("ema", "--gamma", "1e308", *paths, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert load_file(out)["w"].tolist() == [2.0, 2.0]
