"""The least-squares solve of EDM2's post-hoc EMA (Karras et al. 2024, Algorithm 3), in float64.

An EMA snapshot taken at step `t` with exponent `gamma` weighs the training
weights of step `tau` by the power profile `p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`
on `[0, t]`. A target profile is approximated by the combination of the snapshots'
profiles closest to it in L2: with `A` the snapshots' inner products and `b` their
inner products with the target (both in closed form, equation 151), `x = A^-1 b`,
then normalized to sum to 1 as NVlabs/edm2's `solve_posthoc_coefficients` does.
The residual says how far the normalized combination is from the target profile,
relative to the target's norm: 0 is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ScheduleError


@dataclass(frozen=True)
class Profile:
    """A power-function EMA profile: the step it was read at and its exponent."""

    step: int
    gamma: float


@dataclass(frozen=True)
class Solution:
    """The snapshots' weights (summing to 1) and the fit's relative residual."""

    weights: list[float]
    residual: float


def inner_products(a_steps, a_gammas, b_steps, b_gammas) -> np.ndarray:
    """`<p_a, p_b>` for power profiles, in closed form (broadcasting float64 arrays)."""
    a_steps, a_gammas, b_steps, b_gammas = (np.float64(x) for x in (a_steps, a_gammas, b_steps, b_gammas))
    ratio = a_steps / b_steps
    exponent = np.where(a_steps < b_steps, b_gammas, -a_gammas)
    numerator = (a_gammas + 1) * (b_gammas + 1) * ratio**exponent
    return numerator / ((a_gammas + b_gammas + 1) * np.maximum(a_steps, b_steps))


def solve(snapshots: Sequence[Profile], target: Profile) -> Solution:
    """The normalized least-squares weights of the snapshots for the target profile.

    Raises:
        ScheduleError: no snapshot, a snapshot at step 0, or snapshots whose profiles cannot
            be told apart (the same step and exponent twice).
    """
    if not snapshots:
        raise ScheduleError("no EMA snapshot at or before the target step")
    if any(s.step <= 0 for s in snapshots) or target.step <= 0:
        raise ScheduleError("post-hoc EMA needs snapshots taken after step 0")
    steps = np.array([s.step for s in snapshots], dtype=np.float64)
    gammas = np.array([s.gamma for s in snapshots], dtype=np.float64)
    a = inner_products(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = inner_products(steps, gammas, np.float64(target.step), np.float64(target.gamma))
    try:
        x = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        raise ScheduleError(
            "the snapshots' profiles are not independent (two snapshots of the same profile at the "
            "same step?); give each snapshot once"
        ) from None
    if not np.all(np.isfinite(x)) or x.sum() == 0:
        raise ScheduleError("the post-hoc EMA solve is ill-conditioned: too many snapshots close together")
    w = x / x.sum()
    target_norm = inner_products(target.step, target.gamma, target.step, target.gamma)
    error = target_norm - 2 * (w @ b) + w @ a @ w
    return Solution([float(v) for v in w], float(np.sqrt(max(error, 0.0) / target_norm)))
