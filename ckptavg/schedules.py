"""Weight schedules: every averaging method is one weight per checkpoint.

The engine computes `out = sum(w_i * x_i)` and knows nothing else, so a method is
a pure function from the ordered checkpoints (their count, and their training
steps where a method needs them) to weights that sum to 1. No I/O and no torch
here; the weights are float64 Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

from .errors import ScheduleError

# sigma_rel of a power EMA profile peaks at gamma = 0: sqrt(1/12).
MAX_SIGMA_REL = math.sqrt(1 / 12)


class Schedule(Protocol):
    """What the planner asks of a method."""

    method: str

    def weights(self, count: int, steps: Sequence[int | None] | None = None) -> list[float]:
        """One weight per checkpoint, oldest first, summing to 1."""

    def params(self) -> dict:
        """The method's parameters, recorded in the output's metadata."""

    def warnings(self, count: int) -> list[str]:
        """Advice about weights a user probably did not intend."""


@dataclass(frozen=True)
class Swa:
    """Equal weights, as `torch.optim.swa_utils.AveragedModel` computes by default."""

    method = "swa"

    def weights(self, count: int, steps: Sequence[int | None] | None = None) -> list[float]:
        _require_checkpoints(count)
        return [1.0 / count] * count

    def params(self) -> dict:
        return {}

    def warnings(self, count: int) -> list[str]:
        return []


@dataclass(frozen=True)
class Ema:
    """Exponential moving average with torch's semantics (torchvision's reference EMA).

    Per checkpoint (default): the first checkpoint is the starting value
    (`AveragedModel` copies on its first update), then each later one applies
    `avg = decay * avg + (1 - decay) * x`, so `w_1 = d^(N-1)`, `w_k = (1-d) d^(N-k)`.

    Per step (`per_step`): the decay applies once per training step, and each
    checkpoint stands for the steps since the one before (the weights are taken
    to stay constant between saves). Integrating the kernel over those steps,
    `w_1 = d^(T-s_1)` and `w_k = d^(T-s_k) - d^(T-s_(k-1))`, with T the last
    step: exactly torch's per-step EMA when every step is saved, and independent
    of how often checkpoints were saved otherwise.

    `bias_correction`: start from zeros and divide by `1 - d^N` (`1 - d^T` per
    step), as optax and Adam do, instead of starting from the first checkpoint.
    """

    decay: float
    per_step: bool = False
    bias_correction: bool = False
    method = "ema"

    def __post_init__(self):
        if not (0.0 <= self.decay <= 1.0) or math.isnan(self.decay):
            raise ScheduleError(f"`decay` must be between 0 and 1, got {self.decay}")
        if self.bias_correction and self.decay == 1.0:
            raise ScheduleError("`bias_correction` needs a decay below 1")

    def weights(self, count: int, steps: Sequence[int | None] | None = None) -> list[float]:
        _require_checkpoints(count)
        # Per checkpoint is per step with checkpoint k saved at step k.
        times = require_steps(steps, count, "`per_step`") if self.per_step else list(range(1, count + 1))
        bounds = _step_bounds(times, start_at_zero=self.bias_correction)
        return _ema_over_intervals(self.decay, bounds, self.bias_correction)

    def params(self) -> dict:
        params: dict = {"decay": self.decay}
        if self.per_step:
            params["per_step"] = True
        if self.bias_correction:
            params["bias_correction"] = True
        return params

    def warnings(self, count: int) -> list[str]:
        if count < 2 or self.per_step:
            return []
        weights = self.weights(count)
        heaviest = max(range(count), key=weights.__getitem__)
        if weights[heaviest] <= 0.5:
            return []
        return [
            f"`decay={self.decay}` over {count} checkpoints leaves {weights[heaviest]:.1%} of the "
            f"weight on checkpoint {heaviest + 1}: the decay applies once per checkpoint, not per "
            f"training step (for that, add `per_step`); `decay={suggest_decay(count)}` keeps every "
            "checkpoint at or below 50%"
        ]


@dataclass(frozen=True)
class PowerEma:
    """Post-hoc power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training
    Dynamics of Diffusion Models"), from the raw checkpoints.

    The EMA with `beta(t) = (1 - 1/t)^(gamma+1)` weighs step `tau` by a profile
    `p(tau) ~ tau^gamma` on `[0, T]`. Each checkpoint stands for the steps since
    the one before (the first for all steps before it), so its weight is the
    profile integrated there: `w_k = (s_k/T)^(gamma+1) - (s_(k-1)/T)^(gamma+1)`.
    """

    gamma: float
    given_sigma_rel: float | None = None  # as the user wrote it, for file names and metadata
    method = "power-ema"

    def __post_init__(self):
        if not self.gamma > -1 or math.isinf(self.gamma):
            raise ScheduleError(f"`gamma` must be above -1, got {self.gamma}")

    @property
    def sigma_rel(self) -> float:
        return self.given_sigma_rel if self.given_sigma_rel is not None else gamma_to_sigma_rel(self.gamma)

    def weights(self, count: int, steps: Sequence[int | None] | None = None) -> list[float]:
        _require_checkpoints(count)
        bounds = _step_bounds(require_steps(steps, count, "`sigma_rel`/`gamma`"), start_at_zero=True)
        last = bounds[-1]
        if last <= 0:
            raise ScheduleError("a power EMA needs checkpoints after step 0")
        power = self.gamma + 1
        cumulative = [(b / last) ** power for b in bounds]
        return [cumulative[k] - cumulative[k - 1] for k in range(1, len(cumulative))]

    def params(self) -> dict:
        return {"gamma": self.gamma, "sigma_rel": self.sigma_rel}

    def warnings(self, count: int) -> list[str]:
        return []


@dataclass(frozen=True)
class Weighted:
    """Explicit weights, one per checkpoint, normalized to sum to 1."""

    given: tuple[float, ...]
    method = "avg"

    def __post_init__(self):
        if any(not math.isfinite(w) or w < 0 for w in self.given):
            raise ScheduleError(f"`weights` must be finite and >= 0, got {_fmt(self.given)}")
        if not self.given or sum(self.given) <= 0:
            raise ScheduleError(f"`weights` must not all be zero, got {_fmt(self.given)}")

    def weights(self, count: int, steps: Sequence[int | None] | None = None) -> list[float]:
        if count != len(self.given):
            raise ScheduleError(
                f"`weights` has {len(self.given)} values for {count} checkpoints; give one per checkpoint"
            )
        largest = max(self.given)  # scaled first, so weights near the float maximum cannot overflow the sum
        total = math.fsum(w / largest for w in self.given)
        return [w / largest / total for w in self.given]

    def params(self) -> dict:
        return {"weights": list(self.given)}

    def warnings(self, count: int) -> list[str]:
        return []


@dataclass(frozen=True)
class Anneal:
    """The merge that stands in for a learning-rate decay (WSM: Tian et al. 2025, arXiv 2507.17634).

    Checkpoints at steps `s_0 < ... < s_n` of a constant-rate run; interval k holds
    the updates from `s_k` to `s_(k+1)`. A merge `sum c_i theta_i` applies to every
    update of interval k the multiplier `sum_(i>k) c_i`. To stand for the decay
    `f(x) = r + (1 - r) h(x)` over the window (`r` the `final_lr_ratio`, x from 0 at
    `s_0` to 1 at `s_n`), interval k gets `m_k`, the mean of f over its steps
    `t = s_k ... s_(k+1) - 1`, and the weights solve for it: `c_0 = 1 - m_0`,
    `c_i = m_(i-1) - m_i`, `c_n = m_(n-1)`. With every step saved this is exactly SGD
    with the decayed learning rate; otherwise the run whose rate is `m_k` through
    interval k.
    """

    shape: str
    final_lr_ratio: float = 0.0
    method = "anneal"

    def __post_init__(self):
        _decay_shape(self.shape)
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ScheduleError(f"`final_lr_ratio` must be between 0 and 1, got {self.final_lr_ratio}")

    def weights(self, count: int, steps: Sequence[int | None] | None = None) -> list[float]:
        _require_checkpoints(count)
        multipliers = self.multipliers(require_steps(steps, count, f"`shape={self.shape}`"))
        if not multipliers:
            return [1.0]
        ends = [1.0, *multipliers, 0.0]  # the multiplier before the window, each interval's, after it
        return [ends[i] - ends[i + 1] for i in range(count)]

    def multipliers(self, steps: Sequence[int]) -> list[float]:
        """`m_k` for each interval between consecutive steps: the decay's mean over its updates."""
        h, first, span = _decay_shape(self.shape), steps[0], steps[-1] - steps[0]
        r = self.final_lr_ratio
        return [
            r + (1 - r) * math.fsum(h((t - first) / span) for t in range(a, b)) / (b - a)
            for a, b in pairwise(steps)
        ]

    def params(self) -> dict:
        return {"shape": self.shape, "final_lr_ratio": self.final_lr_ratio}

    def warnings(self, count: int) -> list[str]:
        return []


