"""The balanced split of a run among ranks: each rank sums a contiguous share of the work, by bytes
to read, so ranks finish together.

The work (the plan's spans, in write order) is laid end to end by the input bytes
each element costs; rank r takes the elements between r/N and (r+1)/N of that
total, cut inside a span where needed (the sums are elementwise: any cut gives the
same bytes). Consecutive shares make each rank write consecutive byte ranges of
the output files: whole files of a large folder output, one range of a single file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..formats import dtypes
from ..plan.plan import Plan
from ..plan.spans import Span
from ..units import format_bytes


@dataclass(frozen=True)
class Share:
    """One rank's work: parts of spans, with the bytes it reads and writes in each output file."""

    spans: tuple[Span, ...]
    reads: int
    writes: dict[int, int]  # output file (its index in the plan) -> data bytes this rank writes into it


def shares(plan: Plan, work: Sequence[Span], ranks: int) -> list[Share]:
    """Every rank's share of `work` (the plan's spans), balanced by bytes to read."""
    costs = [_read_per_element(plan, span) for span in work]
    total = sum(cost * span.numel for span, cost in zip(work, costs, strict=True))
    parts: list[list[Span]] = [[] for _ in range(ranks)]
    before = 0  # bytes of the work before this span
    for span, cost in zip(work, costs, strict=True):
        begin = 0
        while begin < span.numel:
            rank = min(ranks - 1, (before + begin * cost) * ranks // max(total, 1))
            boundary = -(-(rank + 1) * total // ranks)  # where the next rank's bytes start
            end = span.numel if rank == ranks - 1 else min(span.numel, -(-(boundary - before) // cost))
            parts[rank].append(span.part(begin, end))
            begin = end
        before += cost * span.numel
    return [_share(plan, spans) for spans in parts]


def _read_per_element(plan: Plan, span: Span) -> int:
    """Input bytes one element of the span costs: one from every checkpoint, or from the last."""
    sources = plan.checkpoints if span.averaged else [plan.last]
    return sum(dtypes.itemsize(ck.tensors[span.name].dtype) for ck in sources)


def _share(plan: Plan, spans: list[Span]) -> Share:
    file_of = {t.name: i for i, f in enumerate(plan.files) for t in f.tensors}
    writes: Counter[int] = Counter()
    reads = 0
    for span in spans:
        elements = span.end - span.start
        reads += elements * _read_per_element(plan, span)
        for name in plan.targets(span.tensors[0]):
            writes[file_of[name]] += elements * dtypes.itemsize(span.dtype)
    return Share(tuple(spans), reads, dict(writes))


def describe_shares(plan: Plan, found: Sequence[Share], hosts: Sequence[str]) -> list[str]:
    """The dry-run's lines under torchrun: what each rank reads and writes."""
    lines = [
        f"under torchrun: {len(found)} ranks, each reading its share of the inputs and writing it in place"
    ]
    for rank, (share, host) in enumerate(zip(found, hosts, strict=True)):
        files = ", ".join(f"{format_bytes(n)} of {plan.files[i].name}" for i, n in share.writes.items())
        files = files or "nothing"
        finish = "the archives' records and CRC-32s, .metadata" if plan.layout.dcp else "the headers"
        header = f", then {finish} and the commit" if rank == 0 else ""
        lines.append(f"  rank {rank} ({host}): reads {format_bytes(share.reads)}, writes {files}{header}")
    return lines
