"""DeepSpeed checkpoints: the `global_stepN/` folders `engine.save_checkpoint` writes, read in place.

ZeRO-1/2 save the whole module in `mp_rank_00_model_states.pt` (its `module` dict, in the
training dtype); ZeRO-3 saves only placeholders there, and every stage keeps the fp32 master
weights in the optimizer files, one flat partition per data-parallel rank
(`zero_pp_rank_R_mp_rank_00_optim_states.pt`). The master weights are reassembled as DeepSpeed's
`zero_to_fp32.py` does (the same layout, paddings and checks), but lazily: each partition is mapped
through `torch_archive`, each parameter is a list of pieces of those maps, and the Adam moments
saved beside them are never read. Buffers come from rank 0's `module`, frozen parameters from the
model-states files, and shared parameters are the same tensor under both names, as there.

The pickles are read by torch's weights-only unpickler (see `torch_format`); the optimizer's also
name a few DeepSpeed classes, allowed here by name and read as plain data (`_allowed_globals`), so
DeepSpeed need not be installed and none of its code runs.

Folders with model (tensor) or pipeline parallelism, or MoE expert files, are refused by name.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from . import dtypes
from .dtypes import TensorInfo
from .files import CompanionFile, TorchFile, stamp_of
from .torch_format import read_torch_archive, scalar_entries, unaverageable

# What DeepSpeed calls its files: ZeRO-1/2 model states have no `zero_pp_rank_R_` prefix.
MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STEP_FOLDERS = "global_step*"  # a training run's checkpoints, next to its `latest` tag file
ZERO12_MODEL = "mp_rank_00_model_states.pt"


def is_deepspeed_folder(files: Iterable[str]) -> bool:
    """Whether a folder's file names are those of a DeepSpeed checkpoint (names only)."""
    return any(MODEL_STATES.match(name) for name in files)


def is_model_states(name: str) -> bool:
    return MODEL_STATES.match(name) is not None


def open_model_states(path: Path, key: str | None) -> TorchFile:
    """A DeepSpeed model-states file named directly: its `module` weights, unless they are ZeRO-3's
    placeholders (empty tensors where `param_shapes` says the parameter has values). ZeRO-1/2 files
    (no `zero_pp_rank_R_` prefix) hold the whole module.

    Raises:
        InputError: the weights are placeholders (naming the first), or as `TorchFile`.
    """
    import torch

    if key in (None, "module") and MODEL_STATES.match(path.name).group(1) is not None:
        content = _read(path).content
        module = content.get("module") if isinstance(content, Mapping) else None
        if isinstance(module, Mapping):
            for name, shape in _param_shapes(content).items():
                tensor = module.get(name)
                if isinstance(tensor, torch.Tensor) and tensor.numel() == 0 and math.prod(shape) > 0:
                    raise InputError(
                        f"{path}: a DeepSpeed ZeRO-3 model-states file, whose weights are empty "
                        f"placeholders (tensor '{name}' has no values, {list(shape)} in the model): "
                        "they are partitioned over the *_optim_states.pt files; give the folder "
                        f"{path.parent}, which ckptavg reassembles, or convert it with zero_to_fp32.py"
                    )
    return TorchFile(path, key)


def open_deepspeed_folder(folder: Path, key: str | None, master_weights: bool) -> list:
    """The `CheckpointFile`s of a DeepSpeed checkpoint folder: the one that holds every tensor
    first, then one per other file it reads (so that a change to any of them is noticed).

    ZeRO-1/2 give their `module` weights, or with `master_weights` the fp32 master weights;
    ZeRO-3 always gives the master weights (its module weights are placeholders).

    Raises:
        InputError: a layout ckptavg does not read (model or pipeline parallelism, MoE experts),
            a rank's file missing, or partitions that do not add up to the model's parameters.
    """
    names = sorted(os.listdir(folder))
    refuse_parallelism(folder, names)
    zero3 = ZERO12_MODEL not in names
    if not zero3 and not master_weights:
        file = TorchFile(folder / ZERO12_MODEL, key or "module")
        file.notes = [f"DeepSpeed ZeRO-1/2, key '{key or 'module'}' of {ZERO12_MODEL}", *file.notes[1:]]
        return [file]
    if key is not None:
        raise InputError(
            f"{folder}: `key={key}` picks a dict of a torch file, but the fp32 master weights of a DeepSpeed "
            "checkpoint are reassembled from its optimizer partitions; leave `key` out"
        )
    model_files = _by_rank(folder, names, MODEL_STATES, "model-states") if zero3 else [folder / ZERO12_MODEL]
    optim_files = _by_rank(folder, names, OPTIM_STATES, "*_optim_states.pt")
    weights = MasterWeights(folder, model_files, optim_files)
    return [weights, *(CompanionFile(path) for path in weights.also_read)]


