"""Where a DCP chunk's values lie in its `.distcp` file, read in place: a `torch.save` archive's
data record (its zip directory checked, its pickle read weights-only onto meta storages), a
safetensors tensor's byte range, or, for chunks stored through DCP's extension transforms, the
bytes decoded when the engine first reads them (`HeldChunks` keeps at most two, of one tensor).
`dcp.DcpCheckpoint` puts the chunks of each tensor together."""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..memory import CHUNK_ELEMENTS
from . import dcp_transforms, dtypes
from .dcp_metadata import Chunk, Stored, TensorEntry
from .files import changed_message, stamp_of
from .safetensors_header import read_header
from .torch_archive import PICKLE_RECORD, _skeleton
from .zip_records import LOCAL_HEADER, ZIP_MAGIC

_SHARDING_KEY = "DCP_SHARDING_INFO"  # DCP's safetensors metadata: each tensor's chunk offsets


class MappedChunk:
    """A chunk's values: bytes of a mapped file, sliced as a flat tensor of its dtype.

    A chunk stored at an offset its dtype is not aligned to (DCP packs chunks back to back) is
    copied one slice at a time, never whole.
    """

    def __init__(self, file: DistcpFile, start: int, numel: int, dtype):
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


class EncodedChunk:
    """A chunk stored through transforms: decoded whole when first read (through `HeldChunks`), its
    archive then checked as a mapped chunk's is, and its values sliced like a `MappedChunk`'s."""

    def __init__(
        self,
        file: DistcpFile,
        fqn: str,
        stored: Stored,
        chunk: Chunk,
        dtype,
        held: HeldChunks,
        tensor_numel: int,
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

    def decoded(self) -> MappedChunk:
        """The chunk decoded into memory of its own, as a span of it."""
        encoded = self._file.bytes()[self._stored.offset : self._stored.offset + self._stored.length]
        out, size = dcp_transforms.decode(encoded.numpy(), self.limit, self._where)
        start, numel = _archive_values(out, 0, size, self._where, self._chunk, self.dtype)
        return MappedChunk(_Decoded(out), start, numel, self.dtype)


class _Decoded:
    """A decoded chunk's anonymous map, read as a `MappedChunk` reads a file."""

    def __init__(self, out: mmap.mmap):
        import torch

        self._bytes = torch.frombuffer(out, dtype=torch.uint8)

    def bytes(self):
        return self._bytes


class HeldChunks:
    """The decoded chunks of one checkpoint: the two last read, both of the tensor being read (the
    engine moves forward through a tensor, and one engine chunk spans at most two large ones);
    reading another tensor's drops them."""

    def __init__(self):
        self._spans: dict[EncodedChunk, MappedChunk] = {}

    def values(self, encoded: EncodedChunk) -> MappedChunk:
        if encoded not in self._spans:
            if any(held.fqn != encoded.fqn for held in self._spans):
                self._spans.clear()
            while len(self._spans) >= 2:
                del self._spans[next(iter(self._spans))]
            self._spans[encoded] = encoded.decoded()
        return self._spans[encoded]


class DistcpFile:
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
        self, fqn: str, entry: TensorEntry, chunk: Chunk, stored: Stored, held: HeldChunks
    ) -> MappedChunk | EncodedChunk:
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
            return EncodedChunk(self, fqn, stored, chunk, dtype, held, math.prod(entry.size))
        self._handle.seek(stored.offset)
        if self._handle.read(4) == ZIP_MAGIC:
            self.serialization = "torch_save"
            start, numel = _archive_values(self._handle, stored.offset, stored.length, where, chunk, dtype)
        else:
            self.serialization = "safetensors"
            start, numel = self._safetensors_chunk(where, fqn, chunk, stored, dtype)
        return MappedChunk(self, start, numel, dtype)

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
    header = handle.read(LOCAL_HEADER.size)
    if len(header) != LOCAL_HEADER.size or header[:4] != ZIP_MAGIC:
        raise InputError(f"{where}: its archive's record {entry.filename} has no local header; damaged")
    *_, name_length, extra_length = LOCAL_HEADER.unpack(header)
    start = entry.header_offset + LOCAL_HEADER.size + name_length + extra_length
    if start + entry.file_size > length:
        raise InputError(f"{where}: its archive's record {entry.filename} runs past the chunk; damaged")
    return start


def held_at_most(encoded: Sequence[EncodedChunk]) -> int:
    """The most bytes decoded chunks take at once: the two `HeldChunks` keeps, and those one engine
    chunk assembles from (smaller than it, as they lie inside it)."""
    if not encoded:
        return 0
    largest = sorted((span.limit for span in encoded), reverse=True)[:2]
    window = max(min(CHUNK_ELEMENTS, span.tensor_numel) * span.dtype.itemsize for span in encoded)
    return sum(largest) + window
