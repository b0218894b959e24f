"""The writer of a DCP output (`format=dcp`): a folder `torch.distributed.checkpoint.load` reads.

One `.distcp` file in DCP's default `torch_save` serialization: the provenance first (a bytes
item, `ckptavg`), then one chunk per tensor (the whole tensor), each a `torch.save` archive of
that tensor, as `torch.save` lays it out (stored records, the data record aligned to 64 bytes).
Every offset is known from the plan, so each archive's records are written up front and each
tensor's bytes at their place as the engine produces them; the data record's CRC-32, computed as
its chunks arrive (in order), goes into its local header and the archive's directory at `finish`,
which then writes `.metadata` (DCP's `Metadata`, pickled as DCP pickles it). The atomic commit of
the folder is `transaction`'s.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError
from ..formats import dtypes
from ..formats.dcp import METADATA_NAME
from ..formats.safetensors_header import Entry
from ..plan.layout import DCP_PROVENANCE_KEY as PROVENANCE_KEY
from .direct import write_at

ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from which zip64 fields hold them
_ZIP64_MARK = 0xFFFFFFFF  # what the 32-bit field then says
_ALIGNMENT = 64
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR = struct.Struct("<IIQI")
_DOS_DATE = 0x21  # 1980-01-01, as torch writes
_PADDING_ID = 0x4246  # torch's padding extra field ("FB")


@dataclass
class _Record:
    name: str
    offset: int  # of its local header, from the archive's start
    size: int
    crc: int
    extra: bytes  # of the local header, after any zip64 field


class _Archive:
    """The `torch.save` archive of one tensor, laid out from `start` in the file."""

    def __init__(self, entry: Entry, start: int):
        self.entry, self.start = entry, start
        self.nbytes = entry.nbytes
        small = [
            ("archive/data.pkl", _tensor_pickle(entry)),
            ("archive/.format_version", b"1"),
            ("archive/.storage_alignment", str(_ALIGNMENT).encode()),
            ("archive/byteorder", b"little"),
        ]
        self.head = bytearray()
        self.records: list[_Record] = []
        for name, content in small:
            self._add(name, len(content), zlib.crc32(content), b"")
            self.head += content
        zip64 = len(_zip64_extra(self.nbytes)) if self.nbytes >= ZIP64_LIMIT else 0
        unpadded = start + len(self.head) + _LOCAL.size + len("archive/data/0") + zip64 + 4
        padding = -unpadded % _ALIGNMENT
        self._add("archive/data/0", self.nbytes, 0, struct.pack("<HH", _PADDING_ID, padding) + b"Z" * padding)
        self.data = start + len(self.head)  # where the tensor's bytes go, in the file
        self.written = 0
        self.crc = 0

    def _add(self, name: str, size: int, crc: int, extra: bytes) -> None:
        record = _Record(name, len(self.head), size, crc, extra)
        self.records.append(record)
        self.head += _local_header(record)

    @property
    def tail_start(self) -> int:
        return self.data + self.nbytes

    def tail(self) -> bytes:
        """The records after the data (`version`), the central directory and its end, with the
        data record's CRC-32 in place."""
        data = self.records[-1]
        data.crc = self.crc
        version = b"3\n"
        records = [
            *self.records,
            _Record("archive/version", self.tail_start - self.start, len(version), zlib.crc32(version), b""),
        ]
        out = bytearray(_local_header(records[-1]) + version)
        directory = self.tail_start - self.start + len(out)
        for record in records:
            out += _central_entry(record)
        size = self.tail_start - self.start + len(out) - directory
        if directory >= ZIP64_LIMIT or size >= ZIP64_LIMIT:
            end64 = self.tail_start - self.start + len(out)
            out += _END64.pack(0x06064B50, 44, 45, 45, 0, 0, len(records), len(records), size, directory)
            out += _LOCATOR.pack(0x07064B50, 0, end64, 1)
            out += _END.pack(0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _ZIP64_MARK, _ZIP64_MARK, 0)
        else:
            out += _END.pack(0x06054B50, 0, 0, len(records), len(records), size, directory, 0)
        self.length = self.tail_start - self.start + len(out)
        return bytes(out)

    @property
    def end(self) -> int:
        """Where the next archive may start: past this one's tail, whose size does not depend on the CRC."""
        return self.tail_start + len(self.tail())

    def data_header_crc_offset(self) -> int:
        """Where the data record's CRC-32 lies in its local header, in the file."""
        return self.start + self.records[-1].offset + 14


