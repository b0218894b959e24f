"""The bytes of a torch zip archive that opening it reads, without the tensors' values.

`torch_archive` opens an archive by its zip directory, each record's local header and the records
that are not tensor storages (`data.pkl`, `byteorder`, versions); the values are read only when the
sums reach them. A sparse copy holding just these bytes (the rest left as holes) therefore opens as
the whole file does: that is how a dry run plans a torch file in object storage without downloading
its weights. Storages of a few bytes are taken too: a scalar tensor (an epoch, a metric) is read
when the file is opened.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence

from .zip_records import LOCAL_HEADER, ZIP_MAGIC

# Bytes taken after a local header's name for its extra field (torch pads data to 64 bytes there);
# a longer extra field is fetched in a second round.
_EXTRA_ROOM = 128
_SMALL_STORAGE = 64
# Ranges closer than this are fetched as one request.
_MERGE_GAP = 2**16

Fetch = Callable[[Sequence[tuple[int, int]]], list[bytes]]


def archive_skeleton(file, size: int, fetch: Fetch) -> list[tuple[int, bytes]] | None:
    """The (offset, bytes) pieces of an archive of `size` bytes that opening it reads, or None when
    it is not a zip archive (a legacy torch file, which is read whole).

    `file` is the object opened for reading (seekable: the zip directory is read through it);
    `fetch` reads byte ranges [begin, end) of the same version, in one batch.

    Raises:
        zipfile.BadZipFile: the zip directory cannot be read.
    """
    file.seek(0)
    if file.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
        return None
    with zipfile.ZipFile(file) as archive:
        entries = sorted(archive.infolist(), key=lambda entry: entry.header_offset)
        directory = archive.start_dir
    limits = [entry.header_offset for entry in entries[1:]] + [directory]
    wanted = [(directory, size)]
    headers = []  # (entry, where its name ends, where its wanted bytes end)
    for entry, limit in zip(entries, limits, strict=True):
        name_end = entry.header_offset + LOCAL_HEADER.size + len(_encoded_name(entry))
        end = name_end + _EXTRA_ROOM + (0 if _is_large_storage(entry) else entry.compress_size)
        end = max(entry.header_offset, min(end, limit))
        wanted.append((entry.header_offset, end))
        headers.append((entry, name_end, end))
    pieces = _fetched(wanted, fetch)
    more = []
    for entry, name_end, end in headers:
        extra = _field(pieces, entry.header_offset)
        if extra is not None and name_end + extra > end:
            more.append((end, name_end + extra + (0 if _is_large_storage(entry) else entry.compress_size)))
    return pieces + (_fetched(more, fetch) if more else [])


def _fetched(ranges: Sequence[tuple[int, int]], fetch: Fetch) -> list[tuple[int, bytes]]:
    merged: list[list[int]] = []
    for begin, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and begin <= merged[-1][1] + _MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    spans = [(begin, end) for begin, end in merged]
    return list(zip((begin for begin, _ in spans), fetch(spans), strict=True))


def _field(pieces: Sequence[tuple[int, bytes]], header: int) -> int | None:
    """The length of the extra field of the local header at `header`, from the fetched pieces."""
    for begin, data in pieces:
        if begin <= header and header + LOCAL_HEADER.size <= begin + len(data):
            return LOCAL_HEADER.unpack_from(data, header - begin)[-1]
    return None


def _encoded_name(entry: zipfile.ZipInfo) -> bytes:
    return entry.orig_filename.encode("utf-8" if entry.flag_bits & 0x800 else "cp437")


def _is_large_storage(entry: zipfile.ZipInfo) -> bool:
    """A tensor storage's record (`archive/data/0`) of more than a few bytes: not read when opened."""
    return entry.filename.partition("/")[2].startswith("data/") and entry.compress_size > _SMALL_STORAGE
