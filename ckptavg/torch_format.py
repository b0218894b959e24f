"""Torch checkpoints (`.pt .pth .bin .ckpt`): find the weights, never run code.

Files are read with `torch.load(weights_only=True, mmap=True)`: lazy for the
zip format (an optimizer state next to the weights is never read into memory)
and unable to run code hidden in a pickle. A few data-only classes that common
training scripts put next to the weights (the `args` Namespace of torchvision's
reference scripts, Lightning's `AttributeDict` of hyper-parameters, paths, numpy
scalars) are allowed by name; any other class is refused, and named.

`torch.load` trusts the archive: a tensor whose storage record is shorter than
the tensor silently reads the zip bytes that follow it. So before loading, the
zip directory is checked (every record inside the file, stored, not overlapping
another) and the pickle is unpickled once more, by torch's weights-only
unpickler, onto meta-device storages: that names each weight's record and its
declared size, and shows sparse or quantized tensors, without reading any data.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import itertools
import os
import pathlib
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")  # .pth.tar: timm's train.py
# Where training loops keep the weights, in the order they are looked for.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "params")


def _data_only_globals() -> list:
    """Classes that only hold data, allowed by their pickled name; nothing else is."""
    import numpy

    allowed: list = [
        argparse.Namespace,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
        numpy.dtype,
        # Lightning's AttributeDict (a dict of hyper-parameters), read as a plain OrderedDict.
        (collections.OrderedDict, "lightning.fabric.utilities.data.AttributeDict"),
        (collections.OrderedDict, "lightning_fabric.utilities.data.AttributeDict"),
        (collections.OrderedDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
        (collections.OrderedDict, "lightning.pytorch.utilities.parsing.AttributeDict"),
    ]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed += [
        type(numpy.dtype(name)) for name in ("float64", "float32", "float16", "int64", "int32", "bool")
    ]
    return allowed


@dataclass
class TorchWeights:
    """The weights found in a torch file, and the numbers saved next to them."""

    tensors: dict  # name -> tensor: zero-copy views of the mapped file, each a plain dense tensor
    key: str | None  # where they were found (None: the file is a flat state dict)
    skipped: int  # non-tensor entries beside them
    scalars: dict[str, float]


def read_torch_weights(path: Path, key: str | None = None) -> TorchWeights:
    """The weights of a torch file, checked to be dense tensors whose bytes all lie in their records.

    Raises:
        InputError: the file is not a readable torch checkpoint, needs classes that
            could run code, is damaged (a record past the end of the file, a storage
            larger than its record), or a weight is sparse, quantized, nested or on
            the meta device (named in the message).
    """
    with _loading(path):
        unchecked = _check_archive(path, key) if _is_zip_archive(path) else None
        content = _load(path)
    tensors, used_key, skipped = find_state_dict(content, path, key)
    for name, tensor in tensors.items():
        refusal = unaverageable(tensor) or _not_on_cpu(tensor)
        if refusal:
            raise InputError(f"{path}: tensor '{name}' {refusal}")
    if unchecked:
        raise InputError(
            f"{path}: holds tensors whose storage ckptavg cannot check ({unchecked}); save the "
            "weights alone, e.g. torch.save(model.state_dict(), 'weights.pt'), or convert them to safetensors"
        )
    return TorchWeights(tensors, used_key, skipped, scalar_entries(content))


def unaverageable(tensor) -> str | None:
    """Why a tensor (real or meta) cannot be averaged element by element, or None for a plain one."""
    import torch

    if tensor.layout != torch.strided:
        layout = str(tensor.layout).removeprefix("torch.")
        return (
            f"is a sparse tensor ({layout}), which ckptavg cannot average; save it dense (tensor.to_dense())"
        )
    if tensor.is_quantized:
        return (
            f"is a quantized tensor ({tensor.dtype}), which ckptavg cannot average; "
            "save it dequantized (tensor.dequantize())"
        )
    if tensor.is_nested:
        return "is a nested tensor, which ckptavg cannot average; save its parts as separate tensors"
    return None


def _not_on_cpu(tensor) -> str | None:
    if tensor.device.type == "cpu":
        return None
    return f"is on the {tensor.device} device, so the file holds no values for it; save the real weights"


@contextlib.contextmanager
def _loading(path: Path):
    """Read a torch file with only the data-only classes allowed; any failure becomes one `InputError`."""
    import torch

    try:
        # torch warns about its own internals (TypedStorage, sparse checks): nothing for the user to do.
        with torch.serialization.safe_globals(_data_only_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ...
        unsafe = _unsafe_globals(path, e) if isinstance(e, pickle.UnpicklingError) else []
        if unsafe:
            raise InputError(
                f"{path}: refused: loading it needs {', '.join(unsafe)}, which could run code; ckptavg "
                "loads only plain weights (torch.load weights_only=True). Re-save the weights alone, "
                "e.g. torch.save(model.state_dict(), 'weights.pt'), or convert them to safetensors"
            ) from e
        raise InputError(
            f"{path}: not a readable torch checkpoint (damaged, or not saved by torch.save)"
        ) from e


def _load(path: Path) -> object:
    import torch

    try:
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except RuntimeError as e:
        if "mmap can only be used with files saved with" not in str(e):
            raise
        # Legacy (pre-1.6, non-zip) format: cannot be mapped, so it is read whole.
        return torch.load(path, mmap=False, weights_only=True, map_location="cpu")


def _is_zip_archive(path: Path) -> bool:
    """Whether torch will read the file as a zip archive (as `torch.serialization._is_zipfile` decides)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _check_archive(path: Path, key: str | None) -> str | None:
    """Refuse a damaged archive or unaverageable weights before torch maps any tensor.

    Returns:
        None once every weight is checked, or why the pickle has no meta-device form
        (quantized, nested tensors): then the weights are refused once loaded.
    """
    records, reader = _archive_records(path)
    try:
        skeleton, declared = _skeleton(reader)
    except NotImplementedError as e:
        return str(e).splitlines()[0]
    tensors, _, _ = find_state_dict(skeleton.content, path, key)
    for name, tensor in tensors.items():
        refusal = unaverageable(tensor) or _storage_problem(tensor, declared, records)
        if refusal:
            raise InputError(f"{path}: tensor '{name}' {refusal}")
    return None