class DcpLayout:
    """Where everything lies in a DCP output's `.distcp` file, from the plan alone: the provenance,
    then each tensor's archive (so any number of processes can fill it in at known offsets)."""

    def __init__(self, entries: Sequence[Entry], metadata: dict[str, str]):
        import torch

        provenance = io.BytesIO()
        torch.save(dict(metadata), provenance)
        self.provenance = provenance.getvalue()
        self.archives: dict[str, _Archive] = {}
        offset = len(self.provenance)
        for entry in entries:
            archive = _Archive(entry, offset)
            self.archives[entry.name] = archive
            offset = archive.end
        self.size = offset  # of the whole file

    def write_heads(self, fd: int, label: Path) -> None:
        """The provenance and every archive's records before its tensor's bytes."""
        write_at(fd, memoryview(self.provenance), 0, label)
        for archive in self.archives.values():
            write_at(fd, memoryview(bytes(archive.head)), archive.start, label)

    def write_tails(self, fd: int, crcs: dict[str, int], label: Path) -> None:
        """Every archive completed: its data record's CRC-32 (`crcs`, by tensor) in its local header,
        then the records after the data and the directory."""
        for name, archive in self.archives.items():
            archive.crc = crcs[name]
            write_at(fd, memoryview(struct.pack("<I", archive.crc)), archive.data_header_crc_offset(), label)
            write_at(fd, memoryview(archive.tail()), archive.tail_start, label)

    def write_metadata(self, path: Path, key: str | None) -> None:
        """`.metadata` beside the data file `path`, flushed to disk."""
        with open(path.with_name(METADATA_NAME), "xb") as f:
            f.write(pickle.dumps(self._metadata(path.name, key)))
            f.flush()
            os.fsync(f.fileno())

    def _metadata(self, data_name: str, key: str | None):
        """DCP's `Metadata` of the folder: one chunk per tensor, the provenance as a bytes item."""
        import torch
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            StorageMeta,
            TensorProperties,
            TensorStorageMetadata,
        )

        prefix = (key,) if key else ()
        entries: dict = {PROVENANCE_KEY: BytesStorageMetadata()}
        paths: dict = {PROVENANCE_KEY: (PROVENANCE_KEY,)}
        storage: dict = {MetadataIndex(PROVENANCE_KEY): _StorageInfo(data_name, 0, len(self.provenance))}
        for name, archive in self.archives.items():
            fqn = ".".join((*prefix, name))
            shape = torch.Size(archive.entry.shape)
            zeros = torch.Size([0] * len(shape))
            entries[fqn] = TensorStorageMetadata(
                TensorProperties(dtype=dtypes.torch_dtype(archive.entry.dtype)),
                shape,
                [ChunkStorageMetadata(offsets=zeros, sizes=shape)],
            )
            paths[fqn] = (*prefix, name)
            storage[MetadataIndex(fqn, zeros, 0)] = _StorageInfo(data_name, archive.start, archive.length)
        return Metadata(
            entries, planner_data=paths, storage_data=storage, storage_meta=StorageMeta(), version="1.0.0"
        )


