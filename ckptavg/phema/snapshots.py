"""Each EMA snapshot's step and profile, and which snapshots a target step uses.

The profile comes from `snapshot_sigma_rel` (one value per profile, each snapshot
assigned by its name: ema-pytorch's `{profile_index}.{step}.pt`, or a name holding
one of the values, as EDM2's `network-snapshot-{kimg}-{std}` does), else from the
snapshot's metadata (`sigma_rel` or `gamma`), else from an EDM2 name. The step comes
from `steps`, a number stored with the snapshot, its ema-pytorch or EDM2 name, or
any name ckptavg reads steps from (`step_1000`).

EDM2's own `.pkl` snapshots are pickled network objects: unpickling one runs code,
so they are refused, with how to convert them.
"""

from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import InputError, ScheduleError, name_list, plural
from ..formats.readers import Checkpoint
from ..inputs.steps import infer_step
from ..schedules import gamma_to_sigma_rel, sigma_rel_to_gamma
from .solve import Profile

_EMA_PYTORCH = re.compile(r"^(\d+)\.(\d+)$")  # PostHocEMA's {profile_index}.{step}
_EDM2 = re.compile(r"-(\d+)-(\d*\.\d+)$")  # network-snapshot-{kimg:07d}-{std:.3f}
_DECIMAL = re.compile(r"\d*\.\d+")
_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_CONVERT = (
    "convert each with EDM2's code: `data = pickle.load(open(path, 'rb'))` (run from the edm2 folder), "
    "then `torch.save(data['ema'].state_dict(), path[:-4] + '.pt')`, keeping the name so its step and "
    "sigma_rel are read from it"
)


@dataclass(frozen=True)
class Snapshot:
    """One snapshot: its checkpoint, profile (step, gamma), sigma_rel and where its step came from."""

    checkpoint: Checkpoint
    profile: Profile
    sigma_rel: float
    step_source: str


def refuse_pickles(specs: Sequence[str | os.PathLike]) -> None:
    """Refuse EDM2's `.pkl` snapshots (named, matched by a glob, or in a folder) before anything opens.

    Raises:
        InputError: one of them is a `.pkl` file.
    """
    for spec in map(os.fspath, specs):
        if spec.startswith("hf://"):
            candidates = [spec]
        elif glob.has_magic(spec):
            candidates = glob.glob(spec)
        elif os.path.isdir(spec):
            candidates = [str(p) for p in Path(spec).glob("*.pkl")]
        else:
            candidates = [spec]
        pickles = [c for c in candidates if c.endswith(".pkl")]
        if pickles:
            raise InputError(
                f"{pickles[0]}: an EDM2 snapshot is a pickled network object, and unpickling it would "
                f"run code from it, which ckptavg never does; {_CONVERT}"
            )


def read_snapshots(
    checkpoints: Sequence[Checkpoint],
    snapshot_sigma_rel: Sequence[float] | None = None,
    steps: Sequence[int] | None = None,
) -> list[Snapshot]:
    """Every checkpoint's step and profile.

    Raises:
        ScheduleError: a snapshot's step or profile is unknown, or `steps` has the wrong length.
    """
    if steps is not None and len(steps) != len(checkpoints):
        raise ScheduleError(
            f"`steps` has {len(steps)} values for {len(checkpoints)} snapshots; give one each"
        )
    if snapshot_sigma_rel is not None:
        for value in snapshot_sigma_rel:
            sigma_rel_to_gamma(value)
    found = []
    for i, ck in enumerate(checkpoints):
        step, source = (steps[i], "`steps`") if steps is not None else _step(ck)
        sigma_rel, gamma = _profile(ck, snapshot_sigma_rel)
        found.append(Snapshot(ck, Profile(step, gamma), sigma_rel, source))
    return found


