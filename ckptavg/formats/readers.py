"""Checkpoint readers: names, dtypes and shapes up front, tensors on demand.

One `Checkpoint` interface over every layout: a `.safetensors` file, a torch
file (`.pt .pth .bin .ckpt`), or the shards of either listed by a
`*.index.json`. Names can have prefixes stripped (`module.`, `model.`), so
checkpoints saved by different wrappers line up; an `AveragedModel` state is read
as the model it averages (`averaged_model`); `include`/`exclude` rules choose
tensors by name (`name_filter`).

safetensors headers are read and validated by `safetensors.safe_open` (offsets
tile the data, sizes match the file). Data is read from one private memory map
per file (see `files`): `Checkpoint.get` slices it at the tensor's offsets, a
zero-copy view that costs no memory beyond page cache and far less per call
than `safe_open.get_tensor` (which matters for models with thousands of small
tensors). Torch archives are checked and mapped by `torch_archive`. Callers must
never write into a returned tensor (the pages would turn into private copies).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..errors import InputError
from . import dtypes
from .averaged_model import averaged_model_wrapper
from .dcp import is_dcp_folder, open_dcp_folder
from .deepspeed import is_deepspeed_folder, is_model_states, open_deepspeed_folder, open_model_states
from .dtypes import TensorInfo
from .files import HeaderOnlyFile, SafetensorsFile, TorchFile, changed_message, stamp_of
from .name_filter import filter_names
from .torch_format import TORCH_SUFFIXES

INDEX_SUFFIX = ".index.json"
SAFETENSORS_SUFFIX = ".safetensors"
_LOOP = "a symlink that loops back on itself (circular)"


class CheckpointFile(Protocol):
    """One file of a checkpoint, as `Checkpoint` reads it (safetensors, torch, headers only, ...).

    Attributes:
        path: the file (a name only, for a file known by its header).
        tensors: stored name -> `TensorInfo`.
        metadata: string metadata stored with it.
        scalars: numbers stored with it (step, epoch, metrics).
        notes: how it was read, for the plan.
        tied: groups of stored names that share memory.
        stamp: size and modification time when opened, or None if nothing on disk can change.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    scalars: dict[str, float]
    notes: Sequence[str]
    tied: Sequence[Sequence[str]]
    stamp: tuple[int, int] | None

    def get(self, name: str, info: TensorInfo):
        """The stored tensor `name` as a read-only view."""

    # A reader whose tensors lie in pieces (DeepSpeed partitions) also has `get_flat(name, info)`:
    # the tensor flattened, as `deepspeed.Pieces`, so that the engine assembles one chunk at a time.
    # One that decodes stored chunks into memory says how much at most in `decoded_bytes`.


