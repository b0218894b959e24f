"""What the engine sums, in write order: spans of tensors stored back to back.

A span is one tensor, or averaged tensors stored back to back with one dtype
in every input and in the output: the engine sums a span as one flat tensor,
chunk by chunk, so a model's thousands of small tensors cost a few operations
instead of a few each (safetensors stores tensors by dtype, then name, so most
of a model is one span).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .tensors import TensorPlan

if TYPE_CHECKING:
    from .plan import Plan


@dataclass(frozen=True)
class Span:
    """Output tensors the engine computes as one flat run of elements (often a single tensor), or
    the elements `start` to `stop` of that run (a rank's part of it, under torchrun)."""

    tensors: tuple[TensorPlan, ...]
    start: int = 0
    stop: int | None = None

    @property
    def name(self) -> str:
        return self.tensors[0].name

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def dtype(self) -> str:
        return self.tensors[0].dtype

    @property
    def averaged(self) -> bool:
        return self.tensors[0].averaged

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def end(self) -> int:
        """Where the elements computed stop: the run's end, unless this is a part of it."""
        return self.numel if self.stop is None else self.stop

    def part(self, start: int, stop: int) -> Span:
        return Span(self.tensors, start, stop)

    def member_at(self, element: int) -> TensorPlan:
        """The tensor holding flat element `element` of the span."""
        for tensor in self.tensors:
            if element < tensor.numel:
                return tensor
            element -= tensor.numel
        return self.tensors[-1]


def spans(plan: Plan) -> list[Span]:
    """The plan's computed tensors (tied copies excluded) in write order, adjacent ones joined (never
    in a DCP output, where each tensor is an archive of its own)."""
    file_of = {t.name: i for i, f in enumerate(plan.files) for t in f.tensors}
    tied = {t.same_as for t in plan.tensors if t.same_as is not None}
    found: list[Span] = []
    current: list[TensorPlan] = []
    for tensor in plan.computed:
        joinable = tensor.averaged and tensor.name not in tied and not plan.layout.dcp
        if current and joinable and _adjacent(plan.checkpoints, current[-1], tensor, file_of):
            current.append(tensor)
            continue
        if current:
            found.append(Span(tuple(current)))
        current = [tensor] if joinable else []
        if not joinable:
            found.append(Span((tensor,)))
    if current:
        found.append(Span(tuple(current)))
    return found


def _adjacent(checkpoints: Sequence, previous: TensorPlan, tensor: TensorPlan, file_of: dict) -> bool:
    """Whether `tensor` follows `previous` directly, with the same dtype, in every input and output file."""
    if previous.dtype != tensor.dtype or file_of.get(previous.name) != file_of.get(tensor.name):
        return False
    for checkpoint in checkpoints:
        before, after = checkpoint.byte_range(previous.name), checkpoint.byte_range(tensor.name)
        if before is None or after is None or before[0] != after[0] or before[2] != after[1]:
            return False
        if checkpoint.tensors[previous.name].dtype != checkpoint.tensors[tensor.name].dtype:
            return False
    return True
