"""torch.distributed.checkpoint (DCP) folders: a `.metadata` file and the `*.distcp` files it names.

The metadata (read by `dcp_metadata`, no code runs) gives every tensor's global shape and dtype
and the chunks it is stored as (FSDP saves one chunk per rank, each in that rank's file), and
where each chunk's bytes lie. Only the model's tensors are read (see `_pick`): the optimizer's
state, the LR scheduler, the data loader and the train state saved beside them are never touched.

Both of DCP's serializations are read in place, from one private map per file:

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
moved past it (`_Held`: at most two chunks of one tensor per checkpoint, counted by the plan as
`decoded_bytes`). They are checked against the metadata then, not when the folder is opened.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import struct
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import InputError, name_list, plural
from ..memory import CHUNK_ELEMENTS
from . import dcp_transforms, dtypes
from .dcp_metadata import Chunk, DcpMetadata, Stored, TensorEntry, read_metadata
from .deepspeed import Pieces
from .dtypes import TensorInfo
from .files import changed_message, stamp_of
from .safetensors_header import read_header
from .torch_archive import PICKLE_RECORD, _skeleton

METADATA_NAME = ".metadata"
DISTCP_SUFFIX = ".distcp"
# The nested state dicts the model's weights are saved under, in the order they are looked for.
MODEL_KEYS = ("model", "module", "state_dict", "model_state_dict")
_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_SHARDING_KEY = "DCP_SHARDING_INFO"  # DCP's safetensors metadata: each tensor's chunk offsets


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
    return [checkpoint, *(_Part(path) for path in checkpoint.also_read)]


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
        self.key, names, rule = _pick(meta, key, folder)
        self._files: dict[str, _DistcpFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._chunks: dict[str, list[tuple[int, _Span | _Encoded]]] = {}
        self._held = _Held()
        prefix = f"{self.key}." if self.key else ""
        try:
            for name in names:
                self._add(name, prefix + name, meta.tensors[prefix + name], meta)
        finally:
            for file in self._files.values():
                file.close_handle()
        self.also_read = [file.path for file in self._files.values()]
        kinds = sorted({file.serialization for file in self._files.values()})
        left = _left_out(meta, set(prefix + name for name in names))
        encoded = [
            span for chunks in self._chunks.values() for _, span in chunks if isinstance(span, _Encoded)
        ]
        self.decoded_bytes = _held_at_most(encoded)
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
        try:
            dtype = dtypes.safetensors_name(entry.dtype)
        except KeyError:
            raise InputError(
                f"{self.path.parent}: tensor '{fqn}' has dtype {entry.dtype}, which ckptavg cannot average"
            ) from None
        if not dtypes.addressable(dtype, entry.size):
            raise InputError(
                f"{self.path}: tensor '{fqn}' has shape {list(entry.size)}; the metadata is damaged"
            )
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
        self.tensors[name] = TensorInfo(dtype, entry.size)
        self._chunks[name] = chunks

    def _file(self, fqn: str, stored: Stored) -> _DistcpFile:
        if stored.file not in self._files:
            if Path(stored.file).name != stored.file or stored.file in (".", ".."):
                raise InputError(
                    f"{self.path}: tensor '{fqn}' is stored in '{stored.file}', not a file of the "
                    "checkpoint's folder; ckptavg reads only files beside the metadata"
                )
            self._files[stored.file] = _DistcpFile(self.path.parent / stored.file, fqn)
        return self._files[stored.file]


class _Part:
    """Another file a DCP checkpoint is read from: no tensors of its own, but its changes count."""

    tensors: dict = {}  # noqa: RUF012 (never mutated)
    metadata: dict = {}  # noqa: RUF012
    scalars: dict = {}  # noqa: RUF012
    notes: tuple = ()
    tied: tuple = ()

    def __init__(self, path: Path):
        self.path = path
        self.stamp = stamp_of(path)


class _Span:
    """A chunk's values: bytes of a mapped file, sliced as a flat tensor of its dtype.

    A chunk stored at an offset its dtype is not aligned to (DCP packs chunks back to back) is
    copied one slice at a time, never whole.
    """

    def __init__(self, file: _DistcpFile, start: int, numel: int, dtype):
        self._file, self._start, self._numel, self._dtype = file, start, numel, dtype

    def numel(self) -> int:
        return self._numel

    def __getitem__(self, window: slice):
        first, stop, _ = window.indices(self._numel)
        size = self._dtype.itemsize
        raw = self._file.bytes()[self._start + first * size : self._start + max(stop, first) * size]
        try:
            return raw.view(self._dtype)
        except RuntimeError:  # not aligned to the dtype: this slice copied
            return raw.clone().view(self._dtype)


class _Encoded:
    """A chunk stored through transforms: decoded whole when first read (through `_Held`), its
    archive then checked as a mapped chunk's is, and its values sliced like a `_Span`'s."""

    def __init__(
        self, file: _DistcpFile, fqn: str, stored: Stored, chunk: Chunk, dtype, held: _Held, tensor_numel: int
    ):
        self._file, self._stored, self._chunk, self._held = file, stored, chunk, held
        self.fqn, self.dtype, self.transforms = fqn, dtype, stored.transforms
        self._where = f"{file.path}: tensor '{fqn}' (chunk at {list(chunk.offsets)})"
        self._numel = math.prod(chunk.sizes)
        self.tensor_numel = tensor_numel
        self.limit = self._numel * dtype.itemsize + dcp_transforms.SLACK  # the most it decodes to

    def numel(self) -> int:
        return self._numel

    def __getitem__(self, window: slice):
        return self._held.values(self)[window]

    def decoded(self) -> _Span:
        """The chunk decoded into memory of its own, as a span of it."""
        encoded = self._file.bytes()[self._stored.offset : self._stored.offset + self._stored.length]
        out, size = dcp_transforms.decode(encoded.numpy(), self.limit, self._where)
        start, numel = _archive_values(out, 0, size, self._where, self._chunk, self.dtype)
        return _Span(_Decoded(out), start, numel, self.dtype)


class _Decoded:
    """A decoded chunk's anonymous map, read as a `_Span` reads a file."""

    def __init__(self, out: mmap.mmap):
        import torch

        self._bytes = torch.frombuffer(out, dtype=torch.uint8)

    def bytes(self):
        return self._bytes


