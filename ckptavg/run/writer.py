"""The streaming safetensors writer: the header first, then each tensor's bytes as they come.

`safetensors` can only save a dict held entirely in memory, so this module
writes the format itself (see `formats.safetensors_header`): every offset is
known from the plan, so the header goes first and each chunk is written as
soon as it is computed. The atomic commit of the files is `transaction`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from ..errors import OutputError
from ..formats.safetensors_header import Entry, data_starts, encode_header
from .direct import DirectAppender, write_at

# Start the disk writing every this many bytes: the kernel would otherwise wait for
# gigabytes of dirty pages, and the final fsync would then wait for all of them.
WRITEBACK_BYTES = 64 * 2**20
_SYNC_FILE_RANGE_WRITE = 2


class SafetensorsWriter:
    """Writes one safetensors file: the header, then each tensor's bytes at its offset.

    Bytes that arrive in file order, as the engine hands them out, are appended
    past the page cache (see `direct`) where the file system allows it. The
    first write elsewhere (a tied weight's copy) ends that: from then on writes
    are positioned (`pwrite`) through the page cache, so a chunk can go to
    several tensors and the order of writes does not matter. `finish` checks
    that every declared byte was written.
    """

    def __init__(
        self, path: Path, entries: Sequence[Entry], metadata: dict[str, str], label: Path | None = None
    ):
        self.path = path
        self.label = label or path  # the file's name in error messages: the output, not its temporary name
        header = encode_header(entries, metadata)
        self._expected = sum(entry.nbytes for entry in entries)
        self._written = 0
        self._unflushed = 0
        self._offsets = data_starts(entries, len(header))
        self._file = open(path, "xb", buffering=0)  # noqa: SIM115 (closed in finish/abort)
        self._direct = DirectAppender.open(path, header, self.label)
        if self._direct is None:
            self._write_all(memoryview(header), 0)

    @property
    def direct(self) -> bool:
        """Whether bytes written now bypass the page cache."""
        return self._direct is not None

    def write(self, name: str, start: int, tensor) -> None:
        """Write a contiguous CPU tensor's bytes into tensor `name`, `start` bytes into its data."""
        if tensor.numel() == 0:
            return
        import torch

        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        self._written += raw.nbytes
        if self._written > self._expected:
            raise OutputError(f"{self.label}: more data than the header declares (internal error)")
        offset = self._offsets[name] + start
        if self._direct is not None:
            if offset == self._direct.position:
                self._direct.append(memoryview(raw))
                return
            self._end_direct()
        self._write_all(memoryview(raw), offset)
        self._unflushed += raw.nbytes
        if self._unflushed >= WRITEBACK_BYTES:
            _start_writeback(self._file.fileno())
            self._unflushed = 0

    def finish(self) -> None:
        """Check every declared byte was written, then flush to disk."""
        if self._written != self._expected:
            raise OutputError(
                f"{self.label}: wrote {self._written} of {self._expected} data bytes (internal error)"
            )
        if self._direct is not None:
            self._end_direct()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        try:
            if self._direct is not None:
                self._direct.abort()
        finally:
            self._file.close()

    def _end_direct(self) -> None:
        """Stop appending past the page cache; what was still staged is written the ordinary way."""
        direct, self._direct = self._direct, None
        staged, offset = direct.close()
        self._write_all(staged, offset)

    def _write_all(self, data: memoryview, offset: int) -> None:
        write_at(self._file.fileno(), data, offset, self.label)


@cache
def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none.

    Looked up among the symbols already loaded into the process: `find_library`
    would run `ldconfig -p` in a child process on every run.
    """
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux: no such call, or no process handle
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting for them (a hint only)."""
    function = _sync_file_range()
    if function is not None:
        function(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