class Pieces:
    """A tensor stored in pieces (DeepSpeed partitions), flat, as the engine reads it: `[a:b]`,
    `numel()`, `element_size()`, `dtype`.

    A slice within one piece is a view of the mapped file; a slice across pieces is assembled,
    and is never larger than the slice (the engine's chunk), so memory stays bounded whatever
    the tensor's size: a ZeRO-3 parameter is split over every rank, and assembling it whole
    would cost the whole tensor once per checkpoint being averaged.
    """

    def __init__(self, pieces: Sequence, dtype):
        self._pieces = list(pieces)  # flat tensors
        self._starts = list(_cumulative(piece.numel() for piece in self._pieces))
        self.dtype = dtype

    def numel(self) -> int:
        return self._starts[-1]

    def element_size(self) -> int:
        return self.dtype.itemsize

    def __getitem__(self, window: slice):
        import torch

        start, stop, _ = window.indices(self.numel())
        parts = [
            piece[max(start - begin, 0) : stop - begin]
            for piece, begin, end in zip(self._pieces, self._starts, self._starts[1:], strict=False)
            if begin < stop and end > start
        ]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, dtype=self.dtype)

    def whole(self, shape: Sequence[int]):
        """The tensor in its shape: a view if it lies in one piece, else assembled (a copy)."""
        return self[:].view(tuple(shape))


@dataclass(frozen=True)
class _Piece:
    """Elements [start, stop) of a flat tensor of a mapped archive (meta until read)."""

    archive: object
    tensor: object
    start: int
    stop: int

    def read(self):
        return self.archive.view(self.tensor).reshape(-1)[self.start : self.stop]


