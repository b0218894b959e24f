"""Torch checkpoints (`.pt .pth .bin .ckpt`): find the weights, never run code.

Files are read with `torch.load(weights_only=True, mmap=True)`: lazy for the
zip format (an optimizer state next to the weights is never read into memory)
and unable to run code hidden in a pickle. A few data-only classes that common
training scripts put next to the weights (the `args` Namespace of torchvision's
reference scripts, Lightning's `AttributeDict` of hyper-parameters, paths, numpy
scalars) are allowed by name; any other class is refused, and named.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import pickle
import re
from collections.abc import Mapping, Sequence
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


def load_torch_file(path: Path) -> object:
    """`torch.load` the file safely and lazily; what it holds, unchanged.

    Raises:
        InputError: the file is not a torch checkpoint, or loading it would need
            classes that could run code (named in the message).
    """
    import torch

    try:
        with torch.serialization.safe_globals(_data_only_globals()):
            try:
                return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
            except RuntimeError as e:
                if "mmap can only be used with files saved with" not in str(e):
                    raise
                # Legacy (pre-1.6, non-zip) format: cannot be mapped, so it is read whole.
                return torch.load(path, mmap=False, weights_only=True, map_location="cpu")
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...
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
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[str(key)] = float(value)
    return scalars


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
