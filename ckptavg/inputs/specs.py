"""Input specs -> checkpoint files on disk.

A spec is a checkpoint file, a quoted glob pattern (expanded here, so it works
the same on every shell), a folder, an `hf://` path on the Hugging Face Hub
(see `hub.py`), or a URL in object storage (`s3://`, `gs://`, `https://`: see
`remote.py`). A folder is one checkpoint in the Hugging Face layout, or a
training run holding Trainer `checkpoint-N` folders, which expands to each of
them in step order (the rules are in `folders.py`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import InputError
from .folders import GLOB_CHARS, HUB_PREFIX, Listing, Source, checkpoints_in_folder, natural_key
from .hub import HubOptions, resolve_hub_specs
from .remote import is_url, remote_sources


def resolve_sources(
    specs: Iterable[str | os.PathLike],
    *,
    keep_order: bool = False,
    hub: HubOptions | None = None,
    fetch: bool = True,
    weights_name: str | None = None,
    storage_options: dict | None = None,
) -> list[Source]:
    """Expand specs to checkpoint files, in natural order of their labels unless `keep_order`.

    Args:
        specs: files, folders, quoted glob patterns, `hf://` paths.
        keep_order: keep the order given (patterns still expand in natural order).
        hub: `HubOptions` for `hf://` specs (token, cache folder, offline); default options if None.
        fetch: download Hub checkpoints; if False, Hub safetensors checkpoints that are not
            cached come with their headers only (enough to plan, not to average).
        weights_name: in folders holding several models' weights, the one to take (`model_1`).
        storage_options: for URLs (`s3://`, `gs://`, `https://`, ...), passed to their fsspec file system.

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
        elif is_url(spec):
            sources.extend(remote_sources(spec, storage_options, weights_name))
        elif GLOB_CHARS.search(spec) and not os.path.exists(spec):
            matches = sorted(expand_pattern(spec), key=natural_key)
            if not matches:
                raise InputError(f"{spec}: the pattern matches no file or folder")
            for match in matches:
                sources.extend(Source.local(p) for p in _local_checkpoints(Path(match), weights_name))
        else:
            sources.extend(Source.local(p) for p in _local_checkpoints(Path(spec), weights_name))
    if hub_specs:
        resolved = resolve_hub_specs(
            [spec for _, spec in hub_specs], hub or HubOptions(), fetch=fetch, weights_name=weights_name
        )
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


def _local_checkpoints(path: Path, weights_name: str | None) -> list[Path]:
    if not path.exists():
        if path.is_symlink():
            raise InputError(f"{path}: a symbolic link to nothing (its target is missing, or links loop)")
        raise InputError(f"{path}: no such file or folder")
    if not path.is_dir():
        return [path]
    found = checkpoints_in_folder("", _local_listing(path), str(path), weights_name)
    return [path / relative for relative in found]


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
