"""The plan's adapters read into updates: a layer's factors stacked with their weights and scalings
folded in, and the other tensors averaged as they are (both exact; adapters are small, so each
layer is read whole)."""

from __future__ import annotations

import torch

from ..formats import dtypes
from .factors import Factors, stacked
from .records import AdapterLayer, AdapterPlan


def stacked_layer(plan: AdapterPlan, layer: AdapterLayer) -> Factors:
    """`B = [c₁B₁ | … | c_N B_N]`, `A = [A₁; …; A_N]` with cᵢ = wᵢ·sᵢ: `B·A` is the layer's average."""
    parts = []
    for index, names in layer.parts:
        checkpoint = plan.checkpoints[index]
        coefficient = plan.weights[index] * plan.configs[index].scaling(layer.module)
        parts.append((coefficient, Factors(checkpoint.get(names.a), checkpoint.get(names.b))))
    return stacked(parts)


def averaged_other(plan: AdapterPlan, name: str) -> torch.Tensor:
    """`Σ wᵢ·xᵢ` of a tensor every adapter holds (in float64), or the last one's if it is not floating."""
    if not plan.checkpoints[0].tensors[name].is_floating:
        return plan.checkpoints[-1].get(name)
    total = None
    for weight, checkpoint in zip(plan.weights, plan.checkpoints, strict=True):
        term = weight * checkpoint.get(name).to(torch.float64)
        total = term if total is None else total + term
    return total


def cast(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """`tensor` in a safetensors dtype, contiguous, for the writer."""
    return tensor.to(dtypes.torch_dtype(dtype)).contiguous()
