"""Torch zip archives (`torch.save` since 1.6) read by ckptavg itself: checked, then mapped.

`torch.load(mmap=True)` trusts the archive: a tensor whose storage record is
shorter than the tensor silently reads the zip bytes that follow it, and a
record past the end of the file is a page past its end (SIGBUS). So the zip
directory is checked first (every record inside the file, stored, not
overlapping another), then `data.pkl` is unpickled by torch's own weights-only
unpickler (no code runs; the allowed classes are `torch.load`'s) onto
meta-device storages, which names each tensor's record and declared size
without reading a byte of data. A tensor whose record can back it becomes a
zero-copy view of one private map of the file, as safetensors inputs are: one
pass over the pickle, and nothing but the chosen weights is ever touched.
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .zip_records import ZIP_MAGIC

PICKLE_RECORD = "data.pkl"
_BYTE_ORDER_RECORD = "byteorder"


@dataclass(frozen=True)
class _Record:
    """Where a zip record lies in the file, as torch's reader finds it."""

    header: int  # its local zip header
    start: int  # its bytes
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


class TorchArchive:
    """A torch zip archive whose directory is sound; `content` is its pickle with meta-device tensors.

    Raises (on construction):
        InputError: the archive is damaged, or was saved on a big-endian machine.
        NotImplementedError: the pickle holds tensors with no meta-device form (quantized, nested).
    """

    def __init__(self, path: Path):
        self.path = path
        self._records, reader = _archive_records(path)
        if reader.has_record(_BYTE_ORDER_RECORD) and reader.get_record(_BYTE_ORDER_RECORD) == b"big":
            raise InputError(
                f"{path}: saved on a big-endian machine; load it there and save it again, or convert it "
                "to safetensors"
            )
        self.content, self._declared, self._storages, self._references = _skeleton(reader)
        self._bytes = None

    @property
    def records(self) -> dict[str, _Record]:
        """Each record's place in the file, by its name in the archive (`data.pkl`, `data/0`, ...)."""
        return dict(self._records)

    def place(self, tensor) -> tuple[str, int]:
        """The record holding a (checked) tensor of `content`'s storage, and the storage's size in bytes."""
        return self._declared[tensor.untyped_storage()._cdata]

    def references(self, record: str) -> int:
        """How many times the pickle refers to a record's storage: once per tensor saved on it."""
        return self._references.get(record, 0)

    def problem(self, tensor) -> str | None:
        """Why the record of a tensor of `content` cannot back it: missing, or shorter than its storage."""
        storage = tensor.untyped_storage()
        if storage._cdata not in self._declared:  # rebuilt without a storage: the file's own meta tensor
            return "is on the meta device, so the file holds no values for it; save the real weights"
        name, nbytes = self._declared[storage._cdata]
        if name not in self._records:
            return (
                f"has its values in record '{name}', which the archive lacks; the file is damaged: "
                "save it again"
            )
        if nbytes > self._records[name].size:
            return (
                f"needs {nbytes} bytes but its record '{name}' holds {self._records[name].size}; the file is "
                "damaged (truncated or badly rewritten): save it again"
            )
        return None

    def view(self, tensor):
        """The values of a (checked) tensor of `content`, as a zero-copy view of the mapped file."""
        name, nbytes = self._declared[tensor.untyped_storage()._cdata]
        start = self._records[name].start
        raw = self._map()[start : start + nbytes]
        try:
            typed = raw.view(tensor.dtype)
        except RuntimeError:  # a record not aligned to its dtype (not torch.save's): a copy, still correct
            typed = raw.clone().view(tensor.dtype)
        return typed.as_strided(
            tensor.shape, tensor.stride(), typed.storage_offset() + tensor.storage_offset()
        )

    def _map(self):
        import torch

        if self._bytes is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY (MAP_PRIVATE): writable for torch, never written back.
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            self._bytes = torch.frombuffer(mapped, dtype=torch.uint8)
        return self._bytes


