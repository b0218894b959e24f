"""The writer of an output like the last input (`plan.like_last`): a copy of its torch zip archive
with the averaged tensors' bytes written into their records as the engine produces them.

Every byte outside the averaged regions is copied from the last input by the kernel
(`copy_file_range`, else through one small buffer): the pickle and the optimizer's state are copied
record by record, never unpickled or held in memory. Each averaged region's CRC-32 is computed as its
chunks arrive (in order); a rewritten record's CRC-32 joins those of its regions and of the bytes
between them, and goes into its local header or data descriptor and its central directory entry.
Record names, sizes and offsets (torch's 64-byte alignment, zip64 where the input has it) stay as
they were. The atomic commit of the file is `transaction`'s.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path

from ..errors import InputError, OutputError
from ..formats.files import changed_message
from ..plan.like_last import LikeLast, Region
from . import interrupts
from .crc32 import joined
from .direct import write_at

COPY_PIECE = 64 * 2**20  # copied by the kernel between checks for Ctrl-C
READ_PIECE = 2**20  # bytes read at a time where they must pass through here
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}


class _Progress:
    """How much of an averaged region is written, and the CRC-32 of that much."""

    def __init__(self, region: Region):
        self.region = region
        self.written = 0
        self.crc = 0


class LikeLastWriter:
    """Writes the last input's archive to `path` with the averaged regions filled in by `write`."""

    direct = False  # positioned writes through the page cache

    def __init__(self, path: Path, like: LikeLast, label: Path):
        self.label = label
        self._like = like
        self._progress = {r.name: _Progress(r) for record in like.records for r in record.regions}
        self._gaps: dict[str, list[tuple[int, int]]] = {}  # record -> CRC-32 and length of unchanged bytes
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._file = open(path, "xb", buffering=0)  # noqa: SIM115 (closed in finish/abort)
        try:
            with open(like.source, "rb") as source:
                if os.fstat(source.fileno()).st_size != like.size:
                    raise InputError(changed_message(like.source))
                self._copy_unchanged(source.fileno())
        except BaseException:
            self._file.close()
            raise

    def write(self, name: str, start: int, tensor) -> None:
        """Write a contiguous CPU tensor's bytes into averaged tensor `name`, `start` bytes into it.

        Other names (weights copied as they are, a tied tensor's second name) are in the copy already.
        """
        progress = self._progress.get(name)
        if progress is None or tensor.numel() == 0:
            return
        import torch

        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        if start != progress.written or start + raw.nbytes > progress.region.nbytes:
            raise OutputError(f"{self.label}: tensor '{name}' was not written in order (internal error)")
        write_at(self._file.fileno(), memoryview(raw), progress.region.offset + start, self.label)
        progress.crc = zlib.crc32(raw, progress.crc)
        progress.written += raw.nbytes

    def finish(self) -> None:
        """Check every averaged byte was written, put each rewritten record's CRC-32 in place, flush."""
        for progress in self._progress.values():
            if progress.written != progress.region.nbytes:
                raise OutputError(
                    f"{self.label}: wrote {progress.written} of {progress.region.nbytes} bytes of tensor "
                    f"'{progress.region.name}' (internal error)"
                )
        fd = self._file.fileno()
        for record in self._like.records:
            gaps = iter(self._gaps[record.record])
            pieces = [next(gaps)]
            for region in record.regions:
                progress = self._progress[region.name]
                pieces += [(progress.crc, region.nbytes), next(gaps)]
            crc = struct.pack("<I", joined(pieces))
            for offset in record.crc_offsets:
                write_at(fd, memoryview(crc), offset, self.label)
        try:
            os.fsync(fd)
        except OSError as e:
            raise OutputError(f"{self.label}: cannot flush the output: {e.strerror or e}") from e
        self._file.close()

    def abort(self) -> None:
        self._file.close()

    def _copy_unchanged(self, source: int) -> None:
        """Copy every byte but the averaged regions; note the CRC-32 of those inside rewritten records
        (one before each region and one after the last, maybe empty)."""
        position = 0
        for record in self._like.records:
            self._copy(source, position, record.start)
            gaps = self._gaps[record.record] = []
            position = record.start
            for region in record.regions:
                gaps.append(self._copy_reading(source, position, region.offset))
                position = region.offset + region.nbytes
            gaps.append(self._copy_reading(source, position, record.start + record.size))
            position = record.start + record.size
        self._copy(source, position, self._like.size)

    def _copy(self, source: int, begin: int, end: int) -> None:
        """Copy bytes [begin, end) of the source to the same place in the output."""
        while begin < end and self._kernel_copy:
            interrupts.check()
            try:
                count = os.copy_file_range(
                    source, self._file.fileno(), min(COPY_PIECE, end - begin), begin, begin
                )
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise OutputError(f"{self.label}: write failed: {e.strerror or e}") from e
                self._kernel_copy = False  # not between these file systems: through a buffer instead
                break
            if count == 0:
                raise InputError(changed_message(self._like.source))
            begin += count
        if begin < end:
            self._copy_reading(source, begin, end)

    def _copy_reading(self, source: int, begin: int, end: int) -> tuple[int, int]:
        """Copy bytes [begin, end) through a small buffer; their CRC-32 and length."""
        crc, length = 0, end - begin
        while begin < end:
            interrupts.check()
            piece = os.pread(source, min(READ_PIECE, end - begin), begin)
            if not piece:
                raise InputError(changed_message(self._like.source))
            write_at(self._file.fileno(), memoryview(piece), begin, self.label)
            crc = zlib.crc32(piece, crc)
            begin += len(piece)
        return crc, length
