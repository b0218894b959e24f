"""Torch files, DCP folders and DeepSpeed folders in object storage: the files the local readers
read, downloaded from one pinned version into a private temporary folder, opened by
`readers.open_checkpoint` as a local input is, and removed when the run ends.

Those readers map their files and seek in them (zip directories, pickles, a DCP chunk's archive at
its offset), so they read a local copy; safetensors objects need none (`remote_files`). A dry run
downloads no weights: a torch archive is copied sparsely, with only the bytes that opening it
reads (`archive_skeleton`), and a DCP folder is planned from its `.metadata`.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import zipfile
from collections import deque
from pathlib import Path, PurePosixPath

from .. import disk
from ..errors import InputError
from ..memory import REMOTE_BLOCK_BYTES
from ..units import format_bytes
from .archive_skeleton import archive_skeleton
from .dcp import DISTCP_SUFFIX, METADATA_NAME, entry_info, is_dcp_folder, left_out, pick_model_tensors
from .dcp_metadata import read_metadata
from .deepspeed import (
    MODEL_STATES,
    OPTIM_STATES,
    ZERO12_MODEL,
    is_deepspeed_folder,
    refuse_parallelism,
)
from .files import HeaderOnlyFile
from .readers import INDEX_SUFFIX, Checkpoint, open_checkpoint
from .remote_files import PinnedRemoteFile, RangeReader, RemoteObject, listed_files, storage_message, tried
from .torch_format import TORCH_SUFFIXES

_PREFIX = "ckptavg-download-"


class Downloads:
    """Where one opening of checkpoints downloads: a private folder (mode 0700) under the system's
    temporary folder (`TMPDIR`), made at the first download and removed on exit, on failure and on
    Ctrl-C alike. `fetch` False: a dry run, which downloads no weights."""

    def __init__(self, reader: RangeReader, fetch: bool):
        self.reader, self.fetch = reader, fetch
        self._root: Path | None = None
        self._count = itertools.count()

    def folder(self) -> Path:
        """A new, empty folder for one checkpoint's files."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix=_PREFIX))
        folder = self._root / str(next(self._count))
        folder.mkdir()
        return folder

    def ensure_room(self, url: str, nbytes: int) -> None:
        """Refuse a download that the temporary folder's file system cannot hold.

        Raises:
            InputError: naming the input, the bytes and the folder.
        """
        where = Path(tempfile.gettempdir())
        free = disk.free_space(where)
        if nbytes > free:
            raise InputError(
                f"{url}: downloading it needs {format_bytes(nbytes)} in {where}, which has "
                f"{format_bytes(free)} free; point TMPDIR at a folder with more room"
            )

    def __enter__(self) -> Downloads:
        return self

    def __exit__(self, *exc) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


