"""The `.metadata` file of a torch.distributed.checkpoint (DCP) folder, read without running code.

DCP pickles a `Metadata` dataclass and its own reader loads it with plain `pickle.load`, so a
crafted file runs code. Here the pickle is read by an unpickler that knows only what DCP metadata
is made of (its dataclasses, `torch.Size`, dtypes, layouts, the memory-format enum, paths) and
refuses any other name; each known class is rebuilt as a plain record of the fields pickled for it
(nothing of torch's classes runs), then checked and turned into `DcpMetadata`.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"
_RECORDS = {
    (_METADATA_MODULE, "Metadata"),
    (_METADATA_MODULE, "TensorStorageMetadata"),
    (_METADATA_MODULE, "ChunkStorageMetadata"),
    (_METADATA_MODULE, "TensorProperties"),
    (_METADATA_MODULE, "BytesStorageMetadata"),
    (_METADATA_MODULE, "StorageMeta"),
    (_METADATA_MODULE, "MetadataIndex"),
    (_FILESYSTEM_MODULE, "_StorageInfo"),
}


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it starts in the whole tensor, and its shape."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    dtype: object  # torch.dtype
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Stored:
    """Where DCP put an item: a file of the folder, and a byte range of it."""

    file: str
    offset: int
    length: int
    transforms: tuple[str, ...]


@dataclass(frozen=True)
class DcpMetadata:
    """What a DCP `.metadata` says.

    Attributes:
        tensors: flattened key -> `TensorEntry`.
        others: flattened keys of non-tensor items (saved as bytes).
        paths: flattened key -> its path in the nested state dict that was saved (planner data),
            where the file records it.
        storage: (key, chunk offsets, or None for bytes) -> `Stored`.
    """

    tensors: dict[str, TensorEntry]
    others: tuple[str, ...]
    paths: dict[str, tuple[str, ...]] | None
    storage: dict[tuple[str, tuple[int, ...] | None], Stored]


class _Record:
    """A known DCP class, rebuilt as the data pickled for it (never torch's class itself)."""

    kind = ""
    args: tuple = ()  # given when pickled as a call; NEWOBJ makes the record without calling it
    state: object = None

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def field(self, name: str, position: int, default=None):
        """A field, from a pickled `__dict__` (or a tuple state, at `position`) or the constructor."""
        if isinstance(self.state, dict):
            return self.state.get(name, default)
        if isinstance(self.state, tuple) and position < len(self.state):
            return self.state[position]
        return self.args[position] if position < len(self.args) else default


def _record_class(name: str) -> type:
    return type(name, (_Record,), {"kind": name})


def _path(*parts) -> str:
    return "/".join(str(part) for part in parts)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path
        self._classes = {key: _record_class(key[1]) for key in _RECORDS}

    def find_class(self, module: str, name: str):
        import torch

        if (module, name) in self._classes:
            return self._classes[(module, name)]
        if (module, name) == (_METADATA_MODULE, "_MEM_FORMAT_ENCODING"):
            return int
        if (module, name) == ("torch", "Size"):
            return tuple
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in ("torch._utils", "torch.serialization") and name == "_get_layout":
            return str
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            return _path
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise InputError(
            f"{self._path}: its metadata names {module}.{name}, which DCP metadata is not made of; "
            "ckptavg does not load it (a crafted checkpoint could run code)"
        )

    def persistent_load(self, pid):
        raise InputError(
            f"{self._path}: its metadata refers to outside objects, which DCP metadata never does"
        )


def read_metadata(path: Path) -> DcpMetadata:
    """The checked content of a DCP `.metadata` file.

    Raises:
        InputError: missing, damaged, naming classes DCP metadata is not made of, or not the
            structure DCP writes.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from e
    try:
        root = _Unpickler(io.BytesIO(data), path).load()
    except InputError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RecursionError,
        MemoryError,
        UnicodeDecodeError,
    ) as e:
        raise InputError(f"{path}: not a readable DCP metadata file ({type(e).__name__}: {e})") from e
    try:
        return _checked(root)
    except (_Malformed, TypeError, ValueError) as e:
        raise InputError(f"{path}: not the metadata DCP writes ({e}); the checkpoint is damaged") from e


class _Malformed(ValueError):
    pass


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise _Malformed(what)


def _counts(value, what: str) -> tuple[int, ...]:
    _require(
        isinstance(value, tuple | list)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value),
        f"{what} is {value!r}",
    )
    return tuple(value)


def _checked(root) -> DcpMetadata:
    import torch

    _require(isinstance(root, _Record) and root.kind == "Metadata", "no Metadata record")
    entries = root.field("state_dict_metadata", 0)
    _require(isinstance(entries, dict), "no state_dict_metadata")
    tensors, others = {}, []
    for key, entry in entries.items():
        _require(isinstance(key, str), f"key {key!r}")
        _require(isinstance(entry, _Record), f"'{key}' is {type(entry).__name__}")
        if entry.kind == "BytesStorageMetadata":
            others.append(key)
            continue
        _require(entry.kind == "TensorStorageMetadata", f"'{key}' is a {entry.kind}")
        properties = entry.field("properties", 0)
        _require(
            isinstance(properties, _Record) and properties.kind == "TensorProperties", f"'{key}' properties"
        )
        dtype = properties.field("dtype", 0)
        _require(isinstance(dtype, torch.dtype), f"'{key}' has dtype {dtype!r}")
        size = _counts(entry.field("size", 1), f"'{key}' size")
        chunks = entry.field("chunks", 2)
        _require(isinstance(chunks, list), f"'{key}' chunks")
        found = []
        for chunk in chunks:
            _require(isinstance(chunk, _Record) and chunk.kind == "ChunkStorageMetadata", f"'{key}' chunk")
            offsets = _counts(chunk.field("offsets", 0), f"'{key}' chunk offsets")
            sizes = _counts(chunk.field("sizes", 1), f"'{key}' chunk sizes")
            _require(len(offsets) == len(sizes) == len(size), f"'{key}' chunk of {len(sizes)} dims")
            found.append(Chunk(offsets, sizes))
        tensors[key] = TensorEntry(dtype, size, tuple(found))
    return DcpMetadata(tensors, tuple(others), _paths(root.field("planner_data", 1)), _storage(root))


def _paths(planner_data) -> dict[str, tuple[str, ...]] | None:
    if not isinstance(planner_data, dict):
        return None
    paths = {}
    for key, path in planner_data.items():
        if isinstance(key, str) and isinstance(path, tuple | list):
            paths[key] = tuple(str(part) for part in path)
    return paths


def _storage(root) -> dict[tuple[str, tuple[int, ...] | None], Stored]:
    storage = root.field("storage_data", 2)
    _require(isinstance(storage, dict), "no storage_data of files")
    found = {}
    for index, info in storage.items():
        _require(isinstance(index, _Record) and index.kind == "MetadataIndex", "storage_data key")
        fqn, offset = index.field("fqn", 0), index.field("offset", 1)
        _require(isinstance(fqn, str), f"storage_data key {fqn!r}")
        offsets = None if offset is None else _counts(offset, f"'{fqn}' storage offsets")
        _require(isinstance(info, _Record) and info.kind == "_StorageInfo", f"'{fqn}' storage info")
        file, start, length = info.field("relative_path", 0), info.field("offset", 1), info.field("length", 2)
        transforms = info.field("transform_descriptors", 3) or ()
        _require(isinstance(file, str), f"'{fqn}' file {file!r}")
        _counts((start, length), f"'{fqn}' byte range")
        _require(isinstance(transforms, tuple | list), f"'{fqn}' transforms")
        found[(fqn, offsets)] = Stored(file, start, length, tuple(str(t) for t in transforms))
    return found
