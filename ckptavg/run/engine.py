"""The weighted sum, tensor by tensor and chunk by chunk: `out = sum(w_i * x_i)`.

Inputs are zero-copy views of memory-mapped files. A large tensor is processed
in fixed-size flat chunks (the sum is elementwise), so working memory is a few
preallocated buffers whatever the model size: fp32 (or fp64) accumulators, a
scratch buffer to cast other dtypes into (a mixed-dtype `add_` is much slower
than `copy_` then a same-dtype `add_`), and output buffers for the final cast.
Finished chunks are handed out with a `release` callback, so a writer thread
can write one while the next is computed. The engine never writes into a source.

On a GPU the host stays one chunk ahead: inputs go through pinned buffers and
cross to the device on a side stream while the previous chunk is summed, the
accumulators stay on the device, and results come back asynchronously into
pinned buffers. A chunk is handed out once its copy back has finished.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import CkptavgError, NonFiniteError
from ..formats import dtypes
from ..memory import BUFFERS_IN_FLIGHT, CHUNK_ELEMENTS
from ..plan.plan import Plan
from ..plan.spans import Span
from .pipeline import BufferPool

Release = Callable[[], None] | None
Chunk = tuple[int, torch.Tensor, Release]  # (byte offset in the tensor, values, release)


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; `cuda:N` picks a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise CkptavgError(f"`device={device}`: not a device name; use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CkptavgError(f"`device={device}`: no CUDA device is available here; use `device=cpu`")
    if resolved.type not in ("cpu", "cuda"):
        raise CkptavgError(f"`device={device}`: only cpu and cuda are supported")
    return resolved


@contextmanager
def beside_a_writer_thread() -> Iterator[None]:
    """Sum with one torch thread fewer while a writer thread copies results into files.

    Alone, the sums run fastest on every core; beside them the writer's copies
    into the page cache and the kernel's writeback, starved of CPU, fall behind,
    and the whole run takes longer (measured in `benchmarks/`).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tensor_pool(
    elements: int, dtype: torch.dtype, device: torch.device, limit: int, pinned: bool = False
) -> BufferPool[torch.Tensor]:
    return BufferPool(lambda: torch.empty(elements, dtype=dtype, device=device, pin_memory=pinned), limit)


class _HostToDevice:
    """Moves CPU chunks to the GPU through a ring of pinned buffers, on a side stream.

    Copying from pageable memory makes the host wait for each transfer. Here the
    host only copies the chunk into a pinned buffer (its read from the page
    cache) and queues the transfer; the compute stream waits for it on the GPU.
    A pinned buffer is refilled only after its previous transfer has finished.
    """

    SLOTS = 4

    def __init__(self, elements: int, device: torch.device):
        self._elements = elements
        self._device = device
        self._stream = torch.cuda.Stream(device)
        self._rings: dict[torch.dtype, collections.deque] = {}

    def __call__(self, piece: torch.Tensor) -> torch.Tensor:
        """`piece` on the device, ready for work queued next on the current stream."""
        ring = self._rings.get(piece.dtype)
        if ring is None:
            ring = self._rings[piece.dtype] = collections.deque(
                (torch.empty(self._elements, dtype=piece.dtype, pin_memory=True), None)
                for _ in range(self.SLOTS)
            )
        pinned, previous_transfer = ring.popleft()
        if previous_transfer is not None:
            previous_transfer.synchronize()
        staged = pinned[: piece.numel()].copy_(piece)
        compute = torch.cuda.current_stream(self._device)
        with torch.cuda.stream(self._stream):
            on_device = torch.empty(piece.numel(), dtype=piece.dtype, device=self._device)
            on_device.copy_(staged, non_blocking=True)
            transfer = torch.cuda.Event()
            transfer.record(self._stream)
        ring.append((pinned, transfer))
        compute.wait_event(transfer)
        on_device.record_stream(compute)  # its memory is reused only after the sum has read it
        return on_device


@dataclass(frozen=True)
class _Dtypes:
    """How one averaged tensor is summed and written."""

    accumulator: torch.dtype
    output: torch.dtype
    may_overflow: bool  # the output dtype may not hold the average: check after the cast


