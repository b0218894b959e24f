"""Output files written by several ranks at once: created whole by rank 0, filled in by every rank.

Every offset of a safetensors file follows from the plan (`encode_header`), so
rank 0 writes the header and sets the file to its full size, and each rank
writes the bytes of its share at their offsets (`pwrite`): disjoint ranges of
the same file, on a file system every rank shares. The file is then the same,
byte for byte, as the one a single process writes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import OutputError
from ..formats.safetensors_header import Entry, data_starts, encode_header
from .direct import write_at
from .writer import WRITEBACK_BYTES, _start_writeback

SEEN_WAIT_SECONDS = 5.0  # how long a rank looks for a file rank 0 made (a network file system's caches)


def create(path: Path, entries: Sequence[Entry], metadata: dict[str, str], label: Path) -> None:
    """Rank 0: the file with its header, at its full size, for the ranks to fill in."""
    header = encode_header(entries, metadata)
    try:
        with open(path, "xb") as f:
            f.write(header)
            f.truncate(len(header) + sum(entry.nbytes for entry in entries))
    except OSError as e:
        raise OutputError(f"{label}: cannot create it: {e.strerror or e}") from e


def wait_until_seen(path: Path) -> bool:
    """Whether `path` (made by rank 0) is there, looking again for a few seconds."""
    deadline = time.monotonic() + SEEN_WAIT_SECONDS
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class SharedWriter:
    """Writes this rank's bytes into an output file rank 0 created (`create`); `finish` checks that
    all of them were written and flushes them to disk."""

    def __init__(
        self, path: Path, entries: Sequence[Entry], metadata: dict[str, str], label: Path, expected: int
    ):
        self.label = label
        self._offsets = self.data_offsets(entries, metadata)
        self._expected = expected
        self._written = 0
        self._unflushed = 0
        try:
            self._fd = os.open(path, os.O_WRONLY)
        except OSError as e:
            raise OutputError(f"{label}: cannot open its temporary file {path}: {e.strerror or e}") from e

    def data_offsets(self, entries: Sequence[Entry], metadata: dict[str, str]) -> dict[str, int]:
        """Where each tensor's bytes start in the file: past the header, back to back."""
        return data_starts(entries, len(encode_header(entries, metadata)))

    def write(self, name: str, start: int, tensor) -> None:
        """Write a contiguous CPU tensor's bytes into tensor `name`, `start` bytes into its data."""
        if tensor.numel() == 0:
            return
        import torch

        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        self._written += raw.nbytes
        if self._written > self._expected:
            raise OutputError(f"{self.label}: more data than this rank's share (internal error)")
        write_at(self._fd, memoryview(raw), self._offsets[name] + start, self.label)
        self._unflushed += raw.nbytes
        if self._unflushed >= WRITEBACK_BYTES:
            _start_writeback(self._fd)
            self._unflushed = 0

    def finish(self) -> None:
        if self._written != self._expected:
            raise OutputError(
                f"{self.label}: wrote {self._written} of this rank's {self._expected} bytes (internal error)"
            )
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise OutputError(f"{self.label}: cannot flush it to disk: {e.strerror or e}") from e
        self.abort()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