def swa() -> Swa:
    """Equal weights: `ckptavg.average(paths, ckptavg.swa(), out="swa.safetensors")`."""
    return Swa()


def ema(
    decay: float | None = None,
    *,
    half_life: float | None = None,
    per_step: bool = False,
    bias_correction: bool = False,
) -> Ema:
    """Torch-style EMA over the checkpoints in order.

    Args:
        decay: kept per checkpoint, or per training step with `per_step`.
        half_life: instead of `decay`, in training steps (implies `per_step`).
        per_step: the decay applies per training step; needs each checkpoint's step.
        bias_correction: zero-initialised EMA divided by `1 - decay^N`.
    """
    if (decay is None) == (half_life is None):
        raise ScheduleError("give the EMA either `decay` or `half_life`")
    if half_life is not None:
        if not half_life > 0:
            raise ScheduleError(f"`half_life` must be a positive number of steps, got {half_life}")
        decay, per_step = 0.5 ** (1.0 / half_life), True
    return Ema(float(decay), per_step=per_step, bias_correction=bias_correction)


def power_ema(*, sigma_rel: float | None = None, gamma: float | None = None) -> PowerEma:
    """Post-hoc power EMA with a relative width `sigma_rel` (or exponent `gamma`)."""
    if (sigma_rel is None) == (gamma is None):
        raise ScheduleError("give the power EMA either `sigma_rel` or `gamma`")
    if sigma_rel is not None:
        return PowerEma(sigma_rel_to_gamma(sigma_rel), given_sigma_rel=float(sigma_rel))
    return PowerEma(float(gamma))


