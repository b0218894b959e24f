"""`PostHocEma`: the weight schedule of EDM2's post-hoc EMA, solved for the snapshots it is given."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ScheduleError
from ..schedules import sigma_rel_to_gamma
from .solve import Profile, Solution, solve

# A fit further than this from the target profile (relative L2 distance) is reported as poor.
POOR_FIT = 0.05
# Weights whose absolute values add up past this amplify each snapshot's noise.
LARGE_WEIGHTS = 10.0


@dataclass(frozen=True)
class PostHocEma:
    """The EMA profile `sigma_rel` as of `at_step`, synthesized from EMA snapshots.

    `snapshots` are the profiles of the checkpoints it weighs, in averaging order;
    the weights are the least-squares solve of `solve.solve`, normalized to sum to 1.
    """

    sigma_rel: float
    snapshots: tuple[Profile, ...]
    at_step: int
    method = "phema"

    def __post_init__(self):
        sigma_rel_to_gamma(self.sigma_rel)  # checks the range

    @property
    def gamma(self) -> float:
        return sigma_rel_to_gamma(self.sigma_rel)

    @functools.cached_property
    def solution(self) -> Solution:
        return solve(self.snapshots, Profile(self.at_step, self.gamma))

    def weights(self, count: int, steps: Sequence[int | None] | None = None) -> list[float]:
        if count != len(self.snapshots):
            raise ScheduleError(
                f"the post-hoc EMA is solved for {len(self.snapshots)} snapshots, not {count}: "
                "it cannot leave one out"
            )
        return self.solution.weights

    def params(self) -> dict:
        return {
            "sigma_rel": self.sigma_rel,
            "gamma": self.gamma,
            "at_step": self.at_step,
            "residual": self.solution.residual,
        }

    def warnings(self, count: int) -> list[str]:
        found = []
        residual, weights = self.solution.residual, self.solution.weights
        if residual > POOR_FIT:
            found.append(
                f"`sigma_rel={self.sigma_rel:g}` at step {self.at_step} is poorly represented by the "
                f"snapshots (residual {residual:.1%} of the profile): more snapshots, or a target "
                "nearer the snapshots' own sigma_rel, fit better"
            )
        spread = sum(abs(w) for w in weights)
        if spread > LARGE_WEIGHTS:
            found.append(
                f"`sigma_rel={self.sigma_rel:g}`: the weights range from {min(weights):.3g} to "
                f"{max(weights):.3g} (absolute sum {spread:.3g}), amplifying each snapshot's noise"
            )
        return found