def is_zip_archive(path: Path) -> bool:
    """Whether torch reads the file as a zip archive (as `torch.serialization._is_zipfile` decides)."""
    with open(path, "rb") as f:
        return f.read(len(ZIP_MAGIC)) == ZIP_MAGIC


def _archive_records(path: Path) -> tuple[dict[str, _Record], object]:
    """The records of a zip archive whose directory is sound, and torch's reader of it.

    Tensors are taken at their record's offset: a record past the end of the file,
    compressed, or overlapping another would feed them other bytes (or pages past
    the end, which kill the process), so those are refused here.
    """
    import torch

    file_size = os.path.getsize(path)
    reader = torch._C.PyTorchFileReader(str(path))
    records = {}
    for name in reader.get_all_records():
        record = _Record(
            reader.get_record_header_offset(name),
            reader.get_record_offset(name),
            reader.get_record_size(name),
        )
        if record.end > file_size:
            raise InputError(
                f"{path}: record '{name}' ends at byte {record.end}, past the end of the file "
                f"({file_size} bytes); the file is truncated or damaged: copy or save it again"
            )
        records[name] = record
    directory_start = _check_zip_directory(path, records)
    ordered = sorted(records, key=lambda name: records[name].header)
    for name, following in itertools.pairwise(ordered):
        if records[name].end > records[following].header:
            raise InputError(f"{path}: records '{name}' and '{following}' overlap; the file is damaged")
    if ordered and records[ordered[-1]].end > directory_start:
        raise InputError(f"{path}: record '{ordered[-1]}' runs into the zip directory; the file is damaged")
    return records, reader


def _check_zip_directory(path: Path, records: dict[str, _Record]) -> int:
    """Python's zip reader must see the records torch sees, stored uncompressed; returns where the
    directory starts."""
    with zipfile.ZipFile(path) as archive:
        entries = archive.infolist()
        directory_start = archive.start_dir
    names = [entry.filename for entry in entries]
    if len(set(names)) != len(names) or len(names) != len(records):
        raise InputError(
            f"{path}: the zip directory lists records twice or inconsistently; the file is damaged"
        )
    for entry in entries:
        name = entry.filename.partition("/")[2]
        if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
            raise InputError(
                f"{path}: record '{name}' is compressed, and torch maps only stored records; the file was "
                "rewritten by another tool: save it again with torch.save"
            )
        record = records.get(name)
        if record is None or (record.header, record.size) != (entry.header_offset, entry.file_size):
            raise InputError(
                f"{path}: the zip directory's entry for '{name}' is inconsistent; the file is damaged"
            )
    return directory_start


def _skeleton(reader) -> tuple[object, dict[int, tuple[str, int]], list, dict[str, int]]:
    """The checkpoint unpickled onto meta storages, each storage's record and declared size, the
    storages (kept alive, so that their addresses stay theirs), and how often each record is referred to."""
    import torch
    from torch import _weights_only_unpickler

    by_key: dict = {}
    declared: dict[int, tuple[str, int]] = {}  # meta storage address -> (record, largest size declared)
    references: dict[str, int] = {}

    def persistent_load(saved_id):
        _, storage_type, key, _, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = numel * dtype.itemsize
        if key not in by_key:  # as torch.load: the first declaration of a record makes its storage
            by_key[key] = torch.UntypedStorage(nbytes, device="meta")
        record, known = declared.get(by_key[key]._cdata, (f"data/{key}", 0))
        declared[by_key[key]._cdata] = (record, max(known, nbytes))
        references[record] = references.get(record, 0) + 1
        return torch.storage.TypedStorage(wrap_storage=by_key[key], dtype=dtype, _internal=True)

    pickled = io.BytesIO(reader.get_record(PICKLE_RECORD))
    unpickler = _weights_only_unpickler.Unpickler(pickled, encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        content = unpickler.load()
    finally:
        torch._utils._sparse_tensors_to_validate.clear()  # meta tensors: nothing to validate, ever
    return content, declared, list(by_key.values()), references
