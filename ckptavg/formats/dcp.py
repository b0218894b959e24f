"""torch.distributed.checkpoint (DCP) folders: a `.metadata` file and the `*.distcp` files it names.

The metadata (read by `dcp_metadata`, no code runs) gives every tensor's global shape and dtype
and the chunks it is stored as (FSDP saves one chunk per rank, each in that rank's file), and
where each chunk's bytes lie. Only the model's tensors are read (see `pick_model_tensors`): the optimizer's
state, the LR scheduler, the data loader and the train state saved beside them are never touched.

Both of DCP's serializations are read in place (`dcp_chunks`), from one private map per file:

- `torch_save` (the default): each chunk is a small `torch.save` archive; its zip directory is
  checked (records stored, inside the chunk's range), its pickle read by torch's weights-only
  unpickler onto meta storages, and the chunk's values are the bytes of its data record;
- `safetensors`: each file holds a safetensors file (after any non-tensor items), parsed as
  safetensors checks it; a chunk is its tensor's byte range.

A tensor is handed to the engine flattened, as `deepspeed.Pieces` of its chunks in order: a chunk
is a run of the flattened tensor when it spans whole trailing dimensions (FSDP's dim-0 shards, or
one chunk), so any two chunk layouts of the same tensor average exactly, one engine chunk at a time.
Chunks cut along later dimensions (tensor parallelism) are refused by name.

Chunks stored through DCP's extension transforms (zstd compression: `dcp_transforms`) cannot be
mapped: each is decoded, whole, when the engine first reads it, and dropped once the engine has
moved past it (`HeldChunks`: at most two chunks of one tensor per checkpoint, counted by the plan as
`decoded_bytes`). They are checked against the metadata then, not when the folder is opened.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import InputError, name_list, plural
from . import dtypes
from .dcp_chunks import DistcpFile, EncodedChunk, HeldChunks, MappedChunk, held_at_most
from .dcp_metadata import Chunk, DcpMetadata, Stored, TensorEntry, read_metadata
from .deepspeed import Pieces
from .dtypes import TensorInfo
from .files import CompanionFile, stamp_of

METADATA_NAME = ".metadata"
DISTCP_SUFFIX = ".distcp"
# The nested state dicts the model's weights are saved under, in the order they are looked for.
MODEL_KEYS = ("model", "module", "state_dict", "model_state_dict")


def is_dcp_folder(files: Iterable[str]) -> bool:
    """Whether a folder's file names are those of a DCP checkpoint (names only)."""
    return METADATA_NAME in files


def open_dcp_folder(folder: Path, key: str | None) -> list:
    """The `CheckpointFile`s of a DCP folder: the one that holds every tensor, then one per
    `.distcp` file it reads (so that a change to any of them is noticed).

    Raises:
        InputError: the metadata is unsafe or damaged, a chunk's file is missing or too short,
            a chunk disagrees with the metadata, or a layout ckptavg does not read.
    """
    checkpoint = DcpCheckpoint(folder, key)
    return [checkpoint, *(CompanionFile(path) for path in checkpoint.also_read)]


