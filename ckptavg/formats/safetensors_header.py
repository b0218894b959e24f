"""The safetensors header: what ckptavg writes before the data of each output file.

8 bytes of little-endian header length, then JSON: `__metadata__` (strings), and
for each tensor its dtype, shape and `data_offsets` relative to the end of the
header. Tensors are laid out as `safetensors.save_file` lays them out (largest
dtype first, then by name, header padded to 8 bytes), which keeps every tensor
aligned for zero-copy loading.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import InputError, OutputError
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
    starts = data_starts(entries, 0)
    for entry in entries:
        if entry.name == METADATA_KEY:
            raise OutputError(f"a tensor is named '{METADATA_KEY}', which safetensors reserves; rename it")
        start = starts[entry.name]
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [start, start + entry.nbytes],
        }
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def data_starts(entries: Sequence[Entry], header_bytes: int) -> dict[str, int]:
    """Where each tensor's bytes start in the file: past the header, back to back in write order."""
    starts, offset = {}, header_bytes
    for entry in entries:
        starts[entry.name] = offset
        offset += entry.nbytes
    return starts


# safetensors' own limit on the header (`MAX_HEADER_SIZE`): a larger length is a damaged file.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file as its header describes it; `begin`/`end` are absolute."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path, file, start: int = 0) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors and metadata of an open safetensors file, checked as safetensors checks them
    (one that starts `start` bytes into the file and runs to its end, such as DCP writes; its
    offsets are then relative to `start`).

    One parse, by the rules safetensors applies when it opens a file (header length,
    UTF-8 JSON object, string metadata, integer shapes and offsets, tensors tiling the
    data without gap or overlap up to the end of the file), and stricter where two
    readers could disagree: a name listed twice is refused, as is a dtype or a shape
    ckptavg cannot average.

    Raises:
        InputError: the file is not a readable safetensors file, naming what is wrong.
    """
    size = (file.size if hasattr(file, "size") else os.fstat(file.fileno()).st_size) - start  # remote: .size
    file.seek(start)

    def damaged(reason: str) -> InputError:
        return InputError(f"{path}: not a readable safetensors file ({reason})")

    if size < 8:
        raise damaged("shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", file.read(8))
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise damaged(f"header length {length} does not fit the file of {size} bytes")
    text = file.read(length)
    if not text.startswith(b"{"):
        raise damaged("the header is not a JSON object")
    try:
        entries = json.loads(
            text.decode("utf-8"), object_pairs_hook=_refuse_repeated_names, parse_int=_signed_as_float
        )
    except _RepeatedName as e:
        raise damaged(f"its header lists '{e}' twice, and readers may take either entry") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise damaged(f"the header is not JSON: {e}") from e
    metadata = entries.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise damaged("its metadata is not a map of strings")
    start = 8 + length
    tensors = {name: _stored_tensor(path, name, entry, start, damaged) for name, entry in entries.items()}
    end = start
    for name, tensor in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if tensor.begin != end:
            raise damaged(f"tensor '{name}' does not start where the one before it ends")
        end = tensor.end
    if end != size:
        raise damaged(f"its tensors end at byte {end}, the file at byte {size}")
    return tensors, metadata


def _stored_tensor(path, name: str, entry, start: int, damaged) -> StoredTensor:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise damaged(f"tensor '{name}' lacks its dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise damaged(f"tensor '{name}' has shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise damaged(f"tensor '{name}' has data_offsets {offsets!r}")
    if not isinstance(dtype, str) or not dtypes.is_known(dtype):
        raise InputError(f"{path}: tensor '{name}' has dtype {dtype}, which ckptavg cannot average")
    if not dtypes.addressable(dtype, tuple(shape)):
        raise InputError(
            f"{path}: tensor '{name}' has shape {shape}, too large for any tensor even with its zero "
            "dimensions (the header is damaged); save the checkpoint again"
        )
    begin, end = offsets
    if end - begin != dtypes.TensorInfo(dtype, tuple(shape)).nbytes:
        raise damaged(f"tensor '{name}' has a byte range that does not fit its shape")
    return StoredTensor(dtype, tuple(shape), start + begin, start + end)


def _signed_as_float(text: str) -> int | float:
    """JSON integers as safetensors reads them: `-0` (and any signed number) is not a count."""
    return float(text) if text.startswith("-") else int(text)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


class _RepeatedName(ValueError):
    pass


def _refuse_repeated_names(pairs: list[tuple[str, object]]) -> dict:
    """Each JSON object of the header, refused when it repeats a name, or has a string that is not
    UTF-8 (JSON's `\\ud800` escapes, which Python decodes and safetensors refuses)."""
    for name, value in pairs:
        for text in (name, value) if isinstance(value, str) else (name,):
            text.encode("utf-8")  # UnicodeEncodeError is a ValueError: "not JSON"
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise _RepeatedName(next(name for name in names if names.count(name) > 1))
    return dict(pairs)
