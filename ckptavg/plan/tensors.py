"""What the plan says of each output tensor, and of each output file."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from ..formats.safetensors_header import Entry


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: averaged over every checkpoint, or copied from the last.

    A tensor tied to another in every input (`same_as`) is not computed again:
    the other's result is written under its name too.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    averaged: bool
    same_as: str | None = None

    @property
    def entry(self) -> Entry:
        return Entry(self.name, self.dtype, self.shape)

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class OutputFile:
    """One file of the output: a single `.safetensors`, or one shard of a folder."""

    name: str
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)
