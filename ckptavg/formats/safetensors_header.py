"""The safetensors header: what ckptavg writes before the data of each output file.

8 bytes of little-endian header length, then JSON: `__metadata__` (strings), and
for each tensor its dtype, shape and `data_offsets` relative to the end of the
header. Tensors are laid out as `safetensors.save_file` lays them out (largest
dtype first, then by name, header padded to 8 bytes), which keeps every tensor
aligned for zero-copy loading.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import OutputError
from . import dtypes

HEADER_ALIGNMENT = 8


METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class Entry:
    """One tensor of an output file, in write order."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return dtypes.TensorInfo(self.dtype, self.shape).nbytes


def layout_order(entries: Iterable[Entry]) -> list[Entry]:
    """The order `safetensors.save_file` uses (by its dtype rank, then name): larger dtypes first."""
    return sorted(entries, key=lambda e: (-dtypes.layout_rank(e.dtype), e.name))


def encode_header(entries: Sequence[Entry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length prefix and padded JSON header for tensors written in `entries` order."""
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = metadata
    offset = 0
    for entry in entries:
        if entry.name == METADATA_KEY:
            raise OutputError(f"a tensor is named '{METADATA_KEY}', which safetensors reserves; rename it")
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text
