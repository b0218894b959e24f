"""The per-file readers behind `readers.CheckpointFile`: a safetensors file (header parsed once,
as safetensors checks it; data from one private map), a torch file (see `torch_format`), and a
safetensors file known by its header alone (a Hub checkpoint planned before it is downloaded)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path, PurePosixPath

from ..errors import InputError
from . import dtypes
from .dtypes import TensorInfo
from .safetensors_header import read_header
from .torch_format import read_torch_weights, tied_groups


def _checked_info(path: Path, name: str, dtype: str, shape: tuple[int, ...]) -> TensorInfo:
    """The tensor's `TensorInfo`, once its shape is seen to fit a 64-bit address space."""
    if not dtypes.addressable(dtype, shape):
        raise InputError(
            f"{path}: tensor '{name}' has shape {list(shape)}, too large for any tensor even with its zero "
            "dimensions (the header is damaged); save the checkpoint again"
        )
    return TensorInfo(dtype, shape)


class SafetensorsFile:
    """A safetensors file: its header parsed once (as safetensors checks it), data from one private map."""

    notes: tuple[str, ...] = ()
    tied: tuple = ()

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.stamp = stamp_of(f.fileno())
                stored, self.metadata = read_header(path, f)
        except FileNotFoundError as e:
            raise InputError(f"{path}: no such file") from e
        except IsADirectoryError as e:
            raise InputError(f"{path}: is a folder, not a safetensors file") from e
        except OSError as e:
            raise InputError(f"{path}: cannot read it ({e.strerror or e})") from e
        self.tensors = {name: TensorInfo(t.dtype, t.shape) for name, t in stored.items()}
        self.offsets = {name: (t.begin, t.end) for name, t in stored.items()}
        self.scalars = _numbers(self.metadata)
        self._bytes = None

    def get(self, name: str, info: TensorInfo):
        begin, end = self.offsets[name]
        return self.get_bytes(begin, end, info.dtype).view(info.shape)

    def get_bytes(self, begin: int, end: int, dtype: str):
        """The file's bytes [begin, end) as a flat tensor of `dtype`, zero-copy."""
        if self._bytes is None:
            self._map()
        raw = self._bytes[begin:end]
        try:
            return raw.view(dtypes.torch_dtype(dtype))
        except RuntimeError:  # misaligned data (files from old writers): a copy, still correct
            return raw.clone().view(dtypes.torch_dtype(dtype))

    def _map(self) -> None:
        import torch

        try:
            with open(self.path, "rb") as f:
                if stamp_of(f.fileno()) != self.stamp:
                    raise InputError(changed_message(self.path))
                # ACCESS_COPY (MAP_PRIVATE, as safetensors maps): writable for torch, never written back.
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)  # tensors are read front to back: read ahead further
        except (OSError, ValueError) as e:
            raise InputError(f"{self.path}: cannot map the file: {e}") from e
        self._bytes = torch.frombuffer(mapped, dtype=torch.uint8)


class CompanionFile:
    """Another file a checkpoint is read from (a DeepSpeed rank's partitions, a DCP rank's chunks):
    no tensors of its own, but a change to it while the run reads it counts as the checkpoint's."""

    tensors: dict = {}  # noqa: RUF012 (never mutated)
    metadata: dict = {}  # noqa: RUF012
    scalars: dict = {}  # noqa: RUF012
    notes: tuple = ()
    tied: tuple = ()

    def __init__(self, path: Path):
        self.path = path
        self.stamp = stamp_of(path)


class HeaderOnlyFile:
    """A safetensors file described by its header, with no data at hand."""

    notes: tuple[str, ...] = ("header only, not downloaded",)
    tied: tuple = ()
    stamp = None

    def __init__(self, name: str, label: str, tensors: dict[str, TensorInfo], metadata: dict[str, str]):
        self.path = PurePosixPath(name)  # its name in the checkpoint's folder, not a file here
        self.label = label
        self.tensors, self.metadata = tensors, metadata
        self.scalars = _numbers(metadata)

    def get(self, name: str, info: TensorInfo):
        raise InputError(
            f"{self.label}: tensor '{name}' was not downloaded (the checkpoint was only planned)"
        )


class TorchFile:
    """A torch checkpoint, mapped lazily; only the chosen dict of weights is used."""

    metadata: dict[str, str] = {}  # noqa: RUF012 (never mutated)

    def __init__(self, path: Path, key: str | None):
        self.path = path
        self.stamp = stamp_of(path)
        weights = read_torch_weights(path, key)
        self.scalars = weights.scalars
        self.key = weights.key  # where the weights were found (None: a flat state dict)
        self.tensors = {}
        for name, tensor in weights.tensors.items():
            try:
                dtype = dtypes.safetensors_name(tensor.dtype)
            except KeyError:
                raise InputError(
                    f"{path}: tensor '{name}' has dtype {tensor.dtype}, which ckptavg cannot average"
                ) from None
            self.tensors[name] = _checked_info(path, name, dtype, tuple(tensor.shape))
        self._values = weights.tensors
        self.tied = tied_groups(weights.tensors)
        self.notes = [f"torch, key '{weights.key}'" if weights.key else "torch, flat state dict"]
        if weights.skipped:
            self.notes.append(
                f"{weights.skipped} non-tensor entr{'y' if weights.skipped == 1 else 'ies'} skipped"
            )

    def get(self, name: str, info: TensorInfo):
        return self._values[name]


def _numbers(metadata: dict[str, str]) -> dict[str, float]:
    """Metadata values that are numbers (a step or a metric saved with the weights)."""
    numbers = {}
    for key, value in metadata.items():
        try:
            numbers[key] = float(value)
        except ValueError:
            continue
    return numbers


def stamp_of(file) -> tuple[int, int] | None:
    """Size and modification time of a path or open file descriptor, to notice a file being rewritten."""
    try:
        info = os.stat(file)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def changed_message(path: Path) -> str:
    return f"{path}: changed while being read (still being written?); run again once it is complete"