class Checkpoint:
    """One input checkpoint, whole: a single file or every shard of a sharded one.

    Attributes:
        path: the file the user's spec resolved to (a weights file or an index); None for a
            checkpoint known by its headers alone (`open_headers`), which has no file here.
        label: how the plan names it (the path, or the `hf://` spec it came from).
        origin: how the output's metadata records it (a Hub revision pinned to its commit).
        tensors: name -> `TensorInfo`, names as averaged (prefixes stripped).
        metadata: string metadata stored with a safetensors checkpoint.
        notes: how the checkpoint was read (key, stripped prefixes, skipped
            entries, an `AveragedModel`'s dropped `n_averaged`), for the plan.
        filtered: what the `include`/`exclude` rules matched (`name_filter.Filtered`), or None
            without rules.
        tied: groups of names that share memory in the file.
        scalars: numbers stored with the weights (a torch dict's epoch or metrics, numeric
            safetensors metadata), for steps and selection by metric.
        read_ahead: for a remote checkpoint, the bytes the run may fetch ahead of the sums (shared
            by every remote input; each may hold one range request's block more); 0 otherwise.
        decoded_bytes: the most memory its files take for chunks they decode while read (DCP's
            compressed chunks), beside the engine's buffers; 0 when everything is mapped.
    """

    def __init__(
        self,
        path: Path | None,
        shards: Sequence[CheckpointFile],
        weight_map: dict[str, str] | None,
        strip_prefix: Sequence[str],
        label: str | None = None,
        origin: str | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ):
        self.path = path
        # a remote checkpoint's config and tokenizer files (`inputs.remote_side_files`), or None
        self.remote_side_files = None
        self.label = label or str(path)
        self.origin = origin or self.label
        self.metadata: dict[str, str] = {}
        self.tied: list[list[str]] = []
        self._shards = list(shards)
        self.decoded_bytes = sum(getattr(shard, "decoded_bytes", 0) for shard in self._shards)
        # remote files: the run's read-ahead, shared by every remote input (see `remote_files`)
        self.read_ahead = max((getattr(shard, "read_ahead", 0) for shard in self._shards), default=0)
        chosen = []
        for shard in self._shards:
            self.metadata = self.metadata or shard.metadata
            self.tied += shard.tied
            chosen += [
                (shard, stored, info)
                for stored, info in shard.tensors.items()
                if weight_map is None or weight_map.get(stored) == shard.path.name
            ]
        if weight_map is not None:
            present = {stored for _, stored, _ in chosen}
            missing = [stored for stored in weight_map if stored not in present]
            if missing:
                raise InputError(
                    f"{self.label}: tensor '{missing[0]}' is not in {weight_map[missing[0]]}"
                    + (f" ({len(missing) - 1} more tensors missing)" if len(missing) > 1 else "")
                )
        wrapper = averaged_model_wrapper({stored: info for _, stored, info in chosen})
        prefixes = [*strip_prefix]
        if wrapper is not None:
            chosen = [entry for entry in chosen if entry[1] not in wrapper.dropped]
            prefixes = [wrapper.prefix, *prefixes] if wrapper.prefix else prefixes
        stored_of: dict[str, str] = {}
        name_of: dict[str, str] = {}
        used: set[int] = set()
        for shard, stored, _ in chosen:
            name = _strip(stored, prefixes, used)
            if name in stored_of:
                raise InputError(
                    f"{shard.path}: tensors '{stored_of[name]}' and '{stored}' are both '{name}' "
                    "after stripping prefixes; strip fewer prefixes"
                )
            stored_of[name], name_of[stored] = stored, name
        kept, filtered = filter_names(list(stored_of), include, exclude, self.label)
        self.filtered = filtered if include or exclude else None
        kept_set = set(kept)
        self.tensors: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple] = {}
        for shard, stored, info in chosen:
            if name_of[stored] in kept_set:
                self.tensors[name_of[stored]] = info
                self._where[name_of[stored]] = (shard, stored)
        groups = [[name_of[n] for n in group if name_of.get(n) in kept_set] for group in self.tied]
        self.tied = [group for group in groups if len(group) > 1]
        self.notes: list[str] = [note for shard in self._shards[:1] for note in shard.notes]
        self.scalars: dict[str, float] = dict(self._shards[0].scalars) if self._shards else {}
        if wrapper is not None:
            self.notes.append(wrapper.note)
        first_own = len(prefixes) - len(strip_prefix)
        stripped = [prefixes[i] for i in sorted(used) if i >= first_own]
        if stripped:
            self.notes.append("stripped " + ", ".join(f"'{p}'" for p in stripped))

    @property
    def files(self) -> list[Path]:
        """Every local file this checkpoint is made of: the given path and its shards (none for a
        checkpoint known by its headers alone)."""
        if self.path is None:
            return []
        given = [] if self.path.is_dir() else [self.path]  # a DeepSpeed folder: its files follow
        return [*given, *sorted({shard.path for shard in self._shards} - {self.path})]

    @property
    def folder(self) -> Path | None:
        """The folder holding it, where its config and tokenizer files are (for a remote
        checkpoint, a local folder of their copies); None without such a folder."""
        if self.remote_side_files is not None:
            return self.remote_side_files.folder()
        return self.path.parent if self.path is not None else None

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def get(self, name: str):
        """The tensor `name` as a read-only, zero-copy view of the mapped file."""
        shard, stored = self._where[name]
        return shard.get(stored, self.tensors[name])

    def file_of(self, name: str) -> tuple[CheckpointFile, str]:
        """The file holding tensor `name`, and the tensor's name there (before prefixes were stripped)."""
        return self._where[name]

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """Where tensor `name`'s bytes lie in a safetensors file, or None (torch files, headers only)."""
        shard, stored = self._where[name]
        if not isinstance(shard, SafetensorsFile) and not hasattr(shard, "read_range"):
            return None
        return (shard.path, *shard.offsets[stored])

    def get_run(self, names: Sequence[str], start: int = 0, stop: int | None = None):
        """Tensors stored back to back in one file, with one dtype, as one flat zero-copy view
        (a single tensor of any file, flattened), of which elements `start` to `stop` will be read.

        A model's many small tensors are then summed in one operation instead of one each. A remote
        file fetches only the elements to be read (a rank's part of the run).
        """
        shard, stored = self._where[names[0]]
        info = self.tensors[names[0]]
        if hasattr(shard, "read_range"):
            _, begin, _ = self.byte_range(names[0])
            _, _, end = self.byte_range(names[-1])
            size = dtypes.itemsize(info.dtype)
            within = (begin + start * size, end if stop is None else begin + stop * size)
            return shard.get_bytes(begin, end, info.dtype, within)
        if len(names) == 1:
            if hasattr(shard, "get_flat"):
                return shard.get_flat(stored, info)
            return shard.get(stored, info).reshape(-1)
        _, begin, _ = self.byte_range(names[0])
        _, _, end = self.byte_range(names[-1])
        return shard.get_bytes(begin, end, info.dtype)

    def check_unchanged(self) -> None:
        """Refuse a checkpoint whose files changed since they were opened (still being written?).

        Raises:
            InputError: naming the file that changed.
        """
        for shard in self._shards:
            if hasattr(shard, "check_unchanged"):  # a remote object: asked of its storage
                shard.check_unchanged()
            elif shard.stamp is not None and stamp_of(shard.path) != shard.stamp:
                raise InputError(changed_message(shard.path))

    def close(self) -> None:
        """Drop the maps (they are unmapped once no tensor view refers to them) and any fetched
        side files."""
        self._shards.clear()
        self._where.clear()
        if self.remote_side_files is not None:
            self.remote_side_files.remove()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"


