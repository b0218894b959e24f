"""Checkpoint readers: names, dtypes and shapes up front, tensors on demand.

Headers are read and validated by `safetensors.safe_open` (offsets tile the
data, sizes match the file). Data is read from one private memory map per file:
`Checkpoint.get` slices it at the tensor's offsets, a zero-copy view that costs
no memory beyond page cache, and ~10x less per call than `safe_open.get_tensor`
(which matters for models with thousands of small tensors). Callers must never
write into a returned tensor (the pages would turn into private copies).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

from . import dtypes
from .dtypes import TensorInfo
from .errors import InputError
from .sources import INDEX_SUFFIX


class Checkpoint:
    """One input checkpoint, whole: a single file or every shard of a sharded one.

    Attributes:
        path: the file the user's spec resolved to (a `.safetensors` file or an index).
        tensors: name -> `TensorInfo`, in the order the file lists them.
        metadata: the string metadata stored with the checkpoint.
    """

    def __init__(
        self,
        path: Path,
        tensors: dict[str, TensorInfo],
        metadata: dict[str, str],
        shard_of: dict[str, Path],
    ):
        self.path = path
        self.tensors = tensors
        self.metadata = metadata
        self._shard_of = shard_of
        self._mapped: dict[Path, _MappedFile] = {}

    @property
    def files(self) -> list[Path]:
        """Every file this checkpoint is made of: the given path and its shards."""
        return [self.path, *sorted(set(self._shard_of.values()) - {self.path})]

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def get(self, name: str):
        """The tensor `name` as a read-only, zero-copy view of the mapped file."""
        shard = self._shard_of[name]
        mapped = self._mapped.get(shard)
        if mapped is None:
            mapped = self._mapped[shard] = _MappedFile(shard)
        return mapped.get(name, self.tensors[name])

    def close(self) -> None:
        """Drop the maps; they are unmapped once no tensor view refers to them."""
        self._mapped.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"


class _MappedFile:
    """A safetensors file mapped once; tensors are views at their data offsets."""

    def __init__(self, path: Path):
        import torch

        self.path = path
        try:
            with open(path, "rb") as f:
                # ACCESS_COPY (MAP_PRIVATE, as safetensors maps): writable for torch, never written back.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot map the file: {e}") from e
        (header_length,) = struct.unpack("<Q", self._map[:8])
        header = json.loads(self._map[8 : 8 + header_length])
        start = 8 + header_length
        self._offsets = {
            name: (start + entry["data_offsets"][0], start + entry["data_offsets"][1])
            for name, entry in header.items()
            if name != "__metadata__"
        }
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def get(self, name: str, info: TensorInfo):
        begin, end = self._offsets[name]
        raw = self._bytes[begin:end]
        try:
            return raw.view(dtypes.torch_dtype(info.dtype)).view(info.shape)
        except RuntimeError:  # misaligned data (files from old writers): a copy, still correct
            return raw.clone().view(dtypes.torch_dtype(info.dtype)).view(info.shape)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a `.safetensors` file or a sharded checkpoint's `*.safetensors.index.json`.

    Reads headers only; tensor data is read when `Checkpoint.get` is called.

    Raises:
        InputError: the file is missing, not valid safetensors, or an index
            names a shard or tensor that is not there.
    """
    path = Path(path)
    if path.name.endswith(INDEX_SUFFIX):
        return _open_sharded(path)
    tensors, metadata = _read_header(path)
    return Checkpoint(path, tensors, metadata, dict.fromkeys(tensors, path))


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise InputError(f"{path}: is a folder, not a safetensors file") from e
    except Exception as e:  # SafetensorError, OSError: the file is not what it should be
        raise InputError(f"{path}: not a readable safetensors file ({e})") from e


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    handle = _safe_open(path)
    tensors = {}
    for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
        view = handle.get_slice(name)
        dtype = view.get_dtype()
        if not dtypes.is_known(dtype):
            raise InputError(f"{path}: tensor '{name}' has dtype {dtype}, which ckptavg cannot average")
        tensors[name] = TensorInfo(dtype, tuple(view.get_shape()))
    return tensors, dict(handle.metadata() or {})


def _open_sharded(index_path: Path) -> Checkpoint:
    weight_map = _read_weight_map(index_path)
    tensors: dict[str, TensorInfo] = {}
    shard_of: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_path.parent / shard_name
        if not shard.is_file():
            raise InputError(f"{index_path}: names shard {shard_name}, which does not exist")
        shard_tensors, shard_metadata = _read_header(shard)
        metadata = metadata or shard_metadata
        for name, info in shard_tensors.items():
            if weight_map.get(name) == shard_name:
                tensors[name] = info
                shard_of[name] = shard
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise InputError(
            f"{index_path}: tensor '{missing[0]}' is not in {weight_map[missing[0]]}"
            + (f" ({len(missing) - 1} more tensors missing)" if len(missing) > 1 else "")
        )
    ordered = {name: tensors[name] for name in weight_map}
    return Checkpoint(index_path, ordered, metadata, shard_of)


def _read_weight_map(index_path: Path) -> dict[str, str]:
    def no_duplicates(pairs):
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise InputError(f"{index_path}: tensor '{key}' is listed twice")
            seen[key] = value
        return seen

    try:
        index = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except FileNotFoundError as e:
        raise InputError(f"{index_path}: no such file") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{index_path}: not a valid shard index ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index_path}: not a valid shard index (no 'weight_map' of names to files)")
    return weight_map
