"""The files a Hugging Face model folder keeps beside its weights (config, tokenizer), copied safely.

A folder output gets the last input's config and tokenizer files, and users push
such folders to the Hub. So a side file is copied only if it is a regular file
whose real path lies inside the checkpoint's own folder (for a Hub checkpoint:
inside the cache's folder of that repo, where its snapshot links point): a
`tokenizer_config.json` linking to `/proc/self/environ` or `~/.ssh/id_rsa` is
left out, with a warning naming it. Side files are small; a large one is left
out too. Copies never get wider permissions than their source.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import OutputError
from ..units import format_bytes
from .folders import HF_CONFIG_NAME, HUB_PREFIX, is_model_side_file

MAX_SIDE_FILE_BYTES = 100 * 10**6
_HUB_SNAPSHOTS = "snapshots"
_COPY_CHUNK = 2**20


def allowed_root(folder: Path, label: str) -> Path:
    """Where a checkpoint's side files may really live: its folder, or its repo's folder in the Hub cache."""
    folder = Path(os.path.realpath(folder))
    if label.startswith(HUB_PREFIX):
        for parent in folder.parents:
            if parent.name == _HUB_SNAPSHOTS:
                return parent.parent
    return folder


def find_side_files(folder: Path, root: Path, marker: str = HF_CONFIG_NAME) -> tuple[list[Path], list[str]]:
    """The side files of a model folder to copy, and a warning for each one left out.

    None unless `folder` holds `marker` (a `config.json`, or a PEFT adapter's `adapter_config.json`);
    never weights, shard indexes or trainer state.
    """
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return [], []
    names = [p for p in entries if is_model_side_file(p.name)]
    if not any(p.name == marker for p in names):
        return [], []
    files, skipped = [], []
    for path in names:
        problem = _problem(path, root)
        if problem is None:
            files.append(path)
        elif problem:
            skipped.append(f"{path}: not copied to the output: {problem}")
    return files, skipped


def _problem(path: Path, root: Path) -> str | None:
    """Why `path` must not be copied (empty string: it is a folder, nothing to say), or None."""
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        return f"it links to {real}, outside the checkpoint's folder"
    try:
        info = os.stat(real)
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if stat.S_ISDIR(info.st_mode):
        return ""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > MAX_SIDE_FILE_BYTES:
        return f"{format_bytes(info.st_size)}, larger than a config or tokenizer file can be"
    return None


def copy_side_file(source: Path, destination: Path, root: Path) -> None:
    """Copy `source` to the new file `destination`, checking again as the file is opened.

    Raises:
        OutputError: the source changed into something that must not be copied, or a write failed.
    """
    reader, mode = _open_checked(source, root)
    try:
        writer = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            while chunk := os.read(reader, _COPY_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(writer, view) :]
            os.fsync(writer)
        finally:
            os.close(writer)
    except OSError as e:
        raise OutputError(f"{destination.parent}: cannot copy {source}: {e.strerror or e}") from e
    finally:
        os.close(reader)


def read_side_file(source: Path, root: Path) -> bytes:
    """The bytes of `source`, checked again as the file is opened (for an upload).

    Raises:
        OutputError: the source changed into something that must not be copied, or cannot be read.
    """
    reader, _ = _open_checked(source, root)
    try:
        chunks = []
        while chunk := os.read(reader, _COPY_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise OutputError(f"{source}: cannot read it: {e.strerror or e}") from e
    finally:
        os.close(reader)


def _open_checked(source: Path, root: Path) -> tuple[int, int]:
    """A read-only descriptor of `source` if it may still be copied, and the copy's mode (never
    wider than the source's)."""
    problem = _problem(source, root)
    if problem is not None:
        raise OutputError(f"{source}: changed while planning; {problem or 'it is a folder'}")
    real = os.path.realpath(source)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        reader = os.open(real, flags)
    except OSError as e:
        raise OutputError(f"{source}: cannot read it: {e.strerror or e}") from e
    info = os.fstat(reader)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SIDE_FILE_BYTES:
        os.close(reader)
        raise OutputError(f"{source}: changed while planning; not copied")
    return reader, stat.S_IMODE(info.st_mode) & 0o666
