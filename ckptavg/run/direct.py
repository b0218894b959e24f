"""Appending to a file past the page cache (`O_DIRECT`), for outputs written front to back.

Written normally, every output byte is first copied into the page cache, and
the kernel then spends more CPU writing those pages back. On 2 cores that is
CPU the sums need: with the output written with `O_DIRECT`, the sums get every
core and whole runs are faster (see the README's benchmark). `O_DIRECT` asks
for aligned memory, offsets and lengths, so appended bytes are gathered into
page-aligned staging buffers, and an I/O thread writes each full one while the
next fills. What is still staged at the end (less than a buffer) is handed back
to be written the ordinary way.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from ..errors import OutputError
from ..memory import STAGING_BUFFERS, STAGING_BYTES
from .pipeline import BufferPool, WriteQueue


def write_at(fd: int, data: memoryview, offset: int, label: Path) -> None:
    """Write all of `data` at `offset` (`pwrite` may write less than asked); errors name `label`."""
    while data:
        try:
            count = os.pwrite(fd, data, offset)
        except OSError as e:
            raise OutputError(f"{label}: write failed: {e.strerror or e}") from e
        data = data[count:]
        offset += count


class DirectAppender:
    """Appends bytes to a file from offset 0 with `O_DIRECT`; `position` is where the next byte goes.

    The first bytes (a header, say) wait in memory until more follow, so a file
    that is opened early but written later holds no staging buffer meanwhile.
    """

    def __init__(self, fd: int, label: Path, first_bytes: bytes):
        self.label = label  # the file's name in error messages
        self.position = len(first_bytes)
        self._fd = fd
        self._waiting = first_bytes
        # anonymous maps are page-aligned
        self._buffers = BufferPool(lambda: mmap.mmap(-1, STAGING_BYTES), STAGING_BUFFERS)
        self._buffer: mmap.mmap | None = None
        self._base = 0  # file offset of the current buffer's first byte
        self._fill = 0
        self._io: WriteQueue | None = None

    @classmethod
    def open(cls, path: Path, first_bytes: bytes, label: Path) -> DirectAppender | None:
        """An appender for the existing, empty file `path`; None where its file system refuses O_DIRECT."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | flag)
        except OSError:  # tmpfs and some network file systems refuse it: write normally
            return None
        return cls(fd, label, first_bytes)

    def append(self, data: memoryview) -> None:
        if self._waiting:
            waiting, self._waiting = self._waiting, b""
            self._stage(memoryview(waiting))
        self._stage(data)
        self.position += len(data)

    def close(self) -> tuple[memoryview, int]:
        """Wait for the direct writes; returns the bytes still staged and their offset, to write normally."""
        try:
            if self._io is not None:
                self._io.drain()
        finally:
            self._stop(failed=False)
        if self._waiting:
            return memoryview(self._waiting), 0
        if self._buffer is None:
            return memoryview(b""), self._base
        return memoryview(self._buffer)[: self._fill], self._base

    def abort(self) -> None:
        """Stop without writing what is queued (the file is being thrown away)."""
        self._stop(failed=True)

    def _stage(self, data: memoryview) -> None:
        while data:
            if self._buffer is None:
                self._buffer = self._buffers.acquire()
            count = min(len(data), STAGING_BYTES - self._fill)
            self._buffer[self._fill : self._fill + count] = data[:count]
            self._fill += count
            data = data[count:]
            if self._fill == STAGING_BYTES:
                self._submit(self._buffer, self._base)
                self._buffer = None
                self._base += STAGING_BYTES
                self._fill = 0

    def _submit(self, buffer: mmap.mmap, offset: int) -> None:
        if self._io is None:
            self._io = WriteQueue().__enter__()
        self._io.submit(
            write_at,
            self._fd,
            memoryview(buffer),
            offset,
            self.label,
            release=lambda: self._buffers.release(buffer),
        )

    def _stop(self, *, failed: bool) -> None:
        try:
            if self._io is not None:
                self._io.__exit__(OutputError if failed else None, None, None)
                self._io = None
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
