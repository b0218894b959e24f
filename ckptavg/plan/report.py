"""The `--dry-run` report: the weight of every checkpoint, sizes, layout and memory, one line each."""

from __future__ import annotations

import os
from collections.abc import Iterable
from itertools import pairwise
from typing import TYPE_CHECKING

from ..errors import plural
from ..formats.name_filter import describe_rules
from ..memory import CHUNK_ELEMENTS
from ..schedules import effective_count, implied_sigma_rel
from ..units import format_bytes

if TYPE_CHECKING:
    from .plan import Plan

_STEP_SOURCE_KINDS = {
    "name": "file names",
    "stored": "values stored in the checkpoints",
    "`steps`": "`steps`",
}


def describe(plan: Plan) -> list[str]:
    """Human-readable lines: the weight of every checkpoint, sizes, layout and memory."""
    lines = [*_weights(plan), *_decay(plan), *(f"selected:   {note}" for note in plan.selected), _steps(plan)]
    lines.append(
        f"effective:  {effective_count(plan.weights):.2f} checkpoints (1 / sum of squared weights)"
        + _implied_sigma_rel(plan)
    )
    lines.append(f"tensors:    {len(plan.tensors)} ({_kinds(plan)})")
    filtered = [ck.filtered for ck in plan.checkpoints if ck.filtered is not None]
    lines.extend(f"names:      {line}" for line in describe_rules(filtered))
    lines.extend(
        f"tied:       '{t.name}' = '{t.same_as}' (averaged once, written under both)"
        for t in plan.tensors
        if t.same_as is not None
    )
    numel = sum(info.numel for info in plan.checkpoints[0].tensors.values())
    lines.append(f"parameters: {numel:,}")
    lines.append(
        f"input:      {format_bytes(sum(ck.nbytes for ck in plan.checkpoints))} in "
        f"{plural(len(plan.checkpoints), 'checkpoint')}, {format_bytes(plan.bytes_to_read)} to read"
    )
    lines.append(
        f"output:     {format_bytes(plan.output_nbytes)}, {count_dtypes(t.dtype for t in plan.tensors)}"
    )
    lines.extend(_writes(plan))
    lines.append(
        f"memory:     ~{format_bytes(plan.working_bytes)} of buffers "
        f"(chunks of {CHUNK_ELEMENTS // 2**20}M elements, whatever the model size)"
    )
    return lines


def _weights(plan: Plan) -> list[str]:
    params = ", ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in plan.schedule.params().items()
    )
    lines = [
        f"{plan.schedule.method}{f' ({params})' if params else ''} over "
        f"{plural(len(plan.checkpoints), 'checkpoint')}, oldest first:"
    ]
    heaviest = max(plan.weights)
    steps = plan.steps or [None] * len(plan.checkpoints)
    for i, (ck, w, step) in enumerate(zip(plan.checkpoints, plan.weights, steps, strict=True), 1):
        bar = "█" * max(1 if w > 0 else 0, round(20 * w / heaviest)) if heaviest > 0 else ""
        notes = f"  ({'; '.join(ck.notes)})" if ck.notes else ""
        at = f"{step:>9}" if step is not None else f"{'?':>9}"
        lines.append(f"  {i:>3}  {w:8.4f}  {bar:<20} {at}  {ck.label}{notes}")
    return lines


def _decay(plan: Plan) -> list[str]:
    """What an `anneal` merge stands for: the learning-rate multiplier each interval's updates get."""
    multipliers = getattr(plan.schedule, "multipliers", None)
    if multipliers is None or len(plan.checkpoints) < 2:
        return []
    lines = ["decay:      the learning rate (a fraction of the constant one) each interval stands for:"]
    for (a, b), m in zip(pairwise(plan.steps), multipliers(plan.steps), strict=True):
        lines.append(f"  {a:>9} – {b - 1:<9}  {m:6.4f}  {'█' * round(20 * m)}".rstrip())
    return lines


def _steps(plan: Plan) -> str:
    known = [source for source in plan.step_sources if source != "unknown"]
    if not known:
        return "steps:      unknown (name files like step_1000, or give `steps`) — the column shows ?"
    kinds = sorted({_STEP_SOURCE_KINDS.get(source.split(" ")[0], source) for source in known})
    unknown = len(plan.step_sources) - len(known)
    return f"steps:      from {' and '.join(kinds)}" + (f"; {unknown} unknown" if unknown else "")


def _implied_sigma_rel(plan: Plan) -> str:
    """The spread of the weights over the inputs' steps; not for post-hoc EMA, whose inputs are
    EMA snapshots, each already spread over training (its plan states the sigma_rel it solves for)."""
    if not plan.steps or any(s is None for s in plan.steps) or max(plan.steps) <= 0:
        return ""
    if plan.schedule.method == "phema":
        return ""
    return f"; implied sigma_rel {implied_sigma_rel(plan.weights, plan.steps):.3f}"


def _kinds(plan: Plan) -> str:
    if len(plan.checkpoints) == 1:
        return "all copied: there is one checkpoint"
    averaged = [t for t in plan.tensors if t.averaged]
    copied = len(plan.tensors) - len(averaged)
    used = list(plan.accumulators.values())
    wide, plain = used.count("F64"), used.count("F32")
    parts = [f"{wide} in float64, correctly rounded"] if wide else []
    if plain:
        parts.append(
            f"{plain} in float32, to a few units in the last place (`accum_dtype=float64` rounds correctly)"
        )
    kinds = f"{len(averaged)} averaged: {', '.join(parts)}" if averaged else "0 averaged"
    return kinds + (f", {copied} integer/bool copied from the last checkpoint" if copied else "")


def _writes(plan: Plan) -> list[str]:
    if plan.output is None:
        return []
    remote = plan.layout.remote
    if plan.folder:
        what = ", ".join(f.name for f in plan.files[:3]) + (", ..." if len(plan.files) > 3 else "")
        index = f" + {plan.layout.index_name}" if len(plan.files) > 1 else ""
        where = remote.shown if remote is not None else f"{plan.output}{os.sep}"
        lines = [f"writes:     {where} ({plural(len(plan.files), 'file')}: {what}{index})"]
    elif plan.layout.like_last is not None:
        lines = plan.layout.like_last.describe(plan.output)
    elif plan.torch_output:
        wrapped = f"{{'{plan.wrap_key}': state_dict}}" if plan.wrap_key else "a plain state dict"
        lines = [f"writes:     {plan.output} (torch.save of {wrapped})"]
    else:
        lines = [f"writes:     {remote.shown if remote is not None else plan.output}"]
    if plan.extra_files:
        names = ", ".join(p.name for p in plan.extra_files)
        last = plan.checkpoints[-1]  # a remote one's are fetched copies: name where they come from
        source = plan.extra_files[0].parent if last.path is not None else last.label.rsplit("/", 1)[0]
        lines.append(f"copies:     {names} from {source}")
    if plan.kept:
        lines.append(f"keeps:      {', '.join(plan.kept)} (not written by ckptavg) in {plan.output}")
    if plan.layout.stale:
        lines.append(f"removes:    {', '.join(plan.layout.stale)} (of the output it replaces)")
    return lines


def count_dtypes(names: Iterable[str]) -> str:
    """`14 F32, 2 I64`: how many tensors of each dtype, in the order first seen."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} {d}" for d, n in counts.items())