class MasterWeights:
    """A DeepSpeed checkpoint's fp32 master weights, buffers and frozen parameters, as
    `zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` finds them, each a list of pieces of
    the mapped files (see `Pieces`)."""

    metadata: dict[str, str] = {}  # noqa: RUF012 (never mutated)

    def __init__(self, folder: Path, model_files: Sequence[Path], optim_files: Sequence[Path]):
        self.path = model_files[0]
        self.stamp = stamp_of(self.path)
        self.also_read = [*model_files[1:], *optim_files]
        models = [_read(path) for path in model_files]
        optims = [_read(path) for path in optim_files]
        first = models[0].content
        state = _optimizer_state(optim_files[0], optims[0].content)
        stage, world = int(state["zero_stage"]), _world_size(state)
        if len(optim_files) != world or (stage == 3 and len(model_files) != world):
            kind = "*_optim_states.pt" if len(optim_files) != world else "model-states"
            found = len(optim_files) if len(optim_files) != world else len(model_files)
            raise InputError(
                f"{folder}: holds {found} {kind} files, but the checkpoint was saved by {world} ranks (a "
                "rank's file is missing, or files of two saves are mixed); save it again"
            )
        if stage not in (1, 2, 3):
            raise InputError(f"{optim_files[0]}: saved with ZeRO stage {stage}, which ckptavg does not read")
        self.tensors: dict[str, TensorInfo] = {}
        self._pieces: dict[str, list[_Piece]] = {}
        self._buffers(models[0], first)
        if stage == 3:
            self._zero3_frozen(models)
            self._zero3_trainable(folder, first, optims)
        else:
            self._zero12_frozen(models[0], first)
            self._zero12_trainable(folder, first, optims, state)
        self.tied = []
        for alias, source in dict(first.get("shared_params") or {}).items():
            if source in self._pieces and alias not in self._pieces:  # as zero_to_fp32: the same tensor
                self._pieces[alias] = self._pieces[source]
                self.tensors[alias] = self.tensors[source]
                self.tied.append([source, alias])
        order = {name: i for i, name in enumerate(first.get("module") or {})}
        self.tensors = dict(sorted(self.tensors.items(), key=lambda item: order.get(item[0], len(order))))
        self.scalars = scalar_entries(first)
        self.notes = [
            f"DeepSpeed ZeRO-{stage}, fp32 master weights from {world} optimizer partition"
            + ("s" if world > 1 else "")
        ]

    def get(self, name: str, info: TensorInfo):
        return self.get_flat(name, info).whole(info.shape)

    def get_flat(self, name: str, info: TensorInfo) -> Pieces:
        """The tensor flattened, in pieces: what the engine reads chunk by chunk."""
        pieces = self._pieces[name]
        return Pieces([piece.read() for piece in pieces], pieces[0].tensor.dtype)

    def _add(self, name: str, shape: Sequence[int], pieces: list[_Piece]) -> None:
        """Record a tensor: its first `numel` elements of `pieces` (the rest is padding)."""
        numel = math.prod(shape)
        kept, total = [], 0
        for piece in pieces:
            take = min(piece.stop - piece.start, numel - total)
            if take > 0:
                kept.append(_Piece(piece.archive, piece.tensor, piece.start, piece.start + take))
                total += take
        if total != numel:
            raise InputError(
                f"{self.path.parent}: tensor '{name}' needs {numel} values but its partitions hold {total}; "
                "the checkpoint is damaged or was saved by a DeepSpeed version ckptavg does not read"
            )
        source = pieces[0].tensor
        try:
            dtype = dtypes.safetensors_name(source.dtype)
        except KeyError:
            raise InputError(
                f"{self.path.parent}: tensor '{name}' has dtype {source.dtype}, which ckptavg cannot average"
            ) from None
        self.tensors[name] = TensorInfo(dtype, tuple(int(n) for n in shape))
        self._pieces[name] = kept or [_Piece(pieces[0].archive, source, 0, 0)]  # empty: no values at all

    def _buffers(self, archive, content: Mapping) -> None:
        module = _mapping(content, "module", self.path)
        for name in content.get("buffer_names") or ():
            tensor = module.get(name)
            if tensor is not None:
                _check(archive, tensor, self.path, name)
                self._add(name, tuple(tensor.shape), [_Piece(archive, tensor, 0, tensor.numel())])

    def _zero12_frozen(self, archive, content: Mapping) -> None:
        fragments = content.get("frozen_param_fragments") or {}
        for name, shape in dict(content.get("frozen_param_shapes") or {}).items():
            tensor = fragments.get(name)
            if tensor is None:
                raise InputError(f"{self.path}: frozen parameter '{name}' has no values saved")
            _check(archive, tensor, self.path, name)
            self._add(name, shape, [_Piece(archive, tensor, 0, tensor.numel())])

    def _zero3_frozen(self, models: Sequence) -> None:
        """Each rank saves its slice of a frozen parameter; joined in rank order, padding dropped."""
        first = models[0].content
        for name, shape in dict(first.get("frozen_param_shapes") or {}).items():
            pieces = []
            for model in models:
                tensor = (model.content.get("frozen_param_fragments") or {}).get(name)
                if tensor is None:
                    raise InputError(f"{model.path}: frozen parameter '{name}' has no values saved")
                _check(model, tensor, model.path, name)
                pieces.append(_Piece(model, tensor, 0, tensor.numel()))
            self._add(name, shape, pieces)

    def _zero12_trainable(self, folder: Path, content: Mapping, optims: Sequence, state: Mapping) -> None:
        """ZeRO-1/2: each parameter group is one flat vector cut into consecutive rank partitions;
        parameters follow each other in it (with the alignment paddings DeepSpeed records)."""
        groups = [self._groups(optim, "single_partition_of_fp32_groups") for optim in optims]
        shapes = _param_shape_groups(content, self.path)
        paddings = state.get("param_alignment_paddings")
        if len(shapes) != len(groups[0]) or (
            paddings is not None and [len(p) for p in paddings] != [len(group) for group in shapes]
        ):
            raise self._mismatch(folder, f"{len(shapes)} parameter groups", f"{len(groups[0])}")
        align = 2 * len(optims)
        for index, group_shapes in enumerate(shapes):
            partitions = [rank_groups[index] for rank_groups in groups]  # (archive, tensor), rank order
            bounds = list(_cumulative(tensor.numel() for _, tensor in partitions))
            offset = 0
            for position, (name, shape) in enumerate(group_shapes.items()):
                numel = math.prod(shape)
                pieces = [
                    _Piece(archive, tensor, max(offset - begin, 0), min(offset + numel, end) - begin)
                    for (archive, tensor), begin, end in zip(partitions, bounds, bounds[1:], strict=False)
                    if begin < offset + numel and end > offset
                ]
                self._add(name, shape, pieces or [_Piece(*partitions[0], 0, 0)])
                offset += numel + (paddings[index][position] if paddings is not None else 0)
            if align * math.ceil(offset / align) != align * math.ceil(bounds[-1] / align):
                raise self._mismatch(folder, f"{offset} values in group {index}", f"{bounds[-1]}")

    def _zero3_trainable(self, folder: Path, content: Mapping, optims: Sequence) -> None:
        """ZeRO-3: every parameter is split over all ranks, ceil(numel / ranks) values each, at the
        same offset of each rank's flat groups; the last rank's tail is padding."""
        groups = [self._groups(optim, "fp32_flat_groups") for optim in optims]
        sizes = [tensor.numel() for _, tensor in groups[0]]
        for rank, rank_groups in enumerate(groups[1:], 1):
            if [tensor.numel() for _, tensor in rank_groups] != sizes:
                raise InputError(
                    f"{optims[rank].path}: its partitions differ in size from rank 0's; the file is damaged"
                )
        bounds = list(_cumulative(sizes))
        offset = 0
        for group_shapes in _param_shape_groups(content, self.path):
            for name, shape in group_shapes.items():
                share = math.ceil(math.prod(shape) / len(optims))
                pieces = []
                for rank_groups in groups:
                    pieces += [
                        _Piece(archive, tensor, max(offset - begin, 0), min(offset + share, end) - begin)
                        for (archive, tensor), begin, end in zip(
                            rank_groups, bounds, bounds[1:], strict=False
                        )
                        if begin < offset + share and end > offset
                    ]
                self._add(name, shape, pieces or [_Piece(*groups[0][0], 0, 0)])
                offset += share
        if offset != bounds[-1]:
            raise self._mismatch(folder, f"{offset * len(optims)} values", f"{bounds[-1] * len(optims)}")

    def _groups(self, archive, key: str) -> list[tuple[object, object]]:
        """A rank's flat fp32 partitions (one per parameter group), checked to be plain 1-D tensors."""
        groups = _optimizer_state(archive.path, archive.content).get(key)
        if not isinstance(groups, (list, tuple)) or not groups:
            raise InputError(
                f"{archive.path}: has no '{key}' (the fp32 master weights) in its optimizer state"
            )
        for index, tensor in enumerate(groups):
            where = f"{key}[{index}]"
            if not hasattr(tensor, "untyped_storage") or tensor.dim() != 1 or not tensor.is_floating_point():
                raise InputError(
                    f"{archive.path}: '{where}' is not a flat tensor of floats; the file is damaged"
                )
            _check(archive, tensor, archive.path, where)
        return [(archive, tensor) for tensor in groups]

    def _mismatch(self, folder: Path, needed: str, held: str) -> InputError:
        return InputError(
            f"{folder}: the model's parameters need {needed} but the optimizer partitions hold {held}; "
            "the checkpoint is damaged or was saved by a DeepSpeed version ckptavg does not read"
        )