def weighted(weights: Sequence[float]) -> Weighted:
    """Explicit weights, normalized to sum to 1: `weighted([1, 1, 2])` is `[0.25, 0.25, 0.5]`."""
    return Weighted(tuple(float(w) for w in weights))


def anneal(shape: str, *, final_lr_ratio: float = 0.0) -> Anneal:
    """Weights that stand for decaying the learning rate over the checkpoints' steps.

    Args:
        shape: the decay, `linear`, `cosine`, `1-sqrt` or `exp:RATE` (e^(-RATE x)).
        final_lr_ratio: the rate at the end of the window, as a fraction of the peak.
    """
    return Anneal(shape, float(final_lr_ratio))


# algorithm 2 in https://arxiv.org/abs/2312.02696: sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3)))
def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / (gamma + 3)) / (gamma + 2)  # (gamma + 2) ** 2 would overflow first


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has this relative width (sigma_rel falls as gamma grows from 0)."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise ScheduleError(f"`sigma_rel` must be between 0 and {MAX_SIGMA_REL:.3f}, got {sigma_rel}")
    low, high = 0.0, 1.0
    while gamma_to_sigma_rel(high) > sigma_rel:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if gamma_to_sigma_rel(middle) > sigma_rel else (low, middle)
    return (low + high) / 2


