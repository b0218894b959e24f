"""The `--dry-run` report of an average of adapters: each adapter's weight and LoRA settings, the
layers, the output's rank (and for `svd`, the energy the worst layer keeps), what is written."""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING

from ..errors import plural
from ..schedules import effective_count
from ..units import format_bytes
from .config import ADAPTER_WEIGHTS

if TYPE_CHECKING:
    from .records import AdapterPlan

_MODES = {
    "concat": "exact: the factors stacked, rank r1+...+rN",
    "svd": "the exact average truncated by SVD",
    "merge": "the exact average merged into the base model",
}


def describe(plan: AdapterPlan) -> list[str]:
    """Human-readable lines, one each."""
    params = ", ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in plan.schedule.params().items()
    )
    lines = [
        f"{plan.schedule.method}{f' ({params})' if params else ''} of "
        f"{plural(len(plan.checkpoints), 'LoRA adapter')}, oldest first:"
    ]
    heaviest = max(plan.weights)
    steps = plan.steps or [None] * len(plan.checkpoints)
    for i, (ck, config, w, step) in enumerate(
        zip(plan.checkpoints, plan.configs, plan.weights, steps, strict=True), 1
    ):
        bar = "█" * max(1 if w > 0 else 0, round(20 * w / heaviest)) if heaviest > 0 else ""
        at = f"{step:>9}" if step is not None else f"{'?':>9}"
        lines.append(f"  {i:>3}  {w:8.4f}  {bar:<20} {at}  {ck.label}  ({config.summary})")
    lines.extend(f"selected:   {note}" for note in plan.selected)
    lines.append(f"effective:  {effective_count(plan.weights):.2f} adapters (1 / sum of squared weights)")
    lines.append(f"lora:       {plan.mode} ({_MODES[plan.mode]})")
    embeddings = sum(layer.parts[0][1].embedding for layer in plan.layers)
    kinds = f" ({embeddings} of them embeddings)" if embeddings else ""
    others = f", {plural(len(plan.others), 'other tensor')} averaged as stored" if plan.others else ""
    lines.append(f"layers:     {plural(len(plan.layers), 'LoRA layer')}{kinds}{others}")
    if plan.mode != "merge":
        lines.append(f"rank:       {_ranks(plan)}")
    if plan.mode == "svd" and plan.layers:
        worst = min(plan.layers, key=lambda layer: layer.kept)
        lines.append(
            f"energy:     worst layer keeps {100 * worst.kept:.2f}% of its update's energy ({worst.module}); "
            "every layer's share goes into the output's metadata"
        )
    lines.extend(_writes(plan))
    return lines


def _ranks(plan: AdapterPlan) -> str:
    counts = Counter(layer.rank for layer in plan.layers)
    shown = ", ".join(f"{rank} ({plural(n, 'layer')})" for rank, n in sorted(counts.items()))
    return f"{shown}; scale 1 (each adapter's weight and lora_alpha/r folded into B)"


def _writes(plan: AdapterPlan) -> list[str]:
    if plan.output is None:
        return []
    if plan.layout is not None:
        layout = plan.layout
        names = ", ".join(f.name for f in layout.files[:3]) + (", ..." if len(layout.files) > 3 else "")
        where = f"{layout.output}{os.sep} ({names}: " if layout.folder else f"{layout.output} ("
        lines = [
            f"writes:     {where}{format_bytes(plan.output_nbytes)}) from {plan.base.label}, "
            f"{plural(len(plan.layers), 'weight')} changed"
        ]
    else:
        lines = [
            f"writes:     {plan.output}{os.sep} ({ADAPTER_WEIGHTS}: {format_bytes(plan.output_nbytes)}, "
            "adapter_config.json)"
        ]
    extra = plan.layout.extra_files if plan.layout is not None else plan.extra_files
    if extra:
        lines.append(f"copies:     {', '.join(p.name for p in extra)} from {extra[0].parent}")
    return lines
