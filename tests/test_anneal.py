"""`anneal`: the merge of a constant-rate run's checkpoints equals the run with a decayed learning rate.

The oracle is torch's own SGD over a fixed, recorded sequence of gradients (they do not depend
on the weights): once at the constant rate, saving checkpoints, and once from the first
checkpoint with the rate a `LambdaLR` schedule gives, the decay written here from its formula
(held at its mean over each interval between checkpoints when they are not saved every step).
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.cli import main
from ckptavg.errors import ScheduleError

RATE = 0.05
SHAPES = {
    "linear": lambda x: 1 - x,
    "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
    "1-sqrt": lambda x: 1 - math.sqrt(x),
    "exp:4": lambda x: math.exp(-4 * x),
}
EVERY_STEP = list(range(20, 61))
UNEVEN = [20, 21, 25, 26, 40, 47, 70, 71, 100]


def _gradients(steps: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (3, 6)}
    return [
        {n: torch.randn(s, generator=generator, dtype=torch.float64) for n, s in shapes.items()}
        for _ in range(steps)
    ]


def _sgd(start: dict, gradients: list, first_step: int, last_step: int, lr_lambda=None, save=None) -> dict:
    """torch's SGD from `start` at `first_step` to `last_step`, update t using gradient t."""
    params = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
    optimizer = torch.optim.SGD(params.values(), lr=RATE)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda or (lambda i: 1.0))
    for t in range(first_step, last_step):
        if save is not None:
            save(t, params)
        for n, p in params.items():
            p.grad = gradients[t][n]
        optimizer.step()
        schedule.step()
    if save is not None:
        save(last_step, params)
    return {n: p.detach() for n, p in params.items()}


def _constant_run(tmp_path, steps: list[int], gradients) -> tuple[list, dict]:
    """The constant-rate run from step 0, with checkpoints at `steps`; and its weights at steps[0]."""
    generator = torch.Generator().manual_seed(1)
    init = {
        n: torch.randn(g.shape, generator=generator, dtype=torch.float64) for n, g in gradients[0].items()
    }
    saved, paths = {}, []

    def save(t, params):
        if t in steps:
            state = {n: p.detach().clone() for n, p in params.items()}
            saved[t] = state
            paths.append(tmp_path / f"step_{t}.safetensors")
            save_file(state, paths[-1])

    _sgd(init, gradients, 0, steps[-1], save=save)
    return paths, saved[steps[0]]


def _held_decay(h, ratio: float, steps: list[int]):
    """LambdaLR's factor for update i after steps[0]: the decay's mean over its interval."""
    first, span = steps[0], steps[-1] - steps[0]

    def f(t):
        return ratio + (1 - ratio) * h((t - first) / span)

    means = []
    for a, b in pairwise(steps):
        means += [sum(f(t) for t in range(a, b)) / (b - a)] * (b - a)
    return lambda i: means[i] if i < len(means) else means[-1]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.0, 0.1])
@pytest.mark.parametrize("spacing", ["every-step", "uneven"])
def test_merge_equals_the_decayed_sgd_run(tmp_path, shape, ratio, spacing):
    steps = EVERY_STEP if spacing == "every-step" else UNEVEN
    gradients = _gradients(steps[-1])
    paths, start = _constant_run(tmp_path, steps, gradients)
    if spacing == "every-step":  # plain SGD with the decayed learning rate
        first, span = steps[0], steps[-1] - steps[0]
        decay = lambda i: ratio + (1 - ratio) * SHAPES[shape](i / span)  # noqa: E731
        assert first + span == steps[-1]
    else:
        decay = _held_decay(SHAPES[shape], ratio, steps)
    expected = _sgd(start, gradients, steps[0], steps[-1], lr_lambda=decay)
    out = tmp_path / "merged.safetensors"
    ckptavg.average(paths, ckptavg.anneal(shape, final_lr_ratio=ratio), out=out)
    merged = load_file(out)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-12, atol=1e-13)


