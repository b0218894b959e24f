"""Which checkpoints to average: by step range, every K-th, the last K, or the best K by a metric.

Applied before the weights are computed, in this order: `--from-step/--to-step`,
`--every`, `--last` (the K latest by step: LAWA), `--best` (the K best by a scalar
stored in torch checkpoints, numeric safetensors metadata, or a `--metrics` file).
The plan says what was kept and why.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ScheduleError
from ..options import option
from .folders import natural_key
from .steps import resolve_steps

# Scalars training loops store next to the weights, tried when --metric is not given with --best.
METRIC_KEYS = ("metric", "best_metric", "best_acc1", "acc1", "accuracy", "val_loss", "loss")


@dataclass(frozen=True)
class Selection:
    """What to keep; None everywhere keeps every checkpoint."""

    last: int | None = option(
        None, group="Selection", metavar="K", help="Average only the K latest checkpoints by step (LAWA)."
    )
    every: int | None = option(
        None, group="Selection", metavar="K", help="Keep every K-th checkpoint, counted back from the last."
    )
    from_step: int | None = option(
        None, group="Selection", metavar="A", help="Keep checkpoints from step A on."
    )
    to_step: int | None = option(None, group="Selection", metavar="B", help="Keep checkpoints up to step B.")
    best: int | None = option(
        None, group="Selection", metavar="K", help="Keep the K best checkpoints by --metric."
    )
    metric: str | None = option(
        None,
        group="Selection",
        metavar="NAME",
        help="Scalar for --best, stored in torch checkpoints (metric, best_acc1, ...) or --metrics.",
    )
    mode: str = option(
        "max",
        group="Selection",
        choices=("max", "min"),
        show_default=True,
        help="Whether a larger or a smaller --metric is better.",
    )
    metrics: str | Path | None = option(
        None,
        group="Selection",
        metavar="FILE",
        help="JSON or CSV of metrics per checkpoint, with a 'step' or 'checkpoint' column.",
    )

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.last, self.every, self.from_step, self.to_step, self.best))


@dataclass(frozen=True)
class Chosen:
    """The checkpoints to average (indices, in order), their steps and where each came from, and
    one line per selection rule applied."""

    kept: list[int]
    steps: list[int | None]
    sources: list[str]
    notes: list[str]


def choose(checkpoints: Sequence, steps: Sequence[int] | None, selection: Selection | None) -> Chosen:
    """Each checkpoint's step (given, stored or from its name), then the selection's rules applied.

    Raises:
        ScheduleError: `steps` has the wrong length, or a rule cannot be applied or keeps nothing.
    """
    labels, scalars = [ck.label for ck in checkpoints], [ck.scalars for ck in checkpoints]
    found, sources = resolve_steps(labels, scalars, steps)
    if selection is None or not selection.active:
        return Chosen(list(range(len(checkpoints))), found, sources, [])
    kept, notes = select(labels, found, scalars, selection)
    return Chosen(kept, [found[i] for i in kept], [sources[i] for i in kept], notes)


def select(
    labels: Sequence[str], steps: Sequence[int | None], scalars: Sequence[dict], selection: Selection
) -> tuple[list[int], list[str]]:
    """Indices of the checkpoints to keep (in order) and one line per rule applied.

    Raises:
        ScheduleError: a rule needs steps or metrics that are not known, or keeps nothing.
    """
    kept = list(range(len(labels)))
    notes = []
    if selection.from_step is not None or selection.to_step is not None:
        _need_steps(steps, kept, labels, "`from_step`/`to_step`")
        low = selection.from_step if selection.from_step is not None else -1
        high = selection.to_step if selection.to_step is not None else float("inf")
        kept = [i for i in kept if low <= steps[i] <= high]
        notes.append(
            f"steps {selection.from_step or 0} to {selection.to_step or 'the last'}: {len(kept)} kept"
        )
    if selection.every is not None:
        _positive(selection.every, "`every`")
        kept = kept[::-1][:: selection.every][::-1]  # counted back from the latest, which always stays
        notes.append(f"every {selection.every}th checkpoint, counted back from the latest: {len(kept)} kept")
    if selection.last is not None:
        _positive(selection.last, "`last`")
        if all(steps[i] is not None for i in kept):
            kept = sorted(sorted(kept, key=lambda i: steps[i])[-selection.last :])
            notes.append(f"the last {selection.last} by step (LAWA)")
        else:
            kept = kept[-selection.last :]
            notes.append(f"the last {selection.last} in averaging order (steps unknown)")
    if selection.best is not None:
        _positive(selection.best, "`best`")
        metric, values = _metric_values(labels, steps, scalars, kept, selection)
        diverged = [i for i in kept if math.isnan(values[i])]  # NaN is never best
        if len(diverged) == len(kept):
            raise ScheduleError(f"`best`: every checkpoint's {metric} is NaN; there is nothing to rank")
        ranked = [i for i in kept if i not in diverged]
        best_first = sorted(ranked, key=lambda i: values[i], reverse=selection.mode == "max")
        kept = sorted(best_first[: selection.best])
        shown = ", ".join(f"{values[i]:g}" for i in kept)
        notes.append(f"the best {selection.best} by {metric} ({selection.mode}): {shown}")
        if diverged:
            notes.append(
                f"left out {len(diverged)} whose {metric} is NaN: " + ", ".join(labels[i] for i in diverged)
            )
    if not kept:
        raise ScheduleError("the selection keeps no checkpoint; loosen `from_step`/`to_step`")
    return kept, notes


def _metric_values(labels, steps, scalars, kept, selection: Selection) -> tuple[str, dict[int, float]]:
    sidecar = _read_metrics(Path(selection.metrics)) if selection.metrics is not None else None
    metric = selection.metric
    if metric is None:
        names = set(sidecar["columns"]) if sidecar else set.intersection(*(set(scalars[i]) for i in kept))
        metric = next((key for key in METRIC_KEYS if key in names), None)
        if metric is None:
            raise ScheduleError(
                "`best` needs a `metric`; none of the usual names "
                f"({', '.join(METRIC_KEYS)}) is stored with every checkpoint"
            )
    values = {}
    for i in kept:
        value = _lookup(sidecar, labels[i], steps[i], metric) if sidecar else scalars[i].get(metric)
        if value is None:
            where = "in " + str(selection.metrics) if sidecar else "with it"
            raise ScheduleError(
                f"{labels[i]}: no '{metric}' stored {where}; `best` needs it for every checkpoint"
            )
        values[i] = value
    return metric, values


def _read_metrics(path: Path) -> dict:
    """A sidecar of metrics: CSV with a `step` or `checkpoint` column, or JSON rows / a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read the metrics file ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: the metrics file is not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        if path.suffix == ".json":
            content = json.loads(text)
            if isinstance(content, dict):
                content = [
                    {"checkpoint": key, **(value if isinstance(value, dict) else {"metric": value})}
                    for key, value in content.items()
                ]
            rows = content if isinstance(content, list) else None
        else:
            rows = list(csv.DictReader(text.splitlines()))
    except (ValueError, csv.Error) as e:
        raise InputError(f"{path}: not a readable metrics file ({e})") from e
    except RecursionError:
        raise InputError(f"{path}: not a readable metrics file (nested too deeply)") from None
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise InputError(f"{path}: expected rows with a 'step' or 'checkpoint' column and metric columns")
    columns = {key for row in rows for key in row} - {"step", "checkpoint"}
    return {"rows": rows, "columns": columns, "path": path}


def _lookup(sidecar: dict, label: str, step: int | None, metric: str) -> float | None:
    for row in sidecar["rows"]:
        by_step = step is not None and _int(row.get("step")) == step
        by_name = row.get("checkpoint") and (
            label == row["checkpoint"] or label.endswith("/" + str(row["checkpoint"]))
        )
        if (by_step or by_name) and row.get(metric) not in (None, ""):
            return _number(row[metric], sidecar["path"], metric, label)
    return None


def _number(value, path: Path, metric: str, label: str) -> float:
    """A metric from the file as a float; text that is not a number is the file's mistake, said so."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            pass
    raise InputError(f"{path}: '{metric}' of {label} is {json.dumps(value)[:40]}, not a number")


def _int(value) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _need_steps(steps, kept, labels, option: str) -> None:
    unknown = [labels[i] for i in kept if steps[i] is None]
    if unknown:
        unknown.sort(key=natural_key)
        raise ScheduleError(
            f"{option} needs the step of every checkpoint; unknown for {unknown[0]}"
            + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "")
            + "; give `steps`"
        )


def _positive(value: int, option: str) -> None:
    if value < 1:
        raise ScheduleError(f"{option} must be at least 1, got {value}")