def effective_count(weights: Sequence[float]) -> float:
    """How many equally weighted checkpoints the weights are worth: 1 / sum(w^2)."""
    return 1.0 / math.fsum(w * w for w in weights)


def implied_sigma_rel(weights: Sequence[float], steps: Sequence[int]) -> float:
    """The average's spread over training steps, relative to the last step (as sigma_rel)."""
    mean = math.fsum(w * s for w, s in zip(weights, steps, strict=True))
    variance = math.fsum(w * (s - mean) ** 2 for w, s in zip(weights, steps, strict=True))
    return math.sqrt(max(variance, 0.0)) / max(steps)


def require_steps(steps: Sequence[int | None] | None, count: int, option: str) -> list[int]:
    """The checkpoints' steps, increasing; a clear error when they are not all known."""
    if steps is None or len(steps) != count or any(s is None for s in steps):
        missing = count if steps is None else sum(s is None for s in steps)
        raise ScheduleError(
            f"{option} needs the training step of every checkpoint; {missing} unknown: "
            "give them with `steps`, or name the files like step_1000"
        )
    if any(b <= a for a, b in pairwise(steps)):
        raise ScheduleError(f"{option} needs increasing steps in averaging order, got {list(steps)}")
    return list(steps)


def suggest_decay(count: int) -> float:
    """The largest decay (two decimals) leaving no checkpoint more than half the weight.

    With N checkpoints the first carries `d^(N-1)` and the last `1 - d`, so
    `0.5 <= d <= 0.5^(1/(N-1))`.
    """
    if count < 2:
        return 0.5
    return max(0.5, math.floor(0.5 ** (1.0 / (count - 1)) * 100) / 100)


def _step_bounds(steps: list[int], *, start_at_zero: bool) -> list[int]:
    """Interval bounds `[s_0, s_1, ..., s_N]`: the first checkpoint starts at 0, or stands alone at s_1."""
    return [0 if start_at_zero else steps[0], *steps]


def _ema_over_intervals(decay: float, bounds: list[int], bias_correction: bool) -> list[float]:
    """EMA kernel mass over each interval `(bounds[k-1], bounds[k]]`, read at the last bound.

    Without bias correction the first interval is empty and its checkpoint takes
    the starting value's weight `d^(T - s_1)`; with it, the kernel's mass is
    divided by `1 - d^(T - s_0)`.
    """
    last = bounds[-1]
    if decay == 0.0:
        return [0.0] * (len(bounds) - 2) + [1.0]
    log_d = math.log(decay)

    def power(exponent: int) -> float:  # d^exponent
        return math.exp(exponent * log_d)

    if bias_correction:
        total = -math.expm1((last - bounds[0]) * log_d)
        return [power(last - b) * -math.expm1((b - a) * log_d) / total for a, b in pairwise(bounds)]
    weights = [power(last - bounds[1])]
    weights += [power(last - b) * -math.expm1((b - a) * log_d) for a, b in pairwise(bounds[1:])]
    return weights


DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "exp:RATE")


def _decay_shape(shape: str) -> Callable[[float], float]:
    """h(x) for x in [0, 1], falling from h(0) = 1."""
    if shape == "linear":
        return lambda x: 1.0 - x
    if shape == "cosine":
        return lambda x: (1.0 + math.cos(math.pi * x)) / 2
    if shape == "1-sqrt":
        return lambda x: 1.0 - math.sqrt(x)
    name, _, rate = shape.partition(":")
    try:
        value = float(rate) if name == "exp" else None
    except ValueError:
        value = None
    if value is None or not 0 < value < math.inf:
        raise ScheduleError(
            f"`shape={shape}`: use one of {', '.join(DECAY_SHAPES)}, with RATE a positive number"
        )
    return lambda x: math.exp(-value * x)


def _require_checkpoints(count: int) -> None:
    if count < 1:
        raise ScheduleError("no checkpoints to average")


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)
