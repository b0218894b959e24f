"""Weight schedules: every averaging method is one weight per checkpoint.

The engine computes `out = sum(w_i * x_i)` and knows nothing else, so a method is
just a pure function from the ordered checkpoints to weights that sum to 1.
No I/O and no torch here; the weights are float64 Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import ScheduleError


class Schedule(Protocol):
    """What the planner asks of a method."""

    method: str

    def weights(self, count: int) -> list[float]:
        """One weight per checkpoint, oldest first, summing to 1."""

    def params(self) -> dict:
        """The method's parameters, recorded in the output's metadata."""

    def warnings(self, count: int) -> list[str]:
        """Advice about weights a user probably did not intend."""


@dataclass(frozen=True)
class Swa:
    """Equal weights, as `torch.optim.swa_utils.AveragedModel` computes by default."""

    method = "swa"

    def weights(self, count: int) -> list[float]:
        _require_checkpoints(count)
        return [1.0 / count] * count

    def params(self) -> dict:
        return {}

    def warnings(self, count: int) -> list[str]:
        return []


@dataclass(frozen=True)
class Ema:
    """Exponential moving average with torch's semantics (torchvision's reference EMA).

    The first checkpoint is the starting value (`AveragedModel` copies on its
    first update), then each later one applies `avg = decay * avg + (1 - decay) * x`.
    Unrolled over N checkpoints: `w_1 = decay^(N-1)`, `w_k = (1 - decay) * decay^(N-k)`.
    The decay is per checkpoint here, not per optimizer step.
    """

    decay: float
    method = "ema"

    def __post_init__(self):
        if not (0.0 <= self.decay <= 1.0) or math.isnan(self.decay):
            raise ScheduleError(f"--decay must be between 0 and 1, got {self.decay}")

    def weights(self, count: int) -> list[float]:
        _require_checkpoints(count)
        d = self.decay
        return [d ** (count - 1)] + [(1.0 - d) * d ** (count - k) for k in range(2, count + 1)]

    def params(self) -> dict:
        return {"decay": self.decay}

    def warnings(self, count: int) -> list[str]:
        if count < 2:
            return []
        weights = self.weights(count)
        heaviest = max(range(count), key=weights.__getitem__)
        if weights[heaviest] <= 0.5:
            return []
        return [
            f"--decay {self.decay} over {count} checkpoints leaves {weights[heaviest]:.1%} of the "
            f"weight on checkpoint {heaviest + 1}: the decay applies once per checkpoint, not per "
            f"training step; --decay {suggest_decay(count)} keeps every checkpoint at or below 50%"
        ]


@dataclass(frozen=True)
class Weighted:
    """Explicit weights, one per checkpoint, normalized to sum to 1."""

    given: tuple[float, ...]
    method = "avg"

    def __post_init__(self):
        if any(not math.isfinite(w) or w < 0 for w in self.given):
            raise ScheduleError(f"--weights must be finite and >= 0, got {_fmt(self.given)}")
        if not self.given or sum(self.given) <= 0:
            raise ScheduleError(f"--weights must not all be zero, got {_fmt(self.given)}")

    def weights(self, count: int) -> list[float]:
        if count != len(self.given):
            raise ScheduleError(
                f"--weights has {len(self.given)} values for {count} checkpoints; give one per checkpoint"
            )
        total = math.fsum(self.given)
        return [w / total for w in self.given]

    def params(self) -> dict:
        return {"weights": list(self.given)}

    def warnings(self, count: int) -> list[str]:
        return []


def swa() -> Swa:
    """Equal weights: `ckptavg.average(paths, ckptavg.swa(), out="swa.safetensors")`."""
    return Swa()


def ema(decay: float) -> Ema:
    """Torch-style EMA over the checkpoints in order, `decay` applied once per checkpoint."""
    return Ema(float(decay))


def weighted(weights: Sequence[float]) -> Weighted:
    """Explicit weights, normalized to sum to 1: `weighted([1, 1, 2])` is `[0.25, 0.25, 0.5]`."""
    return Weighted(tuple(float(w) for w in weights))


def suggest_decay(count: int) -> float:
    """The largest decay (two decimals) leaving no checkpoint more than half the weight.

    With N checkpoints the first carries `d^(N-1)` and the last `1 - d`, so
    `0.5 <= d <= 0.5^(1/(N-1))`.
    """
    if count < 2:
        return 0.5
    return max(0.5, math.floor(0.5 ** (1.0 / (count - 1)) * 100) / 100)


def _require_checkpoints(count: int) -> None:
    if count < 1:
        raise ScheduleError("no checkpoints to average")


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)