def test_float32_output_is_the_oracle_rounded_once(tmp_path):
    gradients = _gradients(UNEVEN[-1])
    paths, start = _constant_run(tmp_path, UNEVEN, gradients)
    expected = _sgd(
        start, gradients, UNEVEN[0], UNEVEN[-1], lr_lambda=_held_decay(SHAPES["cosine"], 0, UNEVEN)
    )
    out = tmp_path / "merged.safetensors"
    ckptavg.average(paths, ckptavg.anneal("cosine"), out=out, dtype="float32")
    for name, value in load_file(out).items():
        assert value.dtype == torch.float32
        ulp = torch.nextafter(value.abs(), torch.tensor(math.inf)) - value.abs()
        assert ((value.double() - expected[name]).abs() <= ulp.double() / 2 * (1 + 1e-9)).all()


def test_weights_every_step_are_differences_of_the_decay():
    weights = ckptavg.anneal("linear").weights(5, [0, 1, 2, 3, 4])
    assert weights == pytest.approx([0.0, 0.25, 0.25, 0.25, 0.25])
    weights = ckptavg.anneal("linear", final_lr_ratio=1.0).weights(3, [0, 5, 10])
    assert weights == pytest.approx([0.0, 0.0, 1.0])
    for shape in SHAPES:
        weights = ckptavg.anneal(shape, final_lr_ratio=0.2).weights(len(UNEVEN), UNEVEN)
        assert math.isclose(math.fsum(weights), 1.0) and min(weights) >= 0


@pytest.mark.parametrize(
    ("shape", "ratio", "match"),
    [
        ("quadratic", 0, "`shape=quadratic`: use one of linear, cosine, 1-sqrt, exp:RATE"),
        ("exp:-1", 0, "`shape=exp:-1`"),
        ("exp:", 0, "`shape=exp:`"),
        ("linear", 1.5, "`final_lr_ratio` must be between 0 and 1"),
    ],
)
def test_bad_parameters_are_one_line(shape, ratio, match):
    with pytest.raises(ScheduleError, match=match):
        ckptavg.anneal(shape, final_lr_ratio=ratio)


def test_needs_every_step(tmp_path):
    tmp_path = tmp_path / "run"  # pytest's folder name ends in a number, which would read as a step
    tmp_path.mkdir()
    save_file({"w": torch.ones(3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(3)}, tmp_path / "step_10.safetensors")
    result = CliRunner().invoke(
        main,
        [
            "anneal",
            "--shape",
            "linear",
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "step_10.safetensors"),
            "-o",
            str(tmp_path / "out.safetensors"),
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --shape linear needs the training step of every checkpoint; 1 unknown: give them with "
        "--steps, or name the files like step_1000"
    ]


def test_dry_run_shows_the_weights_and_the_decay(tmp_path):
    for step in (0, 100, 300, 1000):
        save_file({"w": torch.ones(3)}, tmp_path / f"step_{step}.safetensors")
    result = CliRunner().invoke(
        main,
        [
            "anneal",
            "--shape",
            "1-sqrt",
            "--final-lr-ratio",
            "0.1",
            str(tmp_path / "step_*.safetensors"),
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "anneal (shape=1-sqrt, final_lr_ratio=0.1) over 4 checkpoints, oldest first:"
    start = lines.index(
        "decay:      the learning rate (a fraction of the constant one) each interval stands for:"
    )
    intervals = [line.split() for line in lines[start + 1 : start + 4]]
    assert [(i[0], i[2]) for i in intervals] == [("0", "99"), ("100", "299"), ("300", "999")]
    multipliers = [float(i[3]) for i in intervals]
    assert multipliers == sorted(multipliers, reverse=True) and multipliers[-1] > 0.1
    assert [len(i[4]) for i in intervals] == [round(20 * m) for m in multipliers]