def _allowed_globals() -> list:
    """The DeepSpeed classes its optimizer pickles name, each read as the plain data it holds: the
    ZeRO stage (an int enum) as its int; a loss scaler's settings and a parameter's fragment address
    (numel, start) as a namespace of their fields. Neither can run code: an `int` of a number, a
    `SimpleNamespace` filled with the pickled fields."""
    return [
        (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),
        (types.SimpleNamespace, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
        (types.SimpleNamespace, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
        (types.SimpleNamespace, "deepspeed.utils.tensor_fragment.fragment_address"),
    ]


def _read(path: Path):
    """A DeepSpeed file as a checked torch archive (meta tensors; nothing read yet)."""
    import torch

    with torch.serialization.safe_globals(_allowed_globals()):
        return read_torch_archive(path)


def refuse_parallelism(folder: Path, names: Sequence[str]) -> None:
    for name in names:
        match = MODEL_STATES.match(name) or OPTIM_STATES.match(name)
        if match and match.group(2) != "00":
            raise InputError(
                f"{folder}: holds {name}, a checkpoint with model (tensor) parallelism; ckptavg reads one mp "
                "rank (mp_rank_00): merge the ranks first, e.g. with DeepSpeed's ds_to_universal.py"
            )
        if (name.endswith("_model_states.pt") and not match) or name.endswith("-model_states.pt"):
            raise InputError(
                f"{folder}: holds {name}, a pipeline-parallel layer or MoE expert file, which ckptavg does "
                "not read; convert the checkpoint with DeepSpeed's ds_to_universal.py or zero_to_fp32.py"
            )


def _by_rank(folder: Path, names: Sequence[str], pattern: re.Pattern, kind: str) -> list[Path]:
    """The folder's files of one kind in data-parallel rank order, checked to be ranks 0..N-1."""
    ranked = {int(m.group(1) or 0): name for name in names if (m := pattern.match(name))}
    if not ranked:
        raise InputError(f"{folder}: has no {kind} files; it is not a whole DeepSpeed checkpoint")
    missing = sorted(set(range(max(ranked) + 1)) - set(ranked))
    if missing:
        raise InputError(
            f"{folder}: has no {kind} file of rank {missing[0]}; copy or save the checkpoint again"
        )
    return [folder / ranked[rank] for rank in sorted(ranked)]


def _optimizer_state(path: Path, content: object) -> Mapping:
    state = content.get("optimizer_state_dict") if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping) or "zero_stage" not in state:
        raise InputError(
            f"{path}: not a DeepSpeed ZeRO optimizer state (no 'zero_stage'), so it holds no master weights"
        )
    return state


def _world_size(state: Mapping) -> int:
    """How many ranks saved it; ZeRO-1/2 record it per group (expert groups may differ): the largest."""
    count = state.get("partition_count")
    return max(count) if isinstance(count, (list, tuple)) else int(count)


def _param_shape_groups(content: Mapping, path: Path) -> list[dict]:
    shapes = content.get("param_shapes")
    if isinstance(shapes, Mapping):
        shapes = [shapes]
    if not isinstance(shapes, (list, tuple)) or not all(isinstance(group, Mapping) for group in shapes):
        raise InputError(f"{path}: has no 'param_shapes'; it is not a DeepSpeed model-states file")
    return [dict(group) for group in shapes]


def _param_shapes(content: Mapping) -> dict:
    with contextlib.suppress(InputError):
        return {
            name: shape for group in _param_shape_groups(content, Path()) for name, shape in group.items()
        }
    return {}


def _mapping(content: Mapping, key: str, path: Path) -> Mapping:
    value = content.get(key)
    if not isinstance(value, Mapping):
        raise InputError(f"{path}: has no '{key}' dict; it is not a DeepSpeed model-states file")
    return value


def _check(archive, tensor, path: Path, name: str) -> None:
    if not hasattr(tensor, "untyped_storage"):
        raise InputError(f"{path}: '{name}' is not a tensor; the file is damaged")
    refusal = unaverageable(tensor) or archive.problem(tensor)
    if refusal:
        raise InputError(f"{path}: tensor '{name}' {refusal}")


def _cumulative(counts: Iterable[int]) -> Iterable[int]:
    total = 0
    yield total
    for count in counts:
        total += count
        yield total
