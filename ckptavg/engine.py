"""The weighted sum, tensor by tensor and chunk by chunk: `out = sum(w_i * x_i)`.

Inputs are zero-copy views of memory-mapped files. A large tensor is processed
in fixed-size flat chunks (the sum is elementwise), so working memory is a few
preallocated buffers whatever the model size: fp32 (or fp64) accumulators, a
scratch buffer to cast other dtypes into (a mixed-dtype `add_` is ~3x slower
than `copy_` then a same-dtype `add_`), and output buffers for the final cast.
Finished chunks are handed out with a `release` callback, so a writer thread
can write one while the next is computed. The engine never writes into a source.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable, Iterator, Sequence

import torch

from . import dtypes
from .errors import CkptavgError, NonFiniteError
from .plan import BUFFERS_IN_FLIGHT, CHUNK_ELEMENTS, Plan, Run, TensorPlan

Release = Callable[[], None] | None
Chunk = tuple[int, torch.Tensor, Release]  # (byte offset in the tensor, values, release)


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


class _BufferPool:
    """Up to `limit` equal buffers, made on first need; `acquire` waits for one to be released."""

    def __init__(self, elements: int, dtype: torch.dtype, device: torch.device, limit: int):
        self._make = lambda: torch.empty(elements, dtype=dtype, device=device)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._made = 0
        self._limit = limit

    def acquire(self) -> torch.Tensor:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._made < self._limit:
                self._made += 1
                return self._make()
            return self._free.get()

    def release(self, buffer: torch.Tensor) -> None:
        self._free.put(buffer)


class Engine:
    """Computes the output tensors of one or more plans chunk by chunk, reusing its buffers.

    Plans given together differ only in their weights (several `--sigma-rel`
    values, say): each input chunk is read and cast once and added into one
    accumulator per plan, so K outputs cost one pass over the inputs.
    """

    def __init__(
        self, plans: Plan | Sequence[Plan], device: torch.device, on_read: Callable[[int], None] | None = None
    ):
        self.plans = [plans] if isinstance(plans, Plan) else list(plans)
        self.plan = self.plans[0]  # checkpoints, tensors and policies are the same in every plan
        self.device = device
        self._on_read = on_read or (lambda nbytes: None)
        self._chunk = max(1, min(CHUNK_ELEMENTS, max((t.numel for t in self.plan.tensors), default=1)))
        accum = dtypes.torch_dtype(self.plan.accum_dtype)
        self._accumulators = _BufferPool(self._chunk, accum, device, BUFFERS_IN_FLIGHT * len(self.plans))
        self._scratch = _BufferPool(self._chunk, accum, device, 1)
        self._outputs: dict[torch.dtype, _BufferPool] = {}

    def chunks(self, tensor: TensorPlan) -> Iterator[list[Chunk]]:
        """The output tensor's values in order, one chunk per plan at a time, as contiguous CPU tensors.

        Each chunk comes with its byte offset in the tensor and a `release`
        callback (or None): call it once the bytes are written, to hand the
        buffer back.
        """
        if tensor.averaged:
            yield from self._average(tensor)
        else:
            yield from self._copy(tensor)

    def _copy(self, tensor: TensorPlan) -> Iterator[list[Chunk]]:
        source = self.plan.last.get(tensor.name).reshape(-1)
        out_dtype = dtypes.torch_dtype(tensor.dtype)
        for start in range(0, source.numel(), self._chunk):
            piece = source[start : start + self._chunk]
            self._on_read(piece.numel() * piece.element_size())
            if piece.is_floating_point() and not _finite(piece):
                self._nonfinite(tensor, len(self.plan.checkpoints) - 1)
            offset = start * out_dtype.itemsize
            if piece.dtype == out_dtype:
                yield [(offset, piece, None)] * len(self.plans)
            else:
                yield [(offset, *self._cast_out(piece, out_dtype)) for _ in self.plans]

    def _average(self, tensor: TensorPlan) -> Iterator[list[Chunk]]:
        weight_sets = [plan.weights for plan in self.plans]
        sources = [
            (index, _flat(ck, tensor), [weights[index] for weights in weight_sets])
            for index, ck in enumerate(self.plan.checkpoints)
            if any(weights[index] != 0.0 for weights in weight_sets)
        ]
        out_dtype = dtypes.torch_dtype(tensor.dtype)
        numel = tensor.numel
        for start in range(0, numel, self._chunk):
            count = min(self._chunk, numel - start)
            buffers = [self._accumulators.acquire() for _ in self.plans]
            accumulators = [buffer[:count] for buffer in buffers]
            started = [False] * len(self.plans)
            scratch = self._scratch.acquire()
            for _, source, weights in sources:
                piece = self._to_accum(source[start : start + count], scratch)
                for k, (acc, weight) in enumerate(zip(accumulators, weights, strict=True)):
                    if weight == 0.0:
                        continue
                    if started[k]:
                        acc.add_(piece, alpha=weight)
                    else:
                        torch.mul(piece, weight, out=acc)
                        started[k] = True
                self._on_read(count * source.element_size())
            self._scratch.release(scratch)
            chunks = []
            for acc, buffer in zip(accumulators, buffers, strict=True):
                # A NaN or Inf in any input reaches the sum: one cheap check per chunk, riding along.
                if not _finite(acc):
                    where = int(torch.isfinite(acc).logical_not().nonzero()[0]) if acc.numel() else 0
                    culprit = tensor.member_at(start + where) if isinstance(tensor, Run) else tensor
                    bad = [
                        index for index, source, _ in sources if not _finite(source[start : start + count])
                    ]
                    self._nonfinite(culprit, bad[0] if bad else None)
                offset = start * out_dtype.itemsize
                if out_dtype == acc.dtype and acc.device.type == "cpu":
                    chunks.append((offset, acc, lambda buffer=buffer: self._accumulators.release(buffer)))
                else:
                    chunks.append((offset, *self._cast_out(acc, out_dtype)))
                    self._accumulators.release(buffer)
            yield chunks

    def _nonfinite(self, tensor: TensorPlan, index: int | None) -> None:
        """Apply the plans' policy to a NaN or Inf in checkpoint `index`'s `tensor`."""
        if index is None:
            raise CkptavgError(
                f"tensor '{tensor.name}': its average overflows {self.plan.accum_dtype}; "
                "try --accum-dtype float64"
            )
        checkpoint = self.plan.checkpoints[index]
        reason = f"tensor '{tensor.name}' holds NaN or Inf values"
        if self.plan.nonfinite == "warn":
            warning = f"{checkpoint.label}: {reason}; they reach the output (--nonfinite warn)"
            for plan in self.plans:
                if warning not in plan.warnings:
                    plan.warnings.append(warning)
            return
        raise NonFiniteError(
            f"{checkpoint.label}: {reason}; leave that checkpoint out, or pass --nonfinite skip-checkpoint "
            "(or warn)",
            index,
            reason,
        )

    def _to_accum(self, piece: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """The piece in the accumulator's dtype and device, through the scratch buffer if it must change."""
        if piece.dtype == scratch.dtype and self.device.type == "cpu":
            return piece
        return scratch[: piece.numel()].copy_(piece)

    def _cast_out(self, values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, Release]:
        """`values` cast into a pooled CPU buffer of the output dtype."""
        pool = self._outputs.get(dtype)
        if pool is None:
            pool = self._outputs[dtype] = _BufferPool(
                self._chunk, dtype, torch.device("cpu"), BUFFERS_IN_FLIGHT * len(self.plans)
            )
        buffer = pool.acquire()
        return buffer[: values.numel()].copy_(values), lambda: pool.release(buffer)


def _flat(checkpoint, tensor: TensorPlan | Run) -> torch.Tensor:
    """The input's values for a tensor, or for a run of them, as one flat zero-copy view."""
    if isinstance(tensor, Run):
        return checkpoint.get_run(tensor.names)
    return checkpoint.get(tensor.name).reshape(-1)


def _finite(values: torch.Tensor) -> bool:
    """No NaN or Inf. A NaN or Inf reaches the sum, so one reduction decides; the exact test
    runs only when the sum is not finite (it may also overflow)."""
    return math.isfinite(values.sum().item()) or bool(torch.isfinite(values).all())
