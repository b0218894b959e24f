"""Input specs -> checkpoint locations on disk.

A spec is a file, a quoted glob pattern (expanded here, so it works the same on
every shell), or a folder holding one checkpoint in the Hugging Face layout
(`model.safetensors`, or shards listed by a `*.safetensors.index.json`). A
sharded checkpoint is one input, never one input per shard.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError

SAFETENSORS_SUFFIX = ".safetensors"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
_GLOB_CHARS = re.compile(r"[*?\[]")
_DIGITS = re.compile(r"(\d+)")


def natural_key(path: str | os.PathLike) -> list:
    """Sort key that orders `step_2` before `step_10` (digit runs compare as numbers)."""
    parts = _DIGITS.split(str(path))
    return [(0, int(part), part) if part.isdigit() else (1, part.lower(), part) for part in parts]


def resolve_sources(specs: Iterable[str | os.PathLike], *, keep_order: bool = False) -> list[Path]:
    """Expand specs to checkpoint locations, in natural order unless `keep_order`.

    Each result is a file: a `.safetensors` checkpoint, or the
    `*.safetensors.index.json` of a sharded one.

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
            locations.extend(_checkpoint_location(Path(match)) for match in matches)
        else:
            locations.append(_checkpoint_location(Path(spec)))
    if not locations:
        raise InputError("no input checkpoints given; pass files, folders or quoted patterns")
    if not keep_order:
        locations.sort(key=natural_key)
    return locations


def _checkpoint_location(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return _checkpoint_in_folder(path)
    return path


def _checkpoint_in_folder(folder: Path) -> Path:
    """A folder is one checkpoint: a single file, or shards named by one index."""
    if (folder / SINGLE_FILE_NAME).is_file():
        return folder / SINGLE_FILE_NAME
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        names = ", ".join(index.name for index in indexes)
        raise InputError(f"{folder}: holds several shard indexes ({names}); pass one of them")
    files = sorted(folder.glob("*" + SAFETENSORS_SUFFIX), key=natural_key)
    if len(files) == 1:
        return files[0]
    if not files:
        raise InputError(f"{folder}: no {SINGLE_FILE_NAME}, *{INDEX_SUFFIX} or .safetensors file")
    raise InputError(
        f"{folder}: holds {len(files)} .safetensors files but no {SINGLE_FILE_NAME} or shard "
        f"index; to average them, pass '{folder}/*.safetensors'"
    )