def at_step(snapshots: Sequence[Snapshot], step: int | None) -> tuple[list[Snapshot], int, list[str]]:
    """The snapshots taken at or before the target step (the last snapshot's by default), ordered
    by step then profile; the target step; a line for the plan when some were left out.

    Raises:
        ScheduleError: no snapshot at or before the step.
    """
    last = max(s.profile.step for s in snapshots)
    target = last if step is None else step
    if target <= 0:
        raise ScheduleError(f"`at_step` must be a positive step, got {target}")
    kept = sorted(
        (s for s in snapshots if s.profile.step <= target), key=lambda s: (s.profile.step, s.sigma_rel)
    )
    if not kept:
        first = min(s.profile.step for s in snapshots)
        raise ScheduleError(f"no snapshot at or before `at_step={target}`: the first is at step {first}")
    notes = []
    if len(kept) < len(snapshots):
        notes.append(
            f"the {plural(len(kept), 'snapshot')} at or before step {target}; "
            f"{len(snapshots) - len(kept)} later left out"
        )
    return kept, target, notes


def _stem(ck: Checkpoint) -> str:
    name = PurePosixPath(ck.label.removeprefix("hf://")).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _step(ck: Checkpoint) -> tuple[int, str]:
    step, source = infer_step(ck.label, ck.scalars)
    if source.startswith("stored"):
        return step, source
    stem = _stem(ck)
    named = _EMA_PYTORCH.match(stem) or _EDM2.search(stem)
    if named:
        return int(named.group(2) if named.re is _EMA_PYTORCH else named.group(1)), f"name '{stem}'"
    if step is None:
        raise ScheduleError(
            f"{ck.label}: the snapshot's training step is unknown: give `steps`, store 'step' with it, "
            "or name it like ema-pytorch's {profile_index}.{step}.pt or step_1000"
        )
    return step, source


def _profile(ck: Checkpoint, given: Sequence[float] | None) -> tuple[float, float]:
    """(sigma_rel, gamma) of a snapshot."""
    stem = _stem(ck)
    if given is not None:
        indexed = _EMA_PYTORCH.match(stem)
        if indexed:
            index = int(indexed.group(1))
            if index >= len(given):
                raise ScheduleError(
                    f"{ck.label}: profile {index} of ema-pytorch's names, but `snapshot_sigma_rel` gives "
                    f"{plural(len(given), 'value')}; give one per profile, in PostHocEMA's order"
                )
            return given[index], sigma_rel_to_gamma(given[index])
        spelled = {v for v in given for n in _DECIMAL.findall(stem) if math.isclose(float(n), v)}
        if len(spelled) == 1:
            (value,) = spelled
            return value, sigma_rel_to_gamma(value)
        raise ScheduleError(
            f"{ck.label}: its name says which of `snapshot_sigma_rel` "
            f"({', '.join(f'{v:g}' for v in given)}) it follows {'twice' if spelled else 'nowhere'}; "
            "name snapshots {profile_index}.{step}.pt as ema-pytorch does, or put the value in the name"
        )
    if "sigma_rel" in ck.scalars:
        value = ck.scalars["sigma_rel"]
        return value, sigma_rel_to_gamma(value)
    if "gamma" in ck.scalars:
        gamma = ck.scalars["gamma"]
        if not gamma > -1:
            raise ScheduleError(f"{ck.label}: its stored gamma must be above -1, got {gamma}")
        return gamma_to_sigma_rel(gamma), gamma
    edm2 = _EDM2.search(stem)
    if edm2:
        value = float(edm2.group(2))
        return value, sigma_rel_to_gamma(value)
    raise ScheduleError(
        f"{ck.label}: the snapshot's EMA profile is unknown: give `snapshot_sigma_rel` (one value per "
        "profile), or store sigma_rel or gamma in its metadata"
    )


def unused_profiles(snapshots: Sequence[Snapshot], given: Sequence[float] | None) -> list[str]:
    """Values of `snapshot_sigma_rel` no snapshot follows (a typo, or a missing set of files)."""
    if given is None:
        return []
    used = {s.sigma_rel for s in snapshots}
    missing = [f"{v:g}" for v in given if v not in used]
    return [f"no snapshot follows `snapshot_sigma_rel` {name_list(missing)}"] if missing else []