class DcpCheckpoint:
    """The model tensors of a DCP folder, each as the pieces of its chunks (see `Pieces`).

    Attributes:
        key: the nested state dict the tensors were taken from (`model`), or None: the top level.
        decoded_bytes: the most memory its chunks stored through transforms take while read
            (0 when every chunk is mapped).
    """

    metadata: dict[str, str] = {}  # noqa: RUF012 (never mutated)
    scalars: dict[str, float] = {}  # noqa: RUF012
    tied: tuple = ()

    def __init__(self, folder: Path, key: str | None):
        self.path = folder / METADATA_NAME
        self.stamp = stamp_of(self.path)
        meta = read_metadata(self.path)
        self.key, names, rule = pick_model_tensors(meta, key, folder)
        self._files: dict[str, DistcpFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._chunks: dict[str, list[tuple[int, MappedChunk | EncodedChunk]]] = {}
        self._held = HeldChunks()
        prefix = f"{self.key}." if self.key else ""
        try:
            for name in names:
                self._add(name, prefix + name, meta.tensors[prefix + name], meta)
        finally:
            for file in self._files.values():
                file.close_handle()
        self.also_read = [file.path for file in self._files.values()]
        kinds = sorted({file.serialization for file in self._files.values()})
        left = left_out(meta, set(prefix + name for name in names))
        encoded = [
            span for chunks in self._chunks.values() for _, span in chunks if isinstance(span, EncodedChunk)
        ]
        self.decoded_bytes = held_at_most(encoded)
        self.notes = [
            f"DCP ({', '.join(kinds) or 'no data'} serialization, {len(self._files)} "
            f"file{'s' if len(self._files) != 1 else ''}), {rule}",
            *([f"left out: {left}"] if left else []),
            *_chunk_notes(meta, prefix, names),
            *(
                [
                    f"{plural(len(encoded), 'chunk')} stored through "
                    f"{name_list(sorted({t for span in encoded for t in span.transforms}))}: "
                    "decoded one at a time as the engine reads them"
                ]
                if encoded
                else []
            ),
        ]

    def get(self, name: str, info: TensorInfo):
        return self.get_flat(name, info).whole(info.shape)

    def get_flat(self, name: str, info: TensorInfo) -> Pieces:
        """The tensor flattened, in chunks: what the engine reads one engine chunk at a time."""
        return Pieces([span for _, span in self._chunks[name]], dtypes.torch_dtype(info.dtype))

    def _add(self, name: str, fqn: str, entry: TensorEntry, meta: DcpMetadata) -> None:
        info = entry_info(entry, fqn, str(self.path.parent))
        chunks = []
        for chunk in entry.chunks:
            start = _flat_start(self.path, fqn, entry, chunk)
            stored = meta.storage.get((fqn, chunk.offsets))
            if stored is None:
                raise InputError(
                    f"{self.path}: tensor '{fqn}' has no file recorded for its chunk at "
                    f"{list(chunk.offsets)}; the metadata is damaged"
                )
            chunks.append((start, self._file(fqn, stored).span(fqn, entry, chunk, stored, self._held)))
        chunks.sort(key=lambda item: item[0])
        end = 0
        for start, span in chunks:
            if start != end:
                raise InputError(
                    f"{self.path}: the chunks of tensor '{fqn}' "
                    + ("overlap" if start < end else f"leave elements {end} to {start} unsaved")
                    + "; the metadata is damaged"
                )
            end += span.numel()
        if end != math.prod(entry.size):
            raise InputError(
                f"{self.path}: the chunks of tensor '{fqn}' hold {end} of its "
                f"{math.prod(entry.size)} values; the metadata is damaged"
            )
        self.tensors[name] = info
        self._chunks[name] = chunks

    def _file(self, fqn: str, stored: Stored) -> DistcpFile:
        if stored.file not in self._files:
            if Path(stored.file).name != stored.file or stored.file in (".", ".."):
                raise InputError(
                    f"{self.path}: tensor '{fqn}' is stored in '{stored.file}', not a file of the "
                    "checkpoint's folder; ckptavg reads only files beside the metadata"
                )
            self._files[stored.file] = DistcpFile(self.path.parent / stored.file, fqn)
        return self._files[stored.file]


def entry_info(entry: TensorEntry, fqn: str, folder: str) -> TensorInfo:
    """A tensor's dtype and shape as the folder's `.metadata` records them, once they are seen to be
    a dtype ckptavg averages and a shape that can be addressed.

    Raises:
        InputError: naming the folder and the tensor.
    """
    try:
        dtype = dtypes.safetensors_name(entry.dtype)
    except KeyError:
        raise InputError(
            f"{folder}: tensor '{fqn}' has dtype {entry.dtype}, which ckptavg cannot average"
        ) from None
    if not dtypes.addressable(dtype, entry.size):
        raise InputError(
            f"{folder}/{METADATA_NAME}: tensor '{fqn}' has shape {list(entry.size)}; the metadata is damaged"
        )
    return TensorInfo(dtype, entry.size)


def _flat_start(path: Path, fqn: str, entry: TensorEntry, chunk: Chunk) -> int:
    """Where a chunk starts in the flattened tensor, once it is seen to be one run of it: whole
    trailing dimensions after one cut dimension (and single rows before it)."""
    if any(o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, entry.size, strict=True)):
        raise InputError(
            f"{path}: tensor '{fqn}' has a chunk {list(chunk.sizes)} at {list(chunk.offsets)} outside its "
            f"shape {list(entry.size)}; the metadata is damaged"
        )
    cut = next((d for d, (s, n) in enumerate(zip(chunk.sizes, entry.size, strict=True)) if s != n), None)
    if math.prod(chunk.sizes) and cut is not None:
        before, after = chunk.sizes[:cut], chunk.sizes[cut + 1 :]
        if any(s != 1 for s in before) or tuple(after) != tuple(entry.size[cut + 1 :]):
            raise InputError(
                f"{path}: tensor '{fqn}' {list(entry.size)} is stored in chunks cut along several dimensions "
                f"(one is {list(chunk.sizes)} at {list(chunk.offsets)}: tensor parallelism?), which ckptavg "
                "does not read; save it with only FSDP sharding, or convert it with dcp_to_torch_save"
            )
    strides = [math.prod(entry.size[d + 1 :]) for d in range(len(entry.size))]
    return sum(o * s for o, s in zip(chunk.offsets, strides, strict=True))


