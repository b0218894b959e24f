"""Where a zip archive keeps each record's CRC-32: in its local header, or in the data descriptor
after its data when the header defers it (as torch's writer does), and in its central directory entry.

A torch archive whose stored records are rewritten in place, with the same names and sizes, keeps
every offset, size and zip64 field; only these CRC-32 fields change.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

ZIP_MAGIC = b"PK\x03\x04"  # a local file header's signature: the first bytes of a zip archive
# A local file header: signature, versions, flags, method, time, date, CRC-32, sizes, then the
# lengths of the name and of the extra field that follow it.
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_CENTRAL_ENTRY = b"PK\x01\x02"
_DESCRIPTOR = b"PK\x07\x08"
_DEFERRED = 0x08  # general purpose flag bit 3: the CRC and sizes follow the data


@dataclass(frozen=True)
class CrcFields:
    """A record's CRC-32 and every place in the file that stores it (4 bytes, little-endian)."""

    crc: int
    offsets: tuple[int, ...]


def crc_fields(path: Path) -> dict[str, CrcFields]:
    """Each record's CRC-32 fields, by its name inside the archive's folder (`data/0`), as torch names it.

    Raises:
        InputError: a header is not where the directory says, or stores another CRC-32.
    """
    found: dict[str, CrcFields] = {}
    with open(path, "rb") as f:
        with zipfile.ZipFile(f) as archive:
            entries = archive.infolist()
            position = archive.start_dir
        fd = f.fileno()
        for entry in entries:
            central = os.pread(fd, 46, position)
            if len(central) < 46 or central[:4] != _CENTRAL_ENTRY:
                raise InputError(f"{path}: its zip directory is not where it says; the file is damaged")
            name_length, extra_length, comment_length = struct.unpack("<HHH", central[28:34])
            offsets = [position + 16]
            position += 46 + name_length + extra_length + comment_length
            local = os.pread(fd, 30, entry.header_offset)
            if len(local) < LOCAL_HEADER.size or local[:4] != ZIP_MAGIC:
                raise InputError(
                    f"{path}: record '{entry.filename}' has no local header; the file is damaged"
                )
            (flags,) = struct.unpack("<H", local[6:8])
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            if flags & _DEFERRED:
                end = entry.header_offset + 30 + name_length + extra_length + entry.file_size
                offsets.append(end + 4 if os.pread(fd, 4, end) == _DESCRIPTOR else end)
            else:
                offsets.append(entry.header_offset + 14)
            for offset in offsets:
                stored = os.pread(fd, 4, offset)
                if len(stored) < 4 or struct.unpack("<I", stored)[0] != entry.CRC:
                    raise InputError(
                        f"{path}: record '{entry.filename}' stores two different CRC-32s; the file is damaged"
                    )
            found[entry.filename.partition("/")[2]] = CrcFields(entry.CRC, tuple(offsets))
    return found
