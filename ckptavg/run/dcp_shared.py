"""A DCP output (`format=dcp`) written by several ranks at once: its `.distcp` file laid out and
created whole by rank 0, each tensor's bytes written in place by the rank whose share holds them.

The file's layout follows from the plan alone (`DcpLayout`), whatever the number of
ranks: rank 0 writes the provenance and each archive's records before its data and
sets the file to its full size (`create`); each rank writes its share's bytes at their
offsets and keeps the CRC-32 of every contiguous piece it wrote (`SharedDcpWriter`);
once every rank's part is on disk, rank 0 joins each tensor's pieces into its data
record's CRC-32 (`crc32.joined`), writes the records after the data and the
directories, then `.metadata` (`complete`). The file is then the one a single process
writes, byte for byte.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

from ..errors import OutputError
from ..formats.safetensors_header import Entry
from . import crc32
from .dcp_writer import DcpLayout
from .shared import SharedWriter

Pieces = dict[str, list[list[int]]]  # tensor -> [start, CRC-32, length] of each piece, in bytes


def create(path: Path, entries: Sequence[Entry], metadata: dict[str, str], label: Path) -> None:
    """Rank 0: the `.distcp` file with everything but the tensors' bytes and what follows them."""
    layout = DcpLayout(entries, metadata)
    try:
        with open(path, "xb", buffering=0) as f:
            layout.write_heads(f.fileno(), label)
            f.truncate(layout.size)
    except OSError as e:
        raise OutputError(f"{label}: cannot create it: {e.strerror or e}") from e


class SharedDcpWriter(SharedWriter):
    """Writes this rank's bytes into the `.distcp` file rank 0 created (`create`), keeping the
    CRC-32 of each piece (`pieces`) for rank 0 to join."""

    def __init__(
        self, path: Path, entries: Sequence[Entry], metadata: dict[str, str], label: Path, expected: int
    ):
        self._layout = DcpLayout(entries, metadata)
        self.pieces: Pieces = {}
        super().__init__(path, entries, metadata, label, expected)

    def data_offsets(self, entries: Sequence[Entry], metadata: dict[str, str]) -> dict[str, int]:
        return {name: archive.data for name, archive in self._layout.archives.items()}

    def write(self, name: str, start: int, tensor) -> None:
        if tensor.numel() == 0:
            return
        import torch

        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        if start + raw.nbytes > self._layout.archives[name].nbytes:
            raise OutputError(f"{self.label}: more bytes than tensor '{name}' holds (internal error)")
        super().write(name, start, tensor)
        pieces = self.pieces.setdefault(name, [])
        if pieces and pieces[-1][0] + pieces[-1][2] == start:  # continues the last piece
            pieces[-1][1] = zlib.crc32(raw, pieces[-1][1])
            pieces[-1][2] += raw.nbytes
        else:
            pieces.append([start, zlib.crc32(raw), raw.nbytes])


def complete(
    path: Path,
    entries: Sequence[Entry],
    metadata: dict[str, str],
    key: str | None,
    label: Path,
    pieces: Sequence[Pieces],
) -> None:
    """Rank 0, once every rank's part is on disk: each archive completed with its CRC-32, joined from
    every rank's `pieces`, the file flushed, then `.metadata` written."""
    layout = DcpLayout(entries, metadata)
    crcs = {}
    for name, archive in layout.archives.items():
        found = sorted(piece for ranks in pieces for piece in ranks.get(name, ()))
        covered = 0
        for start, _, length in found:
            if start != covered:
                break
            covered += length
        if covered != archive.nbytes:
            raise OutputError(
                f"{label}: the ranks wrote {covered} of the {archive.nbytes} bytes of '{name}' in "
                "order (internal error)"
            )
        crcs[name] = crc32.joined((crc, length) for _, crc, length in found)
    try:
        with open(path, "r+b", buffering=0) as f:
            layout.write_tails(f.fileno(), crcs, label)
            os.fsync(f.fileno())
        layout.write_metadata(path, key)
    except OSError as e:
        raise OutputError(f"{label}: cannot complete it: {e.strerror or e}") from e
