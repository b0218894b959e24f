"""Correctly rounded outputs: each value the nearest of its dtype to the float64 average.

The oracle is torch in float64, `sum(w_i * x_i)`; a value is correctly rounded when neither
neighbour in its dtype (the bit pattern one up or one down) lies nearer to that average, by more
than the float64 sum's own rounding (a few units of its last place: on a tie, either sum may
land on either side).
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptavg

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def _nearest(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Where `values` is the nearest of its dtype to the float64 `reference`."""
    bits = values.view(_BITS[values.element_size()])
    distance = (values.double() - reference).abs() - reference.abs() * 2**-49
    nearest = torch.ones_like(distance, dtype=torch.bool)
    for step in (1, -1):
        neighbour = (bits + step).view(values.dtype).double()
        nearest &= ~(((neighbour - reference).abs() < distance) & neighbour.isfinite())
    return nearest


@pytest.fixture
def series(tmp_path):
    generator = torch.Generator().manual_seed(0)
    scale = torch.logspace(-6, 3, 4096, dtype=torch.float64)  # values over many binades
    states = [{"w": torch.randn(4096, generator=generator, dtype=torch.float64) * scale} for _ in range(20)]
    weights = torch.rand(20, generator=generator, dtype=torch.float64).tolist()
    return tmp_path, states, [w / sum(weights) for w in weights]


def _average(folder, states, weights, stored, **options):
    paths = []
    for i, state in enumerate(states):
        paths.append(folder / f"step_{i + 1}.safetensors")
        save_file({k: v.to(stored) for k, v in state.items()}, paths[-1])
    out = folder / "out.safetensors"
    ckptavg.average(paths, ckptavg.weighted(weights), out=out, force=True, **options)
    reference = sum(w * s["w"].to(stored).double() for w, s in zip(weights, states, strict=True))
    return load_file(out)["w"], reference


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("output", ["float32", "bfloat16", "float16"])
def test_float64_sums_round_every_output_correctly(series, stored, output):
    folder, states, weights = series
    values, reference = _average(folder, states, weights, stored, dtype=output, accum_dtype="float64")
    assert str(values.dtype) == f"torch.{output}"
    assert _nearest(values, reference).all()


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float64])
def test_float32_outputs_are_correctly_rounded_by_default(series, stored):
    folder, states, weights = series
    values, reference = _average(folder, states, weights, stored, dtype="float32")
    assert _nearest(values, reference).all()


def test_a_plain_float32_sum_is_not(series):
    """What the default replaced: the oracle does tell the difference."""
    folder, states, weights = series
    values, reference = _average(folder, states, weights, torch.float32, accum_dtype="float32")
    assert 0.2 < _nearest(values, reference).float().mean() < 0.9


@pytest.mark.parametrize("stored", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_outputs_from_float64_sums(tmp_path, stored):
    generator = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(512, generator=generator, dtype=torch.float64) * 4} for _ in range(5)]
    weights = [0.1, 0.2, 0.3, 0.15, 0.25]
    values, reference = _average(tmp_path, states, weights, stored, accum_dtype="float64")
    assert values.dtype == stored and _nearest(values, reference).all()


def test_ties_round_to_even(tmp_path):
    """1 + 2^-8 lies halfway between two bfloat16 values; 1 + 2^-8 + 2^-30 just above it, which
    rounding to float32 first would put on the tie."""
    states = [
        {"w": torch.tensor([1.0, 1.0 + 2**-7 + 2**-29], dtype=torch.float64)},
        {"w": torch.tensor([1.0 + 2**-7, 1.0], dtype=torch.float64)},
    ]
    values, _ = _average(tmp_path, states, [0.5, 0.5], torch.float64, dtype="bfloat16")
    assert values.tolist() == [1.0, 1.0 + 2**-7]
