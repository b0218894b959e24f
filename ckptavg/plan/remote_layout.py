"""The layout of an output to a URL (`s3://bucket/avg.safetensors`, `s3://bucket/folder/`): a
safetensors file or a Hugging Face folder of shards, streamed by `run/remote_output.py`; other
layouts are refused in one line. An existing object is replaced only with `force`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputError
from ..formats.readers import Checkpoint
from ..formats.remote_files import storage_message
from ..inputs.remote import filesystem, shown
from ..inputs.side_files import allowed_root, find_side_files
from ..units import parse_size
from .layout import DEFAULT_FOLDER_SHARD_SIZE, Layout, _shards, index_name, weights_name
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
        _check_absent(target, folder=False, force=force)
        return Layout(path, files=files, remote=target)
    _check_absent(target, folder=True, force=force)
    last = checkpoints[-1]
    root = allowed_root(last.folder, last.label) if last.folder is not None else None
    side, skipped = find_side_files(last.folder, root) if root is not None else ([], [])
    base = weights_name(last)
    limit = parse_size(max_shard_size if max_shard_size is not None else DEFAULT_FOLDER_SHARD_SIZE)
    return Layout(
        path,
        folder=True,
        files=_shards(tensors, limit, base),
        index_name=index_name(base),
        shard_size=limit,
        remote=target,
        extra_files=tuple(side),
        extra_root=root,
        warnings=tuple(skipped),
    )


def output_message(url: str, error: BaseException, doing: str) -> str:
    """One line for a storage error met writing an output (no bucket, permission denied, the rest)."""
    if isinstance(error, FileNotFoundError | PermissionError):
        return storage_message(url, error)
    return f"{url}: {doing} ({' '.join(str(error).split()) or type(error).__name__})"


def _check_absent(target: RemoteTarget, *, folder: bool, force: bool) -> None:
    fs, path = filesystem(target.url, target.storage_options)
    try:
        exists = bool(fs.ls(path.rstrip("/"), detail=False)) if folder else fs.exists(path)
    except FileNotFoundError:
        exists = False
    except Exception as e:  # the storage library's own errors too (no credentials)
        raise OutputError(output_message(target.shown, e, "cannot check the output")) from e
    if exists and not force:
        what = "already holds objects" if folder else "already exists"
        raise OutputError(f"{target.shown}: {what}; pass `force` to replace it")
