"""The soup's loop (Wortsman et al. 2022, "Model soups", Recipe 1): every ingredient scored, then,
best first, each added to the soup if the soup's score does not get worse (ties keep it).

Each candidate is the running sum of the kept ingredients plus one more, divided by their
count: one read of one ingredient, summed in float64 into a second buffer, loaded into the
model and scored; kept, the buffers swap. The model and the two sums are in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import CkptavgError
from ..formats.readers import Checkpoint

# What a soup holds in memory besides the model: the running sum and the candidate's, in float64.
SUM_BYTES_PER_VALUE = 2 * 8


class EvalError(CkptavgError):
    """The `eval` callable failed or did not return a number."""


@dataclass(frozen=True)
class Row:
    """One line of the soup's table: an ingredient, its own score, the soup's with it, kept or not."""

    ingredient: str
    score: float
    soup_score: float | None
    kept: bool
    given: bool = False

    def record(self) -> dict:
        return {
            "ingredient": self.ingredient,
            "score": _json_number(self.score),
            "soup_score": _json_number(self.soup_score),
            "kept": self.kept,
            **({"score_given": True} if self.given else {}),
        }


def memory_bytes(model) -> tuple[int, int]:
    """(the model's bytes, the running sums' bytes) a soup of this model holds."""
    state = model.state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    sums = sum(t.numel() for t in state.values() if t.is_floating_point()) * SUM_BYTES_PER_VALUE
    return model_bytes, sums


def cook(
    checkpoints: Sequence[Checkpoint],
    model,
    evaluate: Callable,
    *,
    greedy: bool,
    mode: str,
    given: dict[int, float],
    before_eval: Callable[[], None] | None = None,
    on_row: Callable[[Row], None] | None = None,
    eval_name: str = "eval",
) -> tuple[list[int], list[Row]]:
    """The ingredients the soup keeps (indices, in input order) and its table, best first.

    `given` holds scores already measured; `before_eval` runs after each candidate is loaded (the
    BatchNorm pass). Uniform (`greedy=False`): every ingredient kept, the soup of all scored once.
    """
    import torch

    state = model.state_dict()
    floating = [name for name, t in state.items() if t.is_floating_point()]
    better = (lambda a, b: a >= b) if mode == "max" else (lambda a, b: a <= b)

    def score(sums: dict, count: int, integers_from: Checkpoint) -> float:
        with torch.no_grad():
            for name, tensor in state.items():
                if name in sums:
                    tensor.copy_(sums[name] / count)
                else:
                    tensor.copy_(integers_from.get(name))
        if before_eval is not None:
            before_eval()
        return _evaluated(evaluate, model, eval_name)

    def read(ck: Checkpoint, into: dict | None = None, base: dict | None = None) -> dict:
        into = {} if into is None else into
        for name in floating:
            value = ck.get(name).to(state[name].device, torch.float64)
            if base is None:
                into[name] = value
            else:
                torch.add(base[name], value, out=into[name])
        return into

    scores = dict(given)
    for i, ck in enumerate(checkpoints):
        if i not in scores:
            scores[i] = score(read(ck), 1, ck)
    order = sorted(range(len(checkpoints)), key=lambda i: _rank(scores[i], mode))
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    best = order[0]
    if not greedy:
        sums = read(checkpoints[best])
        for i in order[1:]:
            sums = read(checkpoints[i], sums, sums)
        soup_score = score(sums, len(order), checkpoints[best])
        for i in order:
            emit(Row(checkpoints[i].label, scores[i], soup_score, True, i in given))
        return sorted(order), rows
    if math.isnan(scores[best]):
        raise EvalError("every ingredient's `eval` score is NaN: there is no best ingredient to start from")
    kept = [best]
    sums = read(checkpoints[best])
    pending = {name: torch.empty_like(value) for name, value in sums.items()}
    soup_score = scores[best]
    emit(Row(checkpoints[best].label, scores[best], soup_score, True, best in given))
    for i in order[1:]:
        read(checkpoints[i], pending, sums)
        candidate = score(pending, len(kept) + 1, checkpoints[best])
        keep = better(candidate, soup_score)
        if keep:
            kept.append(i)
            sums, pending, soup_score = pending, sums, candidate
        emit(Row(checkpoints[i].label, scores[i], candidate, keep, i in given))
    return sorted(kept), rows


def _rank(score: float, mode: str) -> tuple[bool, float]:
    """Sort key, best first; NaN last."""
    if math.isnan(score):
        return (True, 0.0)
    return (False, -score if mode == "max" else score)


def _evaluated(evaluate: Callable, model, name: str) -> float:
    try:
        value = evaluate(model)
    except CkptavgError:
        raise
    except Exception as e:
        raise EvalError(f"`eval={name}` failed: {type(e).__name__}: {e}") from e
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise EvalError(f"`eval={name}` returned a {type(value).__name__}, not a number") from None
    return value


def _json_number(value: float | None):
    return None if value is None or math.isnan(value) else value
