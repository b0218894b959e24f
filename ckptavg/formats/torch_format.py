"""Torch checkpoints (`.pt .pth .bin .ckpt`): find the weights, never run code.

Zip archives are checked, unpickled by torch's weights-only unpickler and mapped
by `torch_archive` (an optimizer state next to the weights is never read), and
legacy files are read by `torch.load(weights_only=True)`: no code hidden in a
pickle can run. A few data-only classes that common training scripts put next
to the weights (the `args` Namespace of torchvision's reference scripts,
Lightning's `AttributeDict` of hyper-parameters, paths, numpy scalars) are
allowed by name; any other class is refused, and named.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import pathlib
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .torch_archive import TorchArchive, is_zip_archive

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

    A zip archive is read by `torch_archive` (checked, unpickled once, mapped); a
    legacy (pre-1.6) file by `torch.load`, whole, since it cannot be mapped.

    Raises:
        InputError: the file is not a readable torch checkpoint, needs classes that
            could run code, is damaged (a record past the end of the file, a storage
            larger than its record), or a weight is sparse, quantized, nested or on
            the meta device (named in the message).
    """
    with _loading(path):
        if not is_zip_archive(path):
            return _weights_in(path, _load_legacy(path), key)
        try:
            archive = TorchArchive(path)
        except NotImplementedError as e:  # quantized or nested tensors have no meta-device form
            _weights_in(path, _load_mapped(path), key)  # names the tensor, if it is one of the weights
            raise InputError(
                f"{path}: holds tensors whose storage ckptavg cannot check ({str(e).splitlines()[0]}); save "
                "the weights alone, e.g. torch.save(model.state_dict(), 'weights.pt'), or convert them to "
                "safetensors"
            ) from e
        tensors, used_key, skipped = find_state_dict(archive.content, path, key)
        for name, tensor in tensors.items():
            refusal = unaverageable(tensor) or archive.problem(tensor)
            if refusal:
                raise InputError(f"{path}: tensor '{name}' {refusal}")
        views = {name: archive.view(tensor) for name, tensor in tensors.items()}
        return TorchWeights(views, used_key, skipped, scalar_entries(_with_numbers_read(archive)))


def read_torch_archive(path: Path) -> TorchArchive:
    """A torch zip archive, checked and unpickled onto meta storages with only the data-only classes
    allowed (no tensor byte is read).

    Raises:
        InputError: as `read_torch_weights`.
    """
    with _loading(path):
        return TorchArchive(path)


def load_torch_data(path: Path) -> object:
    """Whatever a torch file holds (a tensor, a tuple, a dict, ...), unpickled by torch's weights-only
    unpickler with only the data-only classes allowed; its tensors mapped from the file (a legacy,
    pre-1.6 file is read whole).

    Raises:
        InputError: the file is missing, not a torch file, or needs classes that could run code.
    """
    with _loading(path, resave="the tensors alone, e.g. torch.save(inputs, 'inputs.pt')"):
        return _load_mapped(path) if is_zip_archive(path) else _load_legacy(path)


def _with_numbers_read(archive: TorchArchive) -> object:
    """The archive's top level with its one-element tensors (a step, a metric) read from the file."""
    import torch

    if not isinstance(archive.content, Mapping):
        return archive.content
    return {
        key: archive.view(value)
        if isinstance(value, torch.Tensor)
        and value.numel() == 1
        and not unaverageable(value)
        and archive.problem(value) is None
        else value
        for key, value in archive.content.items()
    }


def _weights_in(path: Path, content: object, key: str | None) -> TorchWeights:
    """The weights of a checkpoint `torch.load` read, refused by name if one cannot be averaged."""
    tensors, used_key, skipped = find_state_dict(content, path, key)
    for name, tensor in tensors.items():
        refusal = unaverageable(tensor) or _not_on_cpu(tensor)
        if refusal:
            raise InputError(f"{path}: tensor '{name}' {refusal}")
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
def _loading(
    path: Path, resave: str = "the weights alone, e.g. torch.save(model.state_dict(), 'weights.pt')"
):
    """Read a torch file with only the data-only classes allowed; any failure becomes one `InputError`
    (saying to save `resave` instead, for a file that needs other classes)."""
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
                f"loads only plain data (torch.load weights_only=True). Re-save {resave}, or convert "
                "them to safetensors"
            ) from e
        raise InputError(
            f"{path}: not a readable torch checkpoint (damaged, or not saved by torch.save)"
        ) from e


def _load_mapped(path: Path) -> object:
    import torch

    return torch.load(path, mmap=True, weights_only=True, map_location="cpu")


def _load_legacy(path: Path) -> object:
    """A pre-1.6 (non-zip) file: it cannot be mapped, so torch reads it whole."""
    import torch

    return torch.load(path, mmap=False, weights_only=True, map_location="cpu")


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
                raise InputError(f"{path}: has no '{key}' (top-level keys: {keys}); choose one with `key`")
            chosen = chosen[part]
    elif any(isinstance(v, torch.Tensor) for v in content.values()) and not any(
        isinstance(content.get(k), Mapping) for k in STATE_DICT_KEYS
    ):
        chosen = content
    else:
        key = next((k for k in STATE_DICT_KEYS if isinstance(content.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(repr(k) for k in list(content)[:8])
            raise InputError(f"{path}: no weights found (top-level keys: {keys}); choose a key with `key`")
        chosen = content[key]
    if not isinstance(chosen, Mapping):
        raise InputError(f"{path}: '{key}' holds a {type(chosen).__name__}, not a dict of weights")
    tensors = {str(name): value for name, value in chosen.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise InputError(f"{path}: '{key or 'the top level'}' holds no tensors; choose a key with `key`")
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