def _storage_problem(tensor, declared: dict[int, tuple[str, int]], records: dict) -> str | None:
    """Why a skeleton tensor's record cannot back it: missing, or shorter than its declared storage."""
    storage = tensor.untyped_storage()
    if storage._cdata not in declared:  # rebuilt without a storage: the file's own meta tensor
        return "is on the meta device, so the file holds no values for it; save the real weights"
    name, nbytes = declared[storage._cdata]
    if name not in records:
        return (
            f"has its values in record '{name}', which the archive lacks; the file is damaged: save it again"
        )
    if nbytes > records[name].size:
        return (
            f"needs {nbytes} bytes but its record '{name}' holds {records[name].size}; the file is "
            "damaged (truncated or badly rewritten): save it again"
        )
    return None


@dataclass(frozen=True)
class _Record:
    """Where a zip record lies in the file, as torch's reader finds it."""

    header: int  # its local zip header
    start: int  # its bytes
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


def _archive_records(path: Path) -> tuple[dict[str, _Record], object]:
    """The records of a zip archive whose directory is sound, and torch's reader of it.

    Torch maps the file and takes a tensor's bytes at its record's offset: a record
    past the end of the file, compressed, or overlapping another would feed it other
    bytes (or pages past the end, which kill the process), so those are refused here.
    """
    import torch

    file_size = os.path.getsize(path)
    reader = torch._C.PyTorchFileReader(str(path))
    records = {}
    for name in reader.get_all_records():
        record = _Record(
            reader.get_record_header_offset(name),
            reader.get_record_offset(name),
            reader.get_record_size(name),
        )
        if record.end > file_size:
            raise InputError(
                f"{path}: record '{name}' ends at byte {record.end}, past the end of the file "
                f"({file_size} bytes); the file is truncated or damaged: copy or save it again"
            )
        records[name] = record
    directory_start = _check_zip_directory(path, records)
    ordered = sorted(records, key=lambda name: records[name].header)
    for name, following in itertools.pairwise(ordered):
        if records[name].end > records[following].header:
            raise InputError(f"{path}: records '{name}' and '{following}' overlap; the file is damaged")
    if ordered and records[ordered[-1]].end > directory_start:
        raise InputError(f"{path}: record '{ordered[-1]}' runs into the zip directory; the file is damaged")
    return records, reader


def _check_zip_directory(path: Path, records: dict[str, _Record]) -> int:
    """Python's zip reader must see the records torch sees, stored uncompressed; returns where the
    directory starts."""
    with zipfile.ZipFile(path) as archive:
        entries = archive.infolist()
        directory_start = archive.start_dir
    names = [entry.filename for entry in entries]
    if len(set(names)) != len(names) or len(names) != len(records):
        raise InputError(
            f"{path}: the zip directory lists records twice or inconsistently; the file is damaged"
        )
    for entry in entries:
        name = entry.filename.partition("/")[2]
        if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
            raise InputError(
                f"{path}: record '{name}' is compressed, and torch maps only stored records; the file was "
                "rewritten by another tool: save it again with torch.save"
            )
        record = records.get(name)
        if record is None or (record.header, record.size) != (entry.header_offset, entry.file_size):
            raise InputError(
                f"{path}: the zip directory's entry for '{name}' is inconsistent; the file is damaged"
            )
    return directory_start


@dataclass
class _Skeleton:
    content: object  # the unpickled checkpoint, every tensor on the meta device
    storages: list  # the meta storages, kept alive so that their addresses stay theirs


