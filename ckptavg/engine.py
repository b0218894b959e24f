"""The weighted sum, tensor by tensor and chunk by chunk: `out = sum(w_i * x_i)`.

Inputs are zero-copy views of memory-mapped files. A large tensor is processed
in fixed-size flat chunks (the sum is elementwise), so working memory is a few
preallocated buffers whatever the model size: an fp32 (or fp64) accumulator,
a scratch buffer to cast other dtypes into (a mixed-dtype `add_` is ~3x slower
than `copy_` then a same-dtype `add_`), and an output buffer for the final cast.
The engine never writes into a source tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from . import dtypes
from .errors import CkptavgError
from .plan import CHUNK_ELEMENTS, Plan, TensorPlan


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; `cuda:N` picks a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise CkptavgError(f"--device {device}: not a device name; use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CkptavgError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise CkptavgError(f"--device {device}: only cpu and cuda are supported")
    return resolved


class Engine:
    """Computes the plan's output tensors one chunk at a time, reusing its buffers."""

    def __init__(self, plan: Plan, device: torch.device, on_read: Callable[[int], None] | None = None):
        self.plan = plan
        self.device = device
        self._on_read = on_read or (lambda nbytes: None)
        chunk = max(1, min(CHUNK_ELEMENTS, max((t.numel for t in plan.tensors), default=1)))
        accum = dtypes.torch_dtype(plan.accum_dtype)
        averaging = any(t.averaged for t in plan.tensors)
        self._acc = torch.empty(chunk if averaging else 0, dtype=accum, device=device)
        self._scratch = torch.empty(chunk if averaging else 0, dtype=accum, device=device)
        self._out: dict[torch.dtype, torch.Tensor] = {}
        self._chunk = chunk

    def chunks(self, tensor: TensorPlan) -> Iterator[torch.Tensor]:
        """The output tensor's bytes, in order, as contiguous CPU tensors valid until the next step."""
        if tensor.averaged:
            yield from self._average(tensor)
        else:
            yield from self._copy(tensor)

    def _copy(self, tensor: TensorPlan) -> Iterator[torch.Tensor]:
        source = self.plan.last.get(tensor.name).reshape(-1)
        out_dtype = dtypes.torch_dtype(tensor.dtype)
        for start in range(0, source.numel(), self._chunk):
            piece = source[start : start + self._chunk]
            self._on_read(piece.numel() * piece.element_size())
            if piece.dtype == out_dtype:
                yield piece
            else:
                yield self._out_buffer(out_dtype, piece.numel()).copy_(piece)

    def _average(self, tensor: TensorPlan) -> Iterator[torch.Tensor]:
        sources = [
            (ck.get(tensor.name).reshape(-1), weight)
            for ck, weight in zip(self.plan.checkpoints, self.plan.weights, strict=True)
            if weight != 0.0
        ]
        out_dtype = dtypes.torch_dtype(tensor.dtype)
        numel = tensor.numel
        for start in range(0, numel, self._chunk):
            count = min(self._chunk, numel - start)
            acc = self._acc[:count]
            for i, (source, weight) in enumerate(sources):
                piece = self._to_accum(source[start : start + count])
                if i == 0:
                    torch.mul(piece, weight, out=acc)
                else:
                    acc.add_(piece, alpha=weight)
                self._on_read(count * source.element_size())
            if out_dtype == acc.dtype and acc.device.type == "cpu":
                yield acc
            else:
                yield self._out_buffer(out_dtype, count).copy_(acc)

    def _to_accum(self, piece: torch.Tensor) -> torch.Tensor:
        """The piece in the accumulator's dtype and device, through the scratch buffer if it must change."""
        if piece.dtype == self._acc.dtype and self.device.type == "cpu":
            return piece
        return self._scratch[: piece.numel()].copy_(piece)

    def _out_buffer(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        buffer = self._out.get(dtype)
        if buffer is None:
            buffer = self._out[dtype] = torch.empty(self._chunk, dtype=dtype)
        return buffer[:count]