@dataclass
class _SummedChunk:
    """One chunk's sums, one per plan, whose results may still be on their way back from a GPU."""

    start: int
    count: int
    accumulators: list[torch.Tensor]
    pool: BufferPool[torch.Tensor]  # where the accumulator buffers go back
    spare: list[torch.Tensor]  # accumulator buffers not handed to the writer: free once checked
    totals: torch.Tensor  # each accumulator's sum: NaN or Inf anywhere shows in it
    outputs: list[tuple[torch.Tensor, Release]]
    done: torch.cuda.Event | None  # recorded after the copies back; None on the CPU
    kinds: _Dtypes


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
        self.warnings: list[str] = []  # found while summing (values passed on with --nonfinite warn)
        self._chunk = max(1, min(CHUNK_ELEMENTS, max((t.numel for t in self.plan.tensors), default=1)))
        # per accumulator dtype (float64 tensors are summed in float64): accumulators, one cast scratch
        self._accumulators: dict[torch.dtype, BufferPool[torch.Tensor]] = {}
        self._scratch: dict[torch.dtype, BufferPool[torch.Tensor]] = {}
        self._extrapolates = any(w < 0 for plan in self.plans for w in plan.weights)
        self._outputs: dict[torch.dtype, BufferPool[torch.Tensor]] = {}
        on_gpu = device.type == "cuda"
        self._to_device = _HostToDevice(self._chunk, device) if on_gpu else None
        self._chunks_ahead = 1 if on_gpu else 0  # let the GPU finish a chunk while the host reads the next

    def stream(self, work: Iterable[Span]) -> Iterator[tuple[Span, list[Chunk]]]:
        """Each output tensor's values, one chunk per plan at a time, as contiguous CPU tensors.

        Each chunk comes with its byte offset in the tensor and a `release`
        callback (or None): call it once the bytes are written, to hand the
        buffer back. Chunks of a tensor come in order; on a GPU the next
        tensor's first chunk is under way before the last one is handed out,
        so the device does not idle at tensor boundaries.
        """
        in_flight: collections.deque[tuple[Span, list, _SummedChunk]] = collections.deque()
        for tensor in work:
            if not tensor.averaged:
                yield from ((tensor, parts) for parts in self._copy(tensor))
                continue
            sources = self._sources(tensor)
            dtypes_of = self._dtypes_of(tensor)
            for start in range(tensor.start, tensor.end, self._chunk):
                count = min(self._chunk, tensor.end - start)
                in_flight.append((tensor, sources, self._sum(sources, start, count, dtypes_of)))
                if len(in_flight) > self._chunks_ahead:
                    yield self._hand_out(*in_flight.popleft())
        while in_flight:
            yield self._hand_out(*in_flight.popleft())

    def _copy(self, span: Span) -> Iterator[list[Chunk]]:
        """A copied (not averaged) tensor's values from the last checkpoint, cast if its dtype changes."""
        tensor = span.tensors[0]
        source = _flat(self.plan.last, span)
        out_dtype = dtypes.torch_dtype(tensor.dtype)
        narrowing = self._may_overflow(self._stored_dtypes(span), out_dtype)
        for start in range(span.start, span.end, self._chunk):
            piece = source[start : min(start + self._chunk, span.end)]
            self._on_read(piece.numel() * piece.element_size())
            if piece.is_floating_point() and not _finite(piece):
                self._nonfinite(tensor, len(self.plan.checkpoints) - 1)
            offset = start * out_dtype.itemsize
            if piece.dtype == out_dtype:
                yield [(offset, piece, None)] * len(self.plans)
                continue
            parts = [(offset, *self._cast_out(piece, out_dtype)) for _ in self.plans]
            if narrowing and not _finite(parts[0][1]):
                self._beyond_range(tensor, out_dtype)
            yield parts

    def _sources(self, tensor: Span) -> list[tuple[int, torch.Tensor, list[float]]]:
        """(checkpoint index, flat input, its weight in each plan) for every checkpoint that counts."""
        weight_sets = [plan.weights for plan in self.plans]
        return [
            (index, _flat(ck, tensor), [weights[index] for weights in weight_sets])
            for index, ck in enumerate(self.plan.checkpoints)
            if any(weights[index] != 0.0 for weights in weight_sets)
        ]

    def _dtypes_of(self, tensor: Span) -> _Dtypes:
        """How an averaged tensor is summed and written (the plan's `accumulator`)."""
        stored = self._stored_dtypes(tensor)
        accum = dtypes.torch_dtype(self.plan.accumulator(tensor.name, tensor.dtype))
        out = dtypes.torch_dtype(tensor.dtype)
        return _Dtypes(accum, out, self._may_overflow(stored, out))

    def _stored_dtypes(self, tensor: Span) -> set[str]:
        return {ck.tensors[tensor.name].dtype for ck in self.plan.checkpoints}

    def _may_overflow(self, stored: set[str], out_dtype: torch.dtype) -> bool:
        """Whether casting a result stored as `stored` dtypes to `out_dtype` can overflow. A weighted
        average with weights >= 0 stays within its inputs' range, so only a narrower output dtype
        (or extrapolation) can."""
        if not out_dtype.is_floating_point:
            return False
        widest = max(_largest(dtypes.torch_dtype(name)) for name in stored)
        return self._extrapolates or _largest(out_dtype) < widest

    def _pools(self, accum: torch.dtype) -> tuple[BufferPool[torch.Tensor], BufferPool[torch.Tensor]]:
        if accum not in self._accumulators:
            limit = BUFFERS_IN_FLIGHT * len(self.plans)
            self._accumulators[accum] = _tensor_pool(self._chunk, accum, self.device, limit)
            self._scratch[accum] = _tensor_pool(self._chunk, accum, self.device, 1)
        return self._accumulators[accum], self._scratch[accum]

    def _sum(self, sources: list, start: int, count: int, kinds: _Dtypes) -> _SummedChunk:
        """Queue one chunk's weighted sums (one per plan) and their way back to the host."""
        out_dtype = kinds.output
        pool, scratch_pool = self._pools(kinds.accumulator)
        buffers = [pool.acquire() for _ in self.plans]
        accumulators = [buffer[:count] for buffer in buffers]
        started = [False] * len(self.plans)
        scratch = scratch_pool.acquire()
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
        scratch_pool.release(scratch)  # on a GPU, later work on the same stream runs after this chunk's
        totals = torch.stack([acc.sum() for acc in accumulators])
        outputs, spare = [], []
        for acc, buffer in zip(accumulators, buffers, strict=True):
            if out_dtype == acc.dtype and acc.device.type == "cpu":  # written as is; the writer gives it back
                outputs.append((acc, lambda buffer=buffer: pool.release(buffer)))
            else:
                outputs.append(self._cast_out(acc, out_dtype))
                spare.append(buffer)
        done = None
        if self._to_device is not None:
            totals = totals.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        return _SummedChunk(start, count, accumulators, pool, spare, totals, outputs, done, kinds)

    def _hand_out(self, tensor: Span, sources: list, chunk: _SummedChunk) -> tuple[Span, list[Chunk]]:
        """The chunk's results for the writer, once they are on the host and checked."""
        if chunk.done is not None:
            chunk.done.synchronize()
        for acc, total in zip(chunk.accumulators, chunk.totals.tolist(), strict=True):
            # A NaN or Inf in any input reaches the sum: one cheap check per chunk, riding along.
            if not _finite(acc, total):
                where = _nonfinite_at(acc)
                culprit = tensor.member_at(chunk.start + where)
                window = slice(chunk.start, chunk.start + chunk.count)
                bad = [index for index, source, _ in sources if not _finite(source[window])]
                self._nonfinite(culprit, bad[0] if bad else None)
        for values, _ in chunk.outputs if chunk.kinds.may_overflow else ():
            if not _finite(values):
                where = int(_nonfinite_at(values))
                culprit = tensor.member_at(chunk.start + where)
                self._beyond_range(culprit, chunk.kinds.output)
        for buffer in chunk.spare:
            chunk.pool.release(buffer)
        offset = chunk.start * dtypes.itemsize(tensor.dtype)
        return tensor, [(offset, values, release) for values, release in chunk.outputs]

    def _nonfinite(self, tensor, index: int | None) -> None:
        """Apply the plans' policy to a NaN or Inf in checkpoint `index`'s `tensor`."""
        if index is None:
            raise CkptavgError(
                f"tensor '{tensor.name}': its average overflows float32; try `accum_dtype=float64`"
            )
        checkpoint = self.plan.checkpoints[index]
        reason = f"tensor '{tensor.name}' holds NaN or Inf values"
        if self.plan.nonfinite == "warn":
            self._warn(f"{checkpoint.label}: {reason}; they reach the output (`nonfinite=warn`)")
            return
        raise NonFiniteError(
            f"{checkpoint.label}: {reason}; leave that checkpoint out, or pass `nonfinite=skip-checkpoint` "
            "(or warn)",
            index,
            reason,
        )

    def _warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)

    def _beyond_range(self, tensor: Span, dtype: torch.dtype) -> None:
        """Apply the policy to an average that the output dtype cannot hold (it would be Inf or NaN)."""
        name = str(dtype).removeprefix("torch.")
        reason = (
            f"tensor '{tensor.name}': its average is beyond the range of {name} (largest "
            f"{_largest(dtype):g}) and would be written as Inf or NaN"
        )
        if self.plan.nonfinite == "warn":
            self._warn(f"{reason} (`nonfinite=warn`)")
            return
        raise CkptavgError(f"{reason}; write a wider `dtype` (float32 or bfloat16)")

    def _to_accum(self, piece: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """The piece in the accumulator's dtype and device, through the scratch buffer if it must change."""
        if self._to_device is not None:
            piece = self._to_device(piece)
        if piece.dtype == scratch.dtype:
            return piece
        return scratch[: piece.numel()].copy_(piece)

    def _cast_out(self, values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, Release]:
        """`values` cast into a pooled CPU buffer of the output dtype (asynchronously from a GPU)."""
        pool = self._outputs.get(dtype)
        if pool is None:
            pool = self._outputs[dtype] = _tensor_pool(
                self._chunk,
                dtype,
                torch.device("cpu"),
                (BUFFERS_IN_FLIGHT + self._chunks_ahead) * len(self.plans),
                pinned=self._to_device is not None,
            )
        buffer = pool.acquire()
        on_gpu = values.device.type == "cuda"
        if values.dtype == torch.float64 and dtype.itemsize < 4:
            values = _to_odd_float32(values)  # torch narrows float64 through float32, rounding twice
        if on_gpu:
            values = values.to(dtype)  # cast on the device: fewer bytes to bring back
        return buffer[: values.numel()].copy_(values, non_blocking=on_gpu), lambda: pool.release(buffer)


def _to_odd_float32(values: torch.Tensor) -> torch.Tensor:
    """Float64 values rounded to float32 to odd: an inexact result takes the neighbour whose last bit
    is 1. Rounded again to any dtype at least 2 bits narrower (bfloat16, float16, float8), that is
    the correctly rounded value, where rounding to nearest twice can land on a tie and miss it."""
    narrow = values.to(torch.float32)
    widened = narrow.to(torch.float64)
    bits = narrow.view(torch.int32)
    inexact = (widened != values).logical_and_(bits.bitwise_and(1) == 0).logical_and_(torch.isfinite(narrow))
    # A bit pattern one up is one float32 further from zero, one down one nearer (sign and magnitude).
    away = values.abs() > widened.abs()
    bits.add_(torch.where(away, 1, -1).mul_(inexact))
    return narrow


def _flat(checkpoint, span: Span) -> torch.Tensor:
    """The input's values for a span of tensors, as one flat zero-copy view (of which the
    span's elements are read)."""
    return checkpoint.get_run(span.names, span.start, span.end)


def _checkable(values: torch.Tensor) -> torch.Tensor:
    """`values` in a dtype torch can sum and test: float8 has no `sum` or `isfinite`."""
    return values.float() if values.is_floating_point() and values.element_size() == 1 else values


def _nonfinite_at(values: torch.Tensor) -> int:
    """The first NaN or Inf of a flat tensor (one is known to be there)."""
    return int(torch.isfinite(_checkable(values)).logical_not().nonzero()[0])


def _largest(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def _finite(values: torch.Tensor, total: float | None = None) -> bool:
    """No NaN or Inf. A NaN or Inf reaches the sum (`total`, if already known), so one reduction
    decides; the exact test runs only when the sum is not finite (it may also overflow)."""
    values = _checkable(values)
    if total is None:
        total = values.sum().item()
    return math.isfinite(total) or bool(torch.isfinite(values).all())