def _skeleton(reader) -> tuple[_Skeleton, dict[int, tuple[str, int]]]:
    """The checkpoint unpickled onto meta storages, and each storage's record and declared size.

    Runs torch's weights-only unpickler (no code runs, the allowed classes are those
    of `torch.load`) on `data.pkl` alone: no tensor byte is read.
    """
    import torch
    from torch import _weights_only_unpickler

    by_key: dict = {}
    declared: dict[int, tuple[str, int]] = {}  # meta storage address -> (record, largest size declared)

    def persistent_load(saved_id):
        _, storage_type, key, _, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = numel * dtype.itemsize
        if key not in by_key:  # as torch.load: the first declaration of a record makes its storage
            by_key[key] = torch.UntypedStorage(nbytes, device="meta")
        record, known = declared.get(by_key[key]._cdata, (f"data/{key}", 0))
        declared[by_key[key]._cdata] = (record, max(known, nbytes))
        return torch.storage.TypedStorage(wrap_storage=by_key[key], dtype=dtype, _internal=True)

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(reader.get_record("data.pkl")), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        content = unpickler.load()
    finally:
        torch._utils._sparse_tensors_to_validate.clear()  # meta tensors: nothing to validate, ever
    return _Skeleton(content, list(by_key.values())), declared


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The classes and functions a refused pickle asks for, beyond the allowed data-only ones."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) file: the error text names the first one
        names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    allowed = set(_names_of_allowed())
    return [name for name in names if name not in allowed]


def _names_of_allowed() -> list[str]:
    return [
        g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _data_only_globals()
    ]


def find_state_dict(content: object, path: Path, key: str | None = None) -> tuple[dict, str | None, int]:
    """The name -> tensor mapping inside a loaded checkpoint.

    A flat mapping of tensors is used as is; otherwise `key` (a dotted path such
    as `state_dict_ema` or `model.module`) or else the first of `STATE_DICT_KEYS`.

    Returns:
        (tensors by name, the key used or None, how many non-tensor entries were skipped)

    Raises:
        InputError: the key is missing, or no usual key holds the weights.
    """
    import torch

    if not isinstance(content, Mapping):
        raise InputError(f"{path}: holds a {type(content).__name__}, not a dict of weights")
    if key is not None:
        chosen = content
        for part in key.split("."):
            if not isinstance(chosen, Mapping) or part not in chosen:
                keys = ", ".join(repr(k) for k in list(content)[:8])
                raise InputError(f"{path}: has no '{key}' (top-level keys: {keys}); choose one with --key")
            chosen = chosen[part]
    elif any(isinstance(v, torch.Tensor) for v in content.values()) and not any(
        isinstance(content.get(k), Mapping) for k in STATE_DICT_KEYS
    ):
        chosen = content
    else:
        key = next((k for k in STATE_DICT_KEYS if isinstance(content.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(repr(k) for k in list(content)[:8])
            raise InputError(f"{path}: no weights found (top-level keys: {keys}); choose a key with --key")
        chosen = content[key]
    if not isinstance(chosen, Mapping):
        raise InputError(f"{path}: '{key}' holds a {type(chosen).__name__}, not a dict of weights")
    tensors = {str(name): value for name, value in chosen.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise InputError(f"{path}: '{key or 'the top level'}' holds no tensors; choose a key with --key")
    return tensors, key, len(chosen) - len(tensors)


def scalar_entries(content: object) -> dict[str, float]:
    """The numbers stored at the top of a checkpoint next to the weights (epoch, step, metrics)."""
    import torch

    if not isinstance(content, Mapping):
        return {}
    scalars = {}
    for key, value in content.items():
        if isinstance(value, torch.Tensor) and _is_plain_number(value):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[str(key)] = float(value)
    return scalars


def _is_plain_number(tensor) -> bool:
    """A one-element tensor whose value can be read (not meta, sparse or complex)."""
    return (
        tensor.device.type == "cpu"
        and unaverageable(tensor) is None
        and tensor.numel() == 1
        and not tensor.is_complex()
    )


def tied_groups(tensors: Mapping[str, object]) -> list[list[str]]:
    """Names that share the same memory (tied weights such as an embedding and an LM head).

    Each group lists names in the file's order, so the first is the one first saved.
    """
    groups: dict[tuple, list[str]] = {}
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        place = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        groups.setdefault(place, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def save_torch_file(
    safetensors_path: Path,
    path: Path,
    *,
    names: Sequence[str],
    wrap_key: str | None,
    metadata: Mapping[str, str],
) -> None:
    """`torch.save` the tensors of a finished safetensors file as a plain state dict, then fsync.

    The tensors are zero-copy views of the mapped file, so the state dict never
    sits in anonymous memory. With `wrap_key`, saves `{wrap_key: state_dict,
    "ckptavg": metadata}`; a plain state dict has nowhere to keep the metadata.
    """
    import os

    import torch
    from safetensors import safe_open

    with safe_open(safetensors_path, framework="pt") as f:
        # Empty tensors would share an address with their neighbour, which torch.save refuses.
        state = {}
        for name in names:
            tensor = f.get_tensor(name)
            state[name] = tensor if tensor.numel() else torch.empty(tensor.shape, dtype=tensor.dtype)
    content = {wrap_key: state, "ckptavg": dict(metadata)} if wrap_key else state
    with open(path, "xb") as out:
        torch.save(content, out)
        out.flush()
        os.fsync(out.fileno())
