"""Input specs -> checkpoint files on disk.

A spec is a checkpoint file, a quoted glob pattern (expanded here, so it works
the same on every shell), or a folder. A folder is one checkpoint in the
Hugging Face layout (`model.safetensors`, `pytorch_model.bin`, or the shards
listed by a `*.index.json`: a sharded checkpoint is one input, never one input
per shard), or a training run holding Trainer `checkpoint-N` folders, which
expands to each of them in step order.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError
from .readers import INDEX_SUFFIX, SAFETENSORS_SUFFIX
from .torch_format import TORCH_SUFFIXES

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
_GLOB_CHARS = re.compile(r"[*?\[]")
_DIGITS = re.compile(r"(\d+)")


def natural_key(path: str | os.PathLike) -> list:
    """Sort key that orders `step_2` before `step_10` (digit runs compare as numbers)."""
    parts = _DIGITS.split(str(path))
    return [(0, int(part), part) if part.isdigit() else (1, part.lower(), part) for part in parts]


def resolve_sources(specs: Iterable[str | os.PathLike], *, keep_order: bool = False) -> list[Path]:
    """Expand specs to checkpoint files, in natural order unless `keep_order`.

    Each result is a weights file (`.safetensors`, `.pt`, `.pth`, `.bin`,
    `.ckpt`) or the `*.index.json` of a sharded checkpoint.

    Raises:
        InputError: a path does not exist, a pattern matches nothing, a folder
            holds no checkpoint, or no spec was given.
    """
    locations: list[Path] = []
    for spec in specs:
        spec = os.fspath(spec)
        if _GLOB_CHARS.search(spec) and not os.path.exists(spec):
            matches = sorted(glob.glob(spec, recursive=True), key=natural_key)
            if not matches:
                raise InputError(f"{spec}: the pattern matches no file or folder")
            for match in matches:
                locations.extend(_checkpoint_files(Path(match)))
        else:
            locations.extend(_checkpoint_files(Path(spec)))
    if not locations:
        raise InputError("no input checkpoints given; pass files, folders or quoted patterns")
    if not keep_order:
        locations.sort(key=natural_key)
    return locations


def _checkpoint_files(path: Path) -> list[Path]:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not path.is_dir():
        return [path]
    found = _checkpoint_in_folder(path)
    if found is not None:
        return [found]
    trainer_checkpoints = sorted((p for p in path.glob(TRAINER_CHECKPOINT) if p.is_dir()), key=natural_key)
    if trainer_checkpoints:
        return [_require_checkpoint(p) for p in trainer_checkpoints]
    raise InputError(
        f"{path}: holds no checkpoint (no {', '.join(HF_WEIGHT_NAMES)}, weights file or "
        f"{TRAINER_CHECKPOINT} folders)"
    )


def _require_checkpoint(folder: Path) -> Path:
    found = _checkpoint_in_folder(folder)
    if found is None:
        raise InputError(f"{folder}: holds no checkpoint (no {', '.join(HF_WEIGHT_NAMES)} or weights file)")
    return found


def _checkpoint_in_folder(folder: Path) -> Path | None:
    """A folder's one checkpoint: the Hugging Face names first, else its only weights file."""
    for name in HF_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        names = ", ".join(index.name for index in indexes)
        raise InputError(f"{folder}: holds several shard indexes ({names}); pass one of them")
    if indexes:
        return indexes[0]
    files = sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and not TRAINER_STATE.match(p.name)
        ),
        key=natural_key,
    )
    if len(files) > 1:
        raise InputError(
            f"{folder}: holds {len(files)} weights files and no {HF_WEIGHT_NAMES[0]} or shard index; "
            f"to average them, pass '{folder}/*{files[0].suffix}'"
        )
    return files[0] if files else None


def model_folder_files(folder: Path) -> list[Path]:
    """The files a Hugging Face model folder needs besides its weights (config, tokenizer, ...).

    Empty unless `folder` holds a `config.json`; never weights, shard indexes or
    trainer state (optimizer, scheduler, RNG states, training arguments).
    """
    if not (folder / HF_CONFIG_NAME).is_file():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith((*WEIGHT_SUFFIXES, INDEX_SUFFIX))
        and not TRAINER_STATE.match(p.name)
    )