class _Held:
    """The decoded chunks of one checkpoint: the two last read, both of the tensor being read (the
    engine moves forward through a tensor, and one engine chunk spans at most two large ones);
    reading another tensor's drops them."""

    def __init__(self):
        self._spans: dict[_Encoded, _Span] = {}

    def values(self, encoded: _Encoded) -> _Span:
        if encoded not in self._spans:
            if any(held.fqn != encoded.fqn for held in self._spans):
                self._spans.clear()
            while len(self._spans) >= 2:
                del self._spans[next(iter(self._spans))]
            self._spans[encoded] = encoded.decoded()
        return self._spans[encoded]


class _DistcpFile:
    """One `.distcp` file: checked chunk by chunk when opened, mapped when first read."""

    def __init__(self, path: Path, fqn: str):
        self.path = path
        try:
            self._handle = open(path, "rb")  # noqa: SIM115 (closed once the chunks are checked)
        except FileNotFoundError:
            raise InputError(
                f"{path.parent}: tensor '{fqn}' is stored in {path.name}, which does not exist (a rank's "
                "file is missing, or the save was cut short)"
            ) from None
        except OSError as e:
            raise InputError(f"{path}: cannot read it ({e.strerror or e})") from e
        self.stamp = stamp_of(self._handle.fileno())
        self.size = os.fstat(self._handle.fileno()).st_size
        self.serialization = ""
        self._headers: dict[int, dict] = {}  # a safetensors file's start -> its tensors
        self._bytes = None

    def span(
        self, fqn: str, entry: TensorEntry, chunk: Chunk, stored: Stored, held: _Held
    ) -> _Span | _Encoded:
        """The chunk of tensor `fqn` stored at `stored`, checked against the metadata (once
        decoded, for a chunk stored through transforms)."""
        dtype = entry.dtype
        where = f"{self.path}: tensor '{fqn}' (chunk at {list(chunk.offsets)})"
        if stored.offset + stored.length > self.size:
            raise InputError(
                f"{where} lies at bytes {stored.offset} to {stored.offset + stored.length}, past the end "
                f"of the file ({self.size} bytes); the file is truncated: copy or save it again"
            )
        if stored.transforms:
            dcp_transforms.check(stored.transforms, where)
            self.serialization = "torch_save"  # DCP applies transforms to torch_save chunks alone
            return _Encoded(self, fqn, stored, chunk, dtype, held, math.prod(entry.size))
        self._handle.seek(stored.offset)
        if self._handle.read(4) == _ZIP_MAGIC:
            self.serialization = "torch_save"
            start, numel = _archive_values(self._handle, stored.offset, stored.length, where, chunk, dtype)
        else:
            self.serialization = "safetensors"
            start, numel = self._safetensors_chunk(where, fqn, chunk, stored, dtype)
        return _Span(self, start, numel, dtype)

    def bytes(self):
        """The file's bytes, one private map (writable for torch, never written back)."""
        if self._bytes is None:
            import torch

            try:
                with open(self.path, "rb") as f:
                    if stamp_of(f.fileno()) != self.stamp:
                        raise InputError(changed_message(self.path))
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise InputError(f"{self.path}: cannot map the file: {e}") from e
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            self._bytes = torch.frombuffer(mapped, dtype=torch.uint8)
        return self._bytes

    def close_handle(self) -> None:
        self._handle.close()

    def _safetensors_chunk(
        self, where: str, fqn: str, chunk: Chunk, stored: Stored, dtype
    ) -> tuple[int, int]:
        if stored.offset not in self._headers:
            try:
                tensors, metadata = read_header(self.path, self._handle, stored.offset)
            except InputError as e:
                raise InputError(f"{where}: {str(e).removeprefix(f'{self.path}: ')}") from None
            try:
                sharding = json.loads(metadata.get(_SHARDING_KEY, "{}"))
            except ValueError:
                sharding = {}
            self._headers[stored.offset] = {"tensors": tensors, "sharding": sharding}
        header = self._headers[stored.offset]
        tensor = header["tensors"].get(fqn)
        if tensor is None:
            raise InputError(
                f"{where}: is not in the file's safetensors header; the files are of another save"
            )
        saved = (
            header["sharding"].get(fqn, {}).get("saved_offsets")
            if isinstance(header["sharding"], dict)
            else None
        )
        if (
            tensor.dtype != dtypes.safetensors_name(dtype)
            or tensor.shape != chunk.sizes
            or tensor.end - tensor.begin != stored.length
            or (saved is not None and tuple(saved) != chunk.offsets)
        ):
            raise InputError(
                f"{where}: the file stores it as {tensor.dtype} {list(tensor.shape)}, not as the metadata "
                f"says ({dtype} {list(chunk.sizes)} at {list(chunk.offsets)}); the files are of another save"
            )
        return stored.offset + tensor.begin, math.prod(tensor.shape)