class DcpWriter:
    """Writes a DCP output folder's `.distcp` file tensor by tensor, then its `.metadata`."""

    direct = False  # positioned writes through the page cache

    def __init__(
        self, path: Path, entries: Sequence[Entry], metadata: dict[str, str], key: str | None, label: Path
    ):
        self.path, self.label, self._key = path, label, key
        self._layout = DcpLayout(entries, metadata)
        self._archives = self._layout.archives
        self._file = open(path, "xb", buffering=0)  # noqa: SIM115 (closed in finish/abort)
        try:
            self._layout.write_heads(self._file.fileno(), self.label)
        except BaseException:
            self._file.close()
            raise

    def write(self, name: str, start: int, tensor) -> None:
        """Write a contiguous CPU tensor's bytes into tensor `name`, `start` bytes into its data."""
        if tensor.numel() == 0:
            return
        import torch

        archive = self._archives[name]
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        if start != archive.written or start + raw.nbytes > archive.nbytes:
            raise OutputError(f"{self.label}: tensor '{name}' was not written in order (internal error)")
        write_at(self._file.fileno(), memoryview(raw), archive.data + start, self.label)
        archive.crc = zlib.crc32(raw, archive.crc)
        archive.written += raw.nbytes

    def finish(self) -> None:
        """Check every tensor was written whole, complete the archives, flush, write `.metadata`."""
        fd = self._file.fileno()
        for name, archive in self._archives.items():
            if archive.written != archive.nbytes:
                raise OutputError(
                    f"{self.label}: wrote {archive.written} of {archive.nbytes} bytes of '{name}' "
                    "(internal error)"
                )
        self._layout.write_tails(fd, {name: a.crc for name, a in self._archives.items()}, self.label)
        os.fsync(fd)
        self._file.close()
        self._layout.write_metadata(self.path, self._key)

    def abort(self) -> None:
        self._file.close()


def _local_header(record: _Record) -> bytes:
    zip64 = record.size >= ZIP64_LIMIT
    size = _ZIP64_MARK if zip64 else record.size
    name = record.name.encode()
    extra = (_zip64_extra(record.size) if zip64 else b"") + record.extra
    return (
        _LOCAL.pack(
            0x04034B50, 45 if zip64 else 20, 0, 0, 0, _DOS_DATE, record.crc, size, size, len(name), len(extra)
        )
        + name
        + extra
    )


def _central_entry(record: _Record) -> bytes:
    fields = []
    size = record.size
    if size >= ZIP64_LIMIT:
        fields += [size, size]
        size = _ZIP64_MARK
    offset = record.offset
    if offset >= ZIP64_LIMIT:
        fields.append(offset)
        offset = _ZIP64_MARK
    extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
    name = record.name.encode()
    version = 45 if fields else 20
    return (
        _CENTRAL.pack(
            0x02014B50,
            version,
            version,
            0,
            0,
            0,
            _DOS_DATE,
            record.crc,
            size,
            size,
            len(name),
            len(extra),
            0,
            0,
            0,
            0,
            offset,
        )
        + name
        + extra
    )


def _zip64_extra(size: int) -> bytes:
    """The zip64 field of a local header: the record's size, uncompressed and stored."""
    return struct.pack("<HHQQ", 1, 16, size, size)


class _Storage:
    """The storage a tensor's pickle refers to (saved as record `data/0`)."""


_STORAGE = _Storage()


class _Tensor:
    """Pickles as `torch.save` pickles a contiguous tensor on its own storage, without its values."""

    def __init__(self, entry: Entry):
        self.entry = entry

    def __reduce__(self):
        import torch

        shape = tuple(self.entry.shape)
        strides = tuple(_contiguous_strides(shape))
        return (
            torch._utils._rebuild_tensor_v2,
            (_STORAGE, 0, shape, strides, False, collections.OrderedDict()),
        )


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return strides[::-1]


def _tensor_pickle(entry: Entry) -> bytes:
    """`data.pkl` of a `torch.save` of the tensor: its rebuild call, its storage by persistent id."""
    import torch

    dtype = dtypes.torch_dtype(entry.dtype)
    storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])
    numel = dtypes.TensorInfo(entry.dtype, tuple(entry.shape)).nbytes // dtype.itemsize

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage_type, "0", "cpu", numel) if obj is _STORAGE else None

    out = io.BytesIO()
    Pickler(out, protocol=2).dump(_Tensor(entry))
    return out.getvalue()