def open_checkpoint(
    path: str | Path,
    *,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    label: str | None = None,
    origin: str | None = None,
    master_weights: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Checkpoint:
    """Open a checkpoint file, a sharded checkpoint through its `*.index.json`, a DeepSpeed folder,
    or a torch.distributed.checkpoint (DCP) folder.

    Args:
        path: `.safetensors`, `.pt`/`.pth`/`.bin`/`.ckpt`, an index of shards of either, or a
            DeepSpeed `global_stepN` folder (see `deepspeed`), or a DCP folder (see `dcp`).
        key: for torch files, where the weights are (e.g. `state_dict_ema`; dotted for nesting);
            default: a flat dict as is, else the first usual key (`state_dict`, `model`, ...).
            For DCP folders, the nested state dict of the model (default: `model`, else the top level).
        strip_prefix: prefixes removed from tensor names, in order (e.g. `module.`).
        label, origin: how the plan and the output's metadata name it (default: the path).
        master_weights: a DeepSpeed ZeRO-1/2 folder gives its fp32 master weights, not its module.
        include, exclude: `fnmatch` patterns on the names (prefixes stripped): keep only the tensors
            an `include` pattern matches, then leave out those an `exclude` pattern matches.

    Reads headers only (safetensors) or maps lazily (torch); tensor data is read by `get`.

    Raises:
        InputError: the file is missing, not a checkpoint ckptavg reads, holds classes
            that could run code, an index names a shard or tensor that is not there, or the
            `include`/`exclude` rules leave no tensor.
    """
    path = Path(path)
    rules = {"include": tuple(include), "exclude": tuple(exclude)}
    if path.is_dir() and is_dcp_folder(os.listdir(path)) and not master_weights:
        checkpoint = Checkpoint(path, open_dcp_folder(path, key), None, strip_prefix, label, origin, **rules)
    elif path.is_dir() and is_deepspeed_folder(os.listdir(path)):
        shards = open_deepspeed_folder(path, key, master_weights)
        checkpoint = Checkpoint(path, shards, None, strip_prefix, label, origin, **rules)
    elif master_weights:
        raise InputError(
            f"{path}: `master_weights` reads DeepSpeed checkpoint folders; give a global_stepN folder"
        )
    elif path.name.endswith(INDEX_SUFFIX):
        weight_map = _read_weight_map(path)
        shard_paths = []
        for shard_name in dict.fromkeys(weight_map.values()):
            shard = path.parent / shard_name
            if _loops(shard):
                raise InputError(f"{path}: names shard {shard_name}, {_LOOP}; point it at the shard file")
            if not shard.is_file():
                raise InputError(f"{path}: names shard {shard_name}, which does not exist")
            shard_paths.append(shard)
        shards = [_open_file(shard, key) for shard in shard_paths]
        checkpoint = Checkpoint(path, shards, weight_map, strip_prefix, label, origin, **rules)
    else:
        checkpoint = Checkpoint(path, [_open_file(path, key)], None, strip_prefix, label, origin, **rules)
    if not checkpoint.tensors:
        raise InputError(f"{path}: holds no tensors")
    return checkpoint


def open_headers(
    headers: dict[str, tuple[dict[str, TensorInfo], dict[str, str]]],
    *,
    label: str,
    origin: str,
    weight_map: dict[str, str] | None = None,
    strip_prefix: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Checkpoint:
    """A checkpoint known by its safetensors headers only (file name -> (tensors, metadata)).

    Enough to plan and validate a run, e.g. of Hub checkpoints not yet downloaded;
    reading a tensor raises.
    """
    shards = [HeaderOnlyFile(name, label, tensors, metadata) for name, (tensors, metadata) in headers.items()]
    return Checkpoint(None, shards, weight_map, strip_prefix, label, origin, tuple(include), tuple(exclude))


def _loops(path: Path) -> bool:
    """Whether `path` is a symlink that leads back to itself, which reads as "no such file" otherwise."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _open_file(path: Path, key: str | None):
    if _loops(path):
        raise InputError(f"{path}: {_LOOP}; point it at the checkpoint file")
    if path.name.endswith(TORCH_SUFFIXES):
        return open_model_states(path, key) if is_model_states(path.name) else TorchFile(path, key)
    if path.suffix == SAFETENSORS_SUFFIX:
        return SafetensorsFile(path)
    raise InputError(
        f"{path}: not a checkpoint file ckptavg reads (.safetensors, {', '.join(TORCH_SUFFIXES)})"
    )


def _strip(name: str, prefixes: Sequence[str], used: set[int]) -> str:
    """`name` with each prefix removed in turn; adds to `used` the index of each one removed."""
    for i, prefix in enumerate(prefixes):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            used.add(i)
    return name


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