class _Pickle:
    """The one record `torch_archive`'s unpickling reads."""

    def __init__(self, pickled: bytes):
        self._pickled = pickled

    def get_record(self, name: str) -> bytes:
        return self._pickled


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a file of their own (a chunk's archive)."""

    def __init__(self, file, start: int, length: int):
        super().__init__()
        self._file, self._start, self._length, self._position = file, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = min(max(base + offset, 0), self._length)
        return self._position

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._position
        size = left if size is None or size < 0 else min(size, left)
        self._file.seek(self._start + self._position)
        data = self._file.read(size)
        self._position += len(data)
        return data


def _archive_values(handle, offset: int, length: int, where: str, chunk: Chunk, dtype) -> tuple[int, int]:
    """The `torch.save` archive of one chunk, at bytes [offset, offset + length) of an open file:
    where its values start in the file, and how many there are."""
    import torch

    window = _Window(handle, offset, length)
    try:
        with zipfile.ZipFile(window) as archive:
            entries = archive.infolist()
            pickles = [e for e in entries if e.filename.endswith("/" + PICKLE_RECORD)]
            pickled = archive.read(pickles[0]) if len(pickles) == 1 else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise InputError(f"{where}: is not a readable torch.save archive ({e}); the file is damaged") from e
    if pickled is None:
        raise InputError(f"{where}: its archive has no single data.pkl; the file is damaged")
    records = {}
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
            raise InputError(f"{where}: its archive's record {entry.filename} is compressed; save it again")
        records[entry.filename.partition("/")[2]] = (
            _data_start(handle, offset, length, where, entry),
            entry.file_size,
        )
    if "byteorder" in records:
        handle.seek(offset + records["byteorder"][0])
        if handle.read(records["byteorder"][1]) == b"big":
            raise InputError(f"{where}: saved on a big-endian machine; load it there and save it again")
    try:
        tensor, declared, _storages, _ = _skeleton(_Pickle(pickled))
    except Exception as e:  # the weights-only unpickler's refusals, or a damaged pickle
        raise InputError(f"{where}: its pickle is not a plain tensor ({str(e).splitlines()[0]})") from e
    if not isinstance(tensor, torch.Tensor) or tensor.untyped_storage()._cdata not in declared:
        raise InputError(f"{where}: its archive does not hold a tensor; the file is damaged")
    name, nbytes = declared[tensor.untyped_storage()._cdata]
    if tensor.dtype != dtype or tuple(tensor.shape) != chunk.sizes:
        raise InputError(
            f"{where}: holds a {tensor.dtype} tensor of shape {list(tensor.shape)}, but the metadata "
            f"says {dtype} {list(chunk.sizes)}; the files are of another save"
        )
    if not tensor.is_contiguous():
        raise InputError(f"{where}: is stored as a strided view, which ckptavg does not map; save it again")
    if name not in records or nbytes > records[name][1]:
        raise InputError(
            f"{where}: its values need {nbytes} bytes that its archive lacks; the file is damaged"
        )
    first = tensor.storage_offset() * dtype.itemsize
    if first + tensor.numel() * dtype.itemsize > nbytes:
        raise InputError(f"{where}: its values lie past its storage; the file is damaged")
    return offset + records[name][0] + first, tensor.numel()


def _data_start(handle, offset: int, length: int, where: str, entry: zipfile.ZipInfo) -> int:
    """Where a record's bytes start, from its local header, checked to lie in the chunk's range."""
    handle.seek(offset + entry.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != _ZIP_MAGIC:
        raise InputError(f"{where}: its archive's record {entry.filename} has no local header; damaged")
    *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    start = entry.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if start + entry.file_size > length:
        raise InputError(f"{where}: its archive's record {entry.filename} runs past the chunk; damaged")
    return start


def _held_at_most(encoded: Sequence[_Encoded]) -> int:
    """The most bytes decoded chunks take at once: the two `_Held` keeps, and those one engine
    chunk assembles from (smaller than it, as they lie inside it)."""
    if not encoded:
        return 0
    largest = sorted((span.limit for span in encoded), reverse=True)[:2]
    window = max(min(CHUNK_ELEMENTS, span.tensor_numel) * span.dtype.itemsize for span in encoded)
    return sum(largest) + window


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


def _pick(meta: DcpMetadata, key: str | None, folder: Path) -> tuple[str | None, list[str], str]:
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


def _left_out(meta: DcpMetadata, taken: set[str]) -> str:
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