class PinnedObject(PinnedRemoteFile):
    """One object to download, read at one version as a safetensors object is."""

    def ranges(self, reader: RangeReader, spans) -> list[bytes]:
        """The bytes of each [begin, end), fetched through the run's pool of range requests."""
        futures = [reader.fetch(self, begin, end) for begin, end in spans]
        try:
            return [future.result().numpy().tobytes() for future in futures]
        finally:
            for future in futures:
                future.cancel()

    def download(self, target: Path, reader: RangeReader) -> None:
        """The whole object into `target` (a new file), in blocks fetched within the read-ahead."""
        window = max(1, reader.read_ahead // REMOTE_BLOCK_BYTES)
        pending: deque = deque()
        try:
            with open(target, "xb") as out:
                for begin in range(0, self.size, REMOTE_BLOCK_BYTES):
                    pending.append(reader.fetch(self, begin, min(begin + REMOTE_BLOCK_BYTES, self.size)))
                    if len(pending) >= window:
                        out.write(pending.popleft().result().numpy())
                while pending:
                    out.write(pending.popleft().result().numpy())
        except OSError as e:
            raise InputError(f"{self.url}: cannot be downloaded to {target.parent} ({e})") from e
        finally:
            for future in pending:
                future.cancel()

    def skeleton(self, target: Path, reader: RangeReader) -> int | None:
        """A sparse copy in `target` holding what opening the archive reads; its bytes, or None
        when it is not a zip archive."""
        try:
            pieces = archive_skeleton(self._file, self.size, lambda spans: self.ranges(reader, spans))
        except InputError:
            raise
        except zipfile.BadZipFile as e:
            raise InputError(f"{self.url}: not a readable torch checkpoint (its zip directory: {e})") from e
        except Exception as e:
            raise InputError(storage_message(self.url, e)) from e
        if pieces is None:
            return None
        with open(target, "xb") as out:
            out.truncate(self.size)
            for begin, data in pieces:
                out.seek(begin)
                out.write(data)
        return sum(len(data) for _, data in pieces)


def open_downloaded(
    remote: RemoteObject, downloads: Downloads, *, key: str | None, master_weights: bool, **opening
) -> Checkpoint:
    """A torch file (or an index of torch shards), DCP folder or DeepSpeed folder in object storage,
    opened from a local copy of the files the local reader reads (`opening`: as
    `readers.open_checkpoint`'s).

    Raises:
        InputError: not a checkpoint read this way, no room for it, an object changed while being
            downloaded, the storage refusing, or what the local reader refuses (naming the URL).
    """
    name = remote.path.rstrip("/").rsplit("/", 1)[-1]
    is_folder, wanted = _wanted(remote, name, master_weights)
    root = downloads.folder()
    if is_folder:  # its files go into a folder of its name
        local, opened = root / name, root / name
        local.mkdir()
        path, url = remote.path.rstrip("/"), remote.url.rstrip("/")
    else:  # it and its shards go side by side
        local, opened = root, root / name
        path, url = remote.path.rsplit("/", 1)[0], remote.url.rsplit("/", 1)[0]
    pinned = [
        PinnedObject(RemoteObject(remote.fs, f"{path}/{n}", f"{url}/{n}", remote.immutable)) for n in wanted
    ]
    targets = [local / n for n in wanted]
    total = sum(p.size for p in pinned)
    if not remote.immutable:
        opening["origin"] = f"{opening.get('origin') or remote.url} ({pinned[0].version})"
    if downloads.fetch:
        downloads.ensure_room(remote.url, total)
        for p, target in zip(pinned, targets, strict=True):
            p.download(target, downloads.reader)
    else:
        read = sum(_planning_copy(p, target, downloads) for p, target in zip(pinned, targets, strict=True))
    for p in pinned:
        p.check_unchanged()
    if not downloads.fetch and wanted[0] == METADATA_NAME:
        return _planned_dcp(targets[0], remote.url, key, total, opening)
    try:
        checkpoint = open_checkpoint(opened, key=key, master_weights=master_weights, **opening)
    except InputError as e:
        raise InputError(str(e).replace(str(local), url)) from e
    checkpoint.notes.append(
        f"downloaded to a temporary folder first ({format_bytes(total)})"
        if downloads.fetch
        else f"planned from its zip {'directories' if len(pinned) > 1 else 'directory'} "
        f"({format_bytes(read)} read); a run downloads it to a temporary folder first ({format_bytes(total)})"
    )
    return checkpoint


def _wanted(remote: RemoteObject, name: str, master_weights: bool) -> tuple[bool, list[str]]:
    """Whether the checkpoint is a folder, and the files of it (or beside it) the local reader reads,
    first the one that says which version it is: a torch file; an index and its torch shards; a DCP
    folder's `.metadata` and `*.distcp`; a DeepSpeed folder's states (`_deepspeed_files`)."""
    fs = remote.fs
    try:
        if name.endswith(INDEX_SUFFIX):
            return False, [name, *_shards(remote)]
        is_file = name.endswith(TORCH_SUFFIXES) or not fs.isdir(remote.path)
        names = {} if is_file else listed_files(fs, remote.path)
    except InputError:
        raise
    except Exception as e:
        raise InputError(storage_message(remote.url, e)) from e
    if names and is_dcp_folder(names) and not master_weights:
        return True, [METADATA_NAME, *sorted(n for n in names if n.endswith(DISTCP_SUFFIX))]
    if names and is_deepspeed_folder(names):
        refuse_parallelism(remote.url, sorted(names))
        return True, _deepspeed_files(sorted(names), master_weights)
    if names or not name.endswith(TORCH_SUFFIXES):
        raise InputError(
            f"{remote.url}: not a checkpoint ckptavg reads from remote storage (safetensors, "
            f"{', '.join(TORCH_SUFFIXES)}, a DCP folder or a DeepSpeed global_stepN folder)"
        )
    return False, [name]


def _shards(remote: RemoteObject) -> list[str]:
    """The shard files an index names, each a file beside it (the local reader refuses a damaged
    index once it is downloaded)."""
    try:
        index = json.loads(tried(lambda: remote.fs.cat_file(remote.path), remote.url))
    except ValueError:
        return []
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return []
    shards = [shard for shard in dict.fromkeys(weight_map.values()) if isinstance(shard, str)]
    for shard in shards:
        if PurePosixPath(shard).name != shard or shard in (".", ".."):
            raise InputError(f"{remote.url}: names shard '{shard}', not a file beside the index")
    return shards


def _planning_copy(pinned: PinnedObject, target: Path, downloads: Downloads) -> int:
    """What a dry run fetches of an object: a torch archive's sparse copy, any other file whole (an
    index, DCP's `.metadata`; a legacy torch file, which is read whole when opened); the bytes."""
    fetched = pinned.skeleton(target, downloads.reader)
    if fetched is None:
        downloads.ensure_room(pinned.url, pinned.size)
        pinned.download(target, downloads.reader)
        return pinned.size
    return fetched


def _deepspeed_files(names: list[str], master_weights: bool) -> list[str]:
    """What `deepspeed.open_deepspeed_folder` reads: ZeRO-1/2's model states, or with the master
    weights (ZeRO-3's always) every rank's model and optimizer states."""
    models = [n for n in names if MODEL_STATES.match(n)]
    if ZERO12_MODEL in names and not master_weights:
        return [ZERO12_MODEL]
    return models + [n for n in names if OPTIM_STATES.match(n)]


def _planned_dcp(metadata: Path, url: str, key: str | None, total: int, opening: dict) -> Checkpoint:
    """A DCP folder known by its `.metadata` alone: enough to plan (its chunks are checked when a
    run reads them)."""
    try:
        meta = read_metadata(metadata)
    except InputError as e:
        raise InputError(str(e).replace(str(metadata.parent), url.rstrip("/"))) from e
    chosen, names, rule = pick_model_tensors(meta, key, url)
    prefix = f"{chosen}." if chosen else ""
    tensors = {
        name: entry_info(meta.tensors[prefix + name], prefix + name, url.rstrip("/")) for name in names
    }
    left = left_out(meta, {prefix + name for name in names})
    file = HeaderOnlyFile(METADATA_NAME, url, tensors, {})
    file.notes = (
        f"DCP, {rule}",
        *([f"left out: {left}"] if left else []),
        f"planned from its .metadata; a run downloads its .metadata and *.distcp files to a temporary "
        f"folder first ({format_bytes(total)})",
    )
    checkpoint = Checkpoint(None, [file], None, **opening)
    if not checkpoint.tensors:
        raise InputError(f"{url}: holds no tensors")
    return checkpoint
