"""The layout of an output to a URL (`s3://bucket/avg.safetensors`, `s3://bucket/folder/`): a
safetensors file or a Hugging Face folder of shards, streamed by `run/remote_output.py`; other
layouts are refused in one line. An existing object is replaced only with `force`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputError
from ..formats.readers import INDEX_SUFFIX, Checkpoint
from ..formats.remote_files import storage_message
from ..formats.safetensors_header import read_header
from ..inputs.remote import filesystem, shown
from ..inputs.side_files import allowed_root, find_side_files
from ..units import parse_size
from .layout import (
    DEFAULT_FOLDER_SHARD_SIZE,
    VERSION_KEY,
    Layout,
    _shards,
    copied_files,
    index_name,
    weights_name,
)
from .tensors import OutputFile, TensorPlan


@dataclass(frozen=True)
class RemoteTarget:
    """Where a URL output goes: the URL as given, and the options of its fsspec file system."""

    url: str
    storage_options: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def shown(self) -> str:
        return shown(self.url)


def remote_layout(
    checkpoints: Sequence[Checkpoint],
    tensors: Sequence[TensorPlan],
    url: str,
    *,
    force: bool,
    max_shard_size: int | str | None,
    wrap_key: str | None,
    like_last: bool,
    format: str | None,
    storage_options: dict | None,
) -> Layout:
    """The layout of an output of `tensors` at a URL, once the target is seen to be writable.

    Raises:
        OutputError: a layout a URL output cannot have, the output is an input, or it exists
            (without `force`).
    """
    target = RemoteTarget(url, storage_options or {})
    folder = url.endswith("/")
    if format == "dcp" or like_last or wrap_key is not None or not (folder or url.endswith(".safetensors")):
        raise OutputError(
            f"{target.shown}: outputs to a URL are .safetensors files or folders ending in '/'; "
            "write torch, `like_last` and DCP outputs to a local path"
        )
    if not folder and max_shard_size is not None:
        raise OutputError(
            f"{target.shown}: `max_shard_size` writes shards into a folder; end the URL with '/'"
        )
    tied = next((t.name for t in tensors if t.same_as is not None), None)
    if tied is not None:
        raise OutputError(
            f"{target.shown}: tied tensors ({tied}) are not streamed to a URL; write to a local path"
        )
    inputs = {(ck.origin or "").split(" (")[0] for ck in checkpoints}  # an object's URL (its version)
    if any(name == target.shown or (folder and name.startswith(target.shown)) for name in inputs):
        raise OutputError(f"{target.shown}: is an input or holds one; choose another output")
    path = Path(url)  # as the plan names it; the URL itself is the target's
    if not folder:
        files = (OutputFile(path.name, tuple(tensors)),)
        _check_absent(target, force=force)
        return Layout(path, files=files, remote=target)
    last = checkpoints[-1]
    root = allowed_root(last.folder, last.label) if last.folder is not None else None
    side, skipped = find_side_files(last.folder, root) if root is not None else ([], [])
    base = weights_name(last)
    limit = parse_size(max_shard_size if max_shard_size is not None else DEFAULT_FOLDER_SHARD_SIZE)
    files = _shards(tensors, limit, base)
    written = (
        {f.name for f in files} | {p.name for p in side} | ({index_name(base)} if len(files) > 1 else set())
    )
    return Layout(
        path,
        folder=True,
        files=files,
        index_name=index_name(base),
        shard_size=limit,
        remote=target,
        extra_files=tuple(side),
        extra_root=root,
        stale=tuple(sorted(_replaced_folder(target, force) - written)),
        warnings=tuple(skipped),
    )


def output_message(url: str, error: BaseException, doing: str) -> str:
    """One line for a storage error met writing an output (no bucket, permission denied, the rest)."""
    if isinstance(error, FileNotFoundError | PermissionError):
        return storage_message(url, error)
    return f"{url}: {doing} ({' '.join(str(error).split()) or type(error).__name__})"


def _check_absent(target: RemoteTarget, *, force: bool) -> None:
    fs, path = filesystem(target.url, target.storage_options)
    try:
        exists = fs.exists(path)
    except Exception as e:  # the storage library's own errors too (no credentials)
        raise OutputError(output_message(target.shown, e, "cannot check the output")) from e
    if exists and not force:
        raise OutputError(f"{target.shown}: already exists; pass `force` to replace it")


def _replaced_folder(target: RemoteTarget, force: bool) -> set[str]:
    """The objects of the earlier ckptavg output in a URL folder that `force` replaces (none for a
    new or empty folder). As for a local folder, objects a user added beside it stay.

    Raises:
        OutputError: the folder holds objects but no ckptavg output, or `force` was not given.
    """
    fs, path = filesystem(target.url, target.storage_options)
    folder = path.rstrip("/")
    try:
        names = {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(folder, detail=False)}
    except FileNotFoundError:
        return set()
    except Exception as e:  # the storage library's own errors too (no credentials)
        raise OutputError(output_message(target.shown, e, "cannot check the output")) from e
    if not names:
        return set()
    try:
        ours = _written_by_ckptavg(fs, folder, names)
    except Exception as e:
        raise OutputError(output_message(target.shown, e, "cannot read the output there")) from e
    if ours is None:
        raise OutputError(
            f"{target.shown}: holds objects that ckptavg did not write; write to a new or empty folder"
        )
    if not force:
        raise OutputError(f"{target.shown}: already holds a checkpoint; pass `force` to replace it")
    return ours & names


def _written_by_ckptavg(fs, folder: str, names: set[str]) -> set[str] | None:
    """The objects of the ckptavg output in a folder (its index, the shards it maps, its single
    weights file, the side files it records as copied), or None when no ckptavg output is there."""
    index = next((n for n in sorted(names) if n.endswith(INDEX_SUFFIX)), None)
    if index is not None:
        document = json.loads(fs.cat_file(f"{folder}/{index}"))
        metadata, weight_map = document.get("metadata") or {}, document.get("weight_map") or {}
        ours = {index, *(v for v in weight_map.values() if isinstance(v, str))}
    else:
        weights = next((n for n in sorted(names) if n.endswith(".safetensors")), None)
        if weights is None:
            return None
        with fs.open(f"{folder}/{weights}", "rb") as file:
            metadata = read_header(f"{folder}/{weights}", file)[1]
        ours = {weights}
    if not isinstance(metadata, dict) or VERSION_KEY not in metadata:
        return None
    return ours | copied_files(metadata)