def _groups(meta: DcpMetadata, keys: Iterable[str]) -> dict[str, list[str]]:
    """Keys by the top-level entry of the saved state dict they belong to (`optimizer`, ...)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        path = meta.paths.get(key) if meta.paths is not None else None
        top = path[0] if path else key.split(".")[0]
        groups.setdefault(top if path is None or len(path) > 1 else "", []).append(key)
    return groups


def pick_model_tensors(meta: DcpMetadata, key: str | None, folder: Path) -> tuple[str | None, list[str], str]:
    """The model's tensors: (the nested state dict they are under or None, their names there, the rule).

    `key` names the nested state dict; by default the first of `MODEL_KEYS` that is one, else the
    tensors at the top level of the state dict (torchtitan flattens the model there).
    """
    groups = _groups(meta, meta.tensors)
    nested = sorted(g for g in groups if g)
    if key is not None:
        prefix = key.rstrip(".") + "."
        names = [fqn[len(prefix) :] for fqn in meta.tensors if fqn.startswith(prefix)]
        if not names:
            raise InputError(
                f"{folder}: holds no tensors under `key={key}`; its state dict holds "
                f"{name_list(nested + (['top-level tensors'] if '' in groups else []))}"
            )
        return key.rstrip("."), names, f"tensors under `key={key}`"
    for candidate in MODEL_KEYS:
        if candidate in groups:
            prefix = candidate + "."
            return (
                candidate,
                [fqn[len(prefix) :] for fqn in groups[candidate]],
                f"the '{candidate}' state dict",
            )
    if "" in groups:
        return None, list(groups[""]), "the top-level tensors (the model, as torchtitan saves it)"
    raise InputError(
        f"{folder}: holds no model tensors at the top level or under {name_list(list(MODEL_KEYS))}; "
        f"its state dict holds {name_list(nested)}: pick one with `key=NAME`"
    )


def left_out(meta: DcpMetadata, taken: set[str]) -> str:
    """What the average leaves out, by top-level entry: `optimizer (24 tensors), train_state`."""
    rest = [k for k in (*meta.tensors, *meta.others) if k not in taken]
    parts = []
    for group, keys in _groups(meta, rest).items():
        for label in [group] if group else keys:
            tensors = sum(1 for k in keys if k in meta.tensors) if group else int(label in meta.tensors)
            parts.append(f"{label} ({plural(tensors, 'tensor')})" if tensors else label)
    return ", ".join(parts)


def _chunk_notes(meta: DcpMetadata, prefix: str, names: Sequence[str]) -> list[str]:
    """The chunk layout, in a line: how many tensors are in how many chunks along which dimension."""
    layouts: dict[str, int] = {}
    for name in names:
        entry = meta.tensors[prefix + name]
        cut = {
            d
            for chunk in entry.chunks
            for d, (s, n) in enumerate(zip(chunk.sizes, entry.size, strict=True))
            if s != n
        }
        label = f"{len(entry.chunks)} chunk" + ("s" if len(entry.chunks) != 1 else "")
        if cut:
            label += f" along dim {min(cut)}"
        layouts[label] = layouts.get(label, 0) + 1
    return [
        "chunks: "
        + ", ".join(
            f"{count} tensor{'s' if count != 1 else ''} in {label}" for label, count in layouts.items()
        )
    ]
