"""The arithmetic of averaging LoRA updates `ΔW = Σ cᵢ·Bᵢ·Aᵢ` (cᵢ = weight × scaling), per layer.

Averaging `A` and `B` separately gives `(Σ wᵢBᵢ)(Σ wᵢAᵢ)`, which is not `Σ wᵢ·BᵢAᵢ`. Instead:
stacking the factors, `B = [c₁B₁ | … | c_N B_N]` and `A = [A₁; …; A_N]`, gives `B·A = ΔW` exactly;
its best rank-R approximation comes from QR decompositions of the stacked factors and the SVD of
their small `(Σrᵢ × Σrᵢ)` core, never from `ΔW` itself. Adapters are small, so a layer's factors
are held in memory and computed in float64; a merge into a large base weight forms `ΔW` a block
of rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..memory import CHUNK_ELEMENTS


@dataclass(frozen=True)
class Factors:
    """A layer's factors as peft stores them: `a` is `(r, ...)`, `b` is `(out, r, ...)`."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(r, in)` and `(out, r)`: the matrices whose product is the update."""
        return self.a.reshape(self.rank, -1), self.b.reshape(self.b.shape[0], self.rank)

    def shaped_like(self, a: torch.Tensor, b: torch.Tensor) -> Factors:
        """Flat factors of another rank, shaped as these are stored (a convolution's kernel dims)."""
        rank = a.shape[0]
        return Factors(
            a.reshape(rank, *self.a.shape[1:]), b.reshape(self.b.shape[0], rank, *self.b.shape[2:])
        )


def stacked(parts: Sequence[tuple[float, Factors]]) -> Factors:
    """One layer of rank Σ rᵢ whose `B·A` is `Σ cᵢ·Bᵢ·Aᵢ`, each coefficient folded into its `B`."""
    a = torch.cat([f.a.to(torch.float64) for _, f in parts], dim=0)
    b = torch.cat([c * f.b.to(torch.float64) for c, f in parts], dim=1)
    return Factors(a, b)


def truncated(factors: Factors, rank: int) -> tuple[Factors, float]:
    """The best rank-`rank` factors of `B·A` (Eckart-Young), split evenly between `B` and `A`,
    and the share of the update's energy (squared Frobenius norm) they keep (1 for a zero update)."""
    a, b = factors.flat()
    q_b, r_b = torch.linalg.qr(b.to(torch.float64))
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = min(rank, s.numel())
    energy = float((s**2).sum())
    kept = float((s[:keep] ** 2).sum()) / energy if energy > 0 else 1.0
    root = s[:keep].sqrt()
    new_b = (q_b @ u[:, :keep]) * root
    new_a = root[:, None] * (vh[:keep] @ q_a.T)
    return factors.shaped_like(new_a, new_b), kept


def delta_rows(factors: Factors, transposed: bool, start: int, stop: int) -> torch.Tensor:
    """Rows `start:stop` of the update as the base weight is laid out, flattened to 2-D: `B·A`, or its
    transpose for embeddings and `fan_in_fan_out` layers."""
    a, b = factors.flat()
    if transposed:
        return (b @ a[:, start:stop]).T
    return b[start:stop] @ a


def row_blocks(rows: int, row_elements: int) -> list[tuple[int, int]]:
    """`(start, stop)` blocks of rows of at most `CHUNK_ELEMENTS` elements each (one row at least)."""
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]
