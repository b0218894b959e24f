"""Input specs -> checkpoint files on disk.

A spec is a checkpoint file, a quoted glob pattern (expanded here, so it works
the same on every shell), a folder, or an `hf://` path on the Hugging Face Hub
(see `hub.py`). A folder is one checkpoint in the Hugging Face layout
(`model.safetensors`, `pytorch_model.bin`, or the shards listed by a
`*.index.json`: a sharded checkpoint is one input, never one input per shard),
or a training run holding Trainer `checkpoint-N` folders, which expands to each
of them in step order. The choice within a folder works on names only, so a
listing of the Hub and a listing of the disk are read the same way.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import InputError
from ..formats.readers import INDEX_SUFFIX, SAFETENSORS_SUFFIX
from ..formats.torch_format import TORCH_SUFFIXES

HUB_PREFIX = "hf://"
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)
# What a Hugging Face folder's weights are called, in order of preference.
HF_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HF_CONFIG_NAME = "config.json"
# Files a training run keeps next to the weights that are not weights.
TRAINER_STATE = re.compile(r"^(optimizer|scheduler|scaler|rng_state.*|training_args|trainer_state)\.\w+$")
TRAINER_CHECKPOINT = "checkpoint-*"
GLOB_CHARS = re.compile(r"[*?\[]")
_DIGITS = re.compile(r"(\d+)")

# A folder listing: (file names, subfolder names) of a folder given relative to some root.
Listing = Callable[[str], tuple[list[str], list[str]]]


@dataclass(frozen=True)
class Source:
    """A checkpoint file on disk and where it came from.

    Attributes:
        path: the local file: a weights file, or the `*.index.json` of shards.
        label: what the plan shows, e.g. `ckpts/step_2.safetensors` or `hf://org/run@step2/model.safetensors`.
        origin: what the output's metadata records: the label, with a Hub revision pinned to its commit.
        headers: for a Hub checkpoint that was not fetched (planning only): (file name ->
            (tensors, metadata) of each safetensors file, weight map or None), read with range requests.
    """

    path: Path
    label: str
    origin: str
    headers: tuple | None = None

    @classmethod
    def local(cls, path: Path) -> Source:
        return cls(path, str(path), str(path))


def natural_key(text: str | os.PathLike) -> list:
    """Sort key that orders `step_2` before `step_10` (digit runs compare as numbers)."""
    parts = _DIGITS.split(str(text))
    return [(0, int(part), part) if part.isdigit() else (1, part.lower(), part) for part in parts]


def resolve_sources(
    specs: Iterable[str | os.PathLike], *, keep_order: bool = False, hub=None, fetch: bool = True
) -> list[Source]:
    """Expand specs to checkpoint files, in natural order of their labels unless `keep_order`.

    Args:
        specs: files, folders, quoted glob patterns, `hf://` paths.
        keep_order: keep the order given (patterns still expand in natural order).
        hub: `hub.HubOptions` for `hf://` specs (token, cache folder, offline); default options if None.
        fetch: download Hub checkpoints; if False, Hub safetensors checkpoints that are not
            cached come with their headers only (enough to plan, not to average).

    Raises:
        InputError: a path does not exist, a pattern matches nothing, a folder
            holds no checkpoint, a Hub spec cannot be resolved, or no spec was given.
    """
    sources: list[Source] = []
    hub_specs: list[tuple[int, str]] = []
    for spec in specs:
        spec = os.fspath(spec)
        if spec.startswith(HUB_PREFIX):
            hub_specs.append((len(sources), spec))
        elif GLOB_CHARS.search(spec) and not os.path.exists(spec):
            matches = sorted(expand_pattern(spec), key=natural_key)
            if not matches:
                raise InputError(f"{spec}: the pattern matches no file or folder")
            for match in matches:
                sources.extend(Source.local(p) for p in _local_checkpoints(Path(match)))
        else:
            sources.extend(Source.local(p) for p in _local_checkpoints(Path(spec)))
    if hub_specs:
        from .hub import HubOptions, resolve_hub_specs

        resolved = resolve_hub_specs([spec for _, spec in hub_specs], hub or HubOptions(), fetch=fetch)
        for (position, _), found in reversed(list(zip(hub_specs, resolved, strict=True))):
            sources[position:position] = found
    if not sources:
        raise InputError("no input checkpoints given; pass files, folders, quoted patterns or hf:// paths")
    if not keep_order:
        sources.sort(key=lambda source: natural_key(source.label))
    return sources


def expand_pattern(pattern: str) -> list[str]:
    """The paths a glob pattern matches; `**` matches any depth of folders.

    `**` never descends through a link to a folder (Python's own recursive glob
    does, and a link to a parent folder then never ends); a link matched by name
    is used as given.
    """
    if "**" not in pattern:
        return glob.glob(pattern)
    parts = pattern.split("/")
    found = ["/" if parts[0] == "" else ""]
    for position, part in enumerate(parts[1:] if parts[0] == "" else parts):
        last = position == len(parts) - (2 if parts[0] == "" else 1)
        if part == "**":
            found = [path for base in found for path in _descendants(base, with_files=last)]
        elif part:
            found = [match for base in found for match in glob.glob(os.path.join(glob.escape(base), part))]
    return list(dict.fromkeys(path for path in found if path))


def _descendants(prefix: str, *, with_files: bool) -> list[str]:
    """The folder `prefix` (as the pattern wrote it; "" for the current folder) and every real folder
    below it, and their files if asked; hidden ones left out, as glob leaves them."""
    found = [prefix]
    folder = prefix or "."
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(
            f for f in folders if not f.startswith(".") and not os.path.islink(os.path.join(root, f))
        )
        relative = os.path.relpath(root, folder)
        base = prefix if relative == "." else os.path.join(prefix, relative)
        found += [os.path.join(base, name) for name in folders]
        if with_files:
            found += [os.path.join(base, name) for name in sorted(files) if not name.startswith(".")]
    return found


def checkpoints_in_folder(folder: str, listing: Listing, label: str) -> list[str]:
    """The checkpoints of a folder, as paths relative to the listing's root.

    One checkpoint in the Hugging Face layout (or the folder's only weights
    file), else each Trainer `checkpoint-N` subfolder in step order.

    Raises:
        InputError: no checkpoint, or several candidates and no way to choose.
    """
    files, folders = listing(folder)
    found = _weights_among(files, label)
    if found is not None:
        return [_join(folder, found)]
    runs = sorted((f for f in folders if fnmatchcase(f, TRAINER_CHECKPOINT)), key=natural_key)
    if not runs:
        raise InputError(
            f"{label}: holds no checkpoint (no {', '.join(HF_WEIGHT_NAMES)}, weights file or "
            f"{TRAINER_CHECKPOINT} folders)"
        )
    checkpoints = []
    for run in runs:
        run_label = f"{label.rstrip('/')}/{run}"
        weights = _weights_among(listing(_join(folder, run))[0], run_label)
        if weights is None:
            raise InputError(
                f"{run_label}: holds no checkpoint (no {', '.join(HF_WEIGHT_NAMES)} or weights file)"
            )
        checkpoints.append(_join(folder, run, weights))
    return checkpoints


def is_model_side_file(name: str) -> bool:
    """Whether a file of a Hugging Face model folder goes with the weights (config, tokenizer, ...)."""
    return (
        not name.startswith(".")
        and not name.endswith((*WEIGHT_SUFFIXES, INDEX_SUFFIX))
        and not TRAINER_STATE.match(name)
    )


def _weights_among(files: Sequence[str], label: str) -> str | None:
    """The checkpoint among a folder's file names: Hugging Face names first, else the only weights file."""
    for name in HF_WEIGHT_NAMES:
        if name in files:
            return name
    indexes = sorted(f for f in files if f.endswith(INDEX_SUFFIX))
    if len(indexes) > 1:
        raise InputError(f"{label}: holds several shard indexes ({', '.join(indexes)}); pass one of them")
    if indexes:
        return indexes[0]
    weights = sorted(
        (f for f in files if f.endswith(WEIGHT_SUFFIXES) and not TRAINER_STATE.match(f)), key=natural_key
    )
    if len(weights) > 1:
        raise InputError(
            f"{label}: holds {len(weights)} weights files and no {HF_WEIGHT_NAMES[0]} or shard index; "
            f"to average them, pass '{label.rstrip('/')}/*{Path(weights[0]).suffix}'"
        )
    return weights[0] if weights else None


def _local_checkpoints(path: Path) -> list[Path]:
    if not path.exists():
        if path.is_symlink():
            raise InputError(f"{path}: a symbolic link to nothing (its target is missing, or links loop)")
        raise InputError(f"{path}: no such file or folder")
    if not path.is_dir():
        return [path]
    return [path / relative for relative in checkpoints_in_folder("", _local_listing(path), str(path))]


def _local_listing(root: Path) -> Listing:
    def listing(folder: str) -> tuple[list[str], list[str]]:
        try:
            entries = list(os.scandir(root / folder))
        except OSError as e:
            raise InputError(f"{root / folder}: cannot list the folder ({e.strerror or e})") from e
        folders = [e.name for e in entries if _is_folder(e)]
        # A broken or looping link counts as a file: if it is the weights, opening it says what is wrong.
        return [e.name for e in entries if e.name not in folders], folders

    return listing


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link that loops
        return False


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)
