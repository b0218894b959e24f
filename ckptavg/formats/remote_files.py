"""Safetensors files in object storage or behind HTTP, read by byte ranges without a local copy.

The header is read by small ranges; each tensor's bytes are fetched in blocks by a bounded number
of concurrent range requests (`RangeReader`) running ahead of the sums, within a read-ahead bounded
in bytes. Each object is pinned when it is opened (its ETag, version or size and modification
time): S3 checks every range against the ETag, and every object is checked again before the
output is committed. Requests go through the storage library's file system (fsspec), with its own
retries; a range, an opening or a description that still fails in a way another try may mend is
tried again with back-off (fsspec's HTTP file system retries nothing), and what is left after the
last try is one line naming the object and the byte range. A request in flight never holds up the
end of a failed or interrupted run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from ..errors import InputError
from ..memory import REMOTE_BLOCK_BYTES
from . import dtypes
from .dtypes import TensorInfo
from .safetensors_header import read_header

# Header reads: the first range holds the header of most files whole.
_HEADER_BLOCK = 2**16
# What of an object's description says which version it is, by file system.
_PIN_KEYS = (
    *("ETag", "etag", "VersionId", "version_id", "generation", "size", "LastModified", "mtime"),
    "Last-Modified",  # HTTP's header, as fsspec's HTTP file system describes a URL
)
# A request's tries (a range, an object's opening or description), and the wait before the
# second (doubled before each next one).
REQUEST_TRIES = 3
REQUEST_BACKOFF = 0.5


@dataclass(frozen=True)
class RemoteObject:
    """An object to read: its file system (fsspec), its path there and the URL the user gave.

    `immutable`: the path names one version for good (a Hub commit), which the checkpoint's
    origin already records.
    """

    fs: Any
    path: str
    url: str
    immutable: bool = False


class RangeReader:
    """The range requests of one run: at most `requests` at a time, at most `read_ahead` bytes
    fetched ahead of the sums (each stream being read may hold one block more)."""

    def __init__(self, read_ahead: int, requests: int):
        self.read_ahead = read_ahead
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"ckptavg-range-{i}", daemon=True)
            for i in range(max(1, requests))
        ]
        for worker in self._workers:
            worker.start()
        self._lock = threading.Lock()
        self._held = 0
        self._streams = 0

    def fetch(self, source: RemoteSafetensorsFile, begin: int, end: int) -> Future:
        future: Future = Future()
        self._tasks.put((future, source, begin, end))
        return future

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, source, begin, end = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(source.read_range(begin, end))
            except BaseException as e:  # the waiting reader raises it
                future.set_exception(e)

    def reserve(self, nbytes: int, ahead: int) -> bool:
        """Whether a stream already `ahead` bytes ahead may fetch `nbytes` more (its fair share of
        the read-ahead, and the run's total)."""
        with self._lock:
            share = self.read_ahead // max(1, self._streams)
            if ahead + nbytes > share or self._held + nbytes > self.read_ahead:
                return False
            self._held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes

    def opened(self, change: int) -> None:
        with self._lock:
            self._streams += change

    def close(self) -> None:
        """Cancel the requests not started and stop the workers, without waiting for those in
        flight: a server that stopped answering must not hold up the end of a failed or
        interrupted run (the workers are daemons; what they still fetch is dropped)."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self._workers:
            self._tasks.put(None)

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PinnedRemoteFile:
    """An object opened once and read at the version it had then: every range checked against
    that pin where the storage can (S3: its ETag), the object described again before the commit."""

    def __init__(self, remote: RemoteObject):
        self.remote, self.url = remote, remote.url
        tried(self._open, remote.url)
        self.size = self._file.size

    def _open(self) -> None:
        fs, path = self.remote.fs, self.remote.path
        self._file = fs.open(path, "rb", block_size=_HEADER_BLOCK, cache_type="readahead")
        self.pin = _pin(self._file.details)
        if set(self.pin) <= {"size"}:  # fsspec's HTTP files know their size only: ask for the rest
            self.pin = _pin({**fs.info(path), "size": self._file.size})

    @property
    def version(self) -> str:
        """The version the object was pinned to, as the output's provenance records it."""
        for key in _PIN_KEYS[:5]:
            if key in self.pin:
                return f"{key.lower()} {str(self.pin[key]).strip(chr(34))}"
        return f"size {self.pin.get('size')}"

    def read_range(self, begin: int, end: int):
        """Bytes [begin, end) of the pinned version, as a uint8 tensor."""
        import torch

        data = tried(lambda: self._file._fetch_range(begin, end), self.url, (begin, end))
        if len(data) != end - begin:
            raise InputError(changed_message(self.url))
        return (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )

    def check_unchanged(self) -> None:
        """Refuse an object that changed since it was opened (a new upload over it).

        Raises:
            InputError: naming the object.
        """
        fs, path = self.remote.fs, self.remote.path

        def described() -> dict:
            fs.invalidate_cache(path)
            return _pin(fs.info(path))

        now = tried(described, self.url)
        if {key: now.get(key) for key in self.pin} != self.pin:  # what was pinned, as it is now
            raise InputError(changed_message(self.url))


class RemoteSafetensorsFile(PinnedRemoteFile):
    """A safetensors object read by ranges: the `CheckpointFile` of a URL."""

    notes: tuple[str, ...] = ("read by byte ranges",)
    tied: tuple = ()
    stamp = None  # nothing on this disk: `check_unchanged` asks the storage instead
    decoded_bytes = 0

    def __init__(self, remote: RemoteObject, reader: RangeReader):
        super().__init__(remote)
        self._reader = reader
        self.path = PurePosixPath(remote.path)  # its name in the checkpoint's folder
        self.read_ahead = reader.read_ahead
        stored = self._stored
        self.tensors = {name: TensorInfo(t.dtype, t.shape) for name, t in stored.items()}
        self.offsets = {name: (t.begin, t.end) for name, t in stored.items()}
        self.scalars = {}
        for key, value in self.metadata.items():
            try:
                self.scalars[key] = float(value)
            except ValueError:
                continue

    def get(self, name: str, info: TensorInfo):
        begin, end = self.offsets[name]
        return self.get_bytes(begin, end, info.dtype)[:].view(info.shape)

    def get_flat(self, name: str, info: TensorInfo, within: tuple[int, int] | None = None) -> RemoteBytes:
        begin, end = self.offsets[name]
        return self.get_bytes(begin, end, info.dtype, within)

    def get_bytes(
        self, begin: int, end: int, dtype: str, within: tuple[int, int] | None = None
    ) -> RemoteBytes:
        """The object's bytes [begin, end) as a flat tensor of `dtype`, fetched as it is sliced;
        only the bytes `within` (a rank's part of them) are fetched ahead."""
        return RemoteBytes(self, self._reader, begin, end, dtypes.torch_dtype(dtype), within)

    def _open(self) -> None:
        """Open and pin the object, and read its header (tried again together)."""
        super()._open()
        self._stored, self.metadata = read_header(self.url, self._file)


class RemoteBytes:
    """A flat run of an object's values, as the engine reads it (`[a:b]`, `numel()`,
    `element_size()`, `dtype`): blocks fetched ahead of the slices asked for, in order, from the
    start to the end of the bytes `within` (all of them unless given)."""

    def __init__(
        self,
        source: RemoteSafetensorsFile,
        reader: RangeReader,
        begin: int,
        end: int,
        dtype,
        within: tuple[int, int] | None = None,
    ):
        self._source, self._reader = source, reader
        self._begin, self._end, self.dtype = begin, end, dtype
        self._blocks: deque[tuple[int, int, Future, bool]] = deque()  # begin, end, bytes, reserved
        self._next, self._last = within or (begin, end)  # the next block to fetch starts at _next
        self._ahead = 0  # bytes of the blocks held under this stream's share
        self._open = True
        reader.opened(+1)
        # The first block now, more at the first read: by then the streams of the other inputs'
        # same tensor are open too, and each takes its share of the read-ahead (the first one
        # would otherwise take it all, and the others would wait on every block).
        self._fill(needed=self._next + 1, ahead=False)

    def numel(self) -> int:
        return (self._end - self._begin) // self.dtype.itemsize

    def element_size(self) -> int:
        return self.dtype.itemsize

    def __getitem__(self, window: slice):
        import torch

        start, stop, _ = window.indices(self.numel())
        begin = self._begin + start * self.dtype.itemsize
        end = self._begin + max(start, stop) * self.dtype.itemsize
        while self._blocks and self._blocks[0][1] <= begin:
            self._drop()
        if self._blocks:
            behind = self._blocks[0][0] > begin
        else:  # every block fetched was read: fetching goes on from here, unless this was read
            behind = not self._open or begin < self._next
            self._next = max(self._next, begin)
        if end == begin:
            raw = torch.empty(0, dtype=torch.uint8)
        elif behind:  # behind the read-ahead: read again
            raw = self._source.read_range(begin, end)
        else:
            self._fill(needed=end)
            parts = []
            for block_begin, block_end, future, _ in list(self._blocks):
                if block_begin >= end:
                    break
                values = future.result()
                parts.append(values[max(begin - block_begin, 0) : min(end, block_end) - block_begin])
            raw = parts[0] if len(parts) == 1 else torch.cat(parts)
            if end >= self._last:
                self.close()
        try:
            return raw.view(self.dtype)
        except RuntimeError:  # a view of a block at an odd offset: a copy, still correct
            return raw.clone().view(self.dtype)

    def _fill(self, needed: int = 0, ahead: bool = True) -> None:
        """Fetch the blocks up to `needed` (the first block always), and with `ahead` more within
        this stream's share of the read-ahead."""
        while self._open and self._next < self._last:
            if not ahead and self._blocks and self._next >= needed:
                return
            block_end = min(self._next + REMOTE_BLOCK_BYTES, self._last)
            size = block_end - self._next
            reserved = self._reader.reserve(size, self._ahead)
            if not reserved and self._blocks and self._next >= needed:
                return
            self._blocks.append(
                (self._next, block_end, self._reader.fetch(self._source, self._next, block_end), reserved)
            )
            self._ahead += size if reserved else 0
            self._next = block_end

    def _drop(self) -> None:
        begin, end, future, reserved = self._blocks.popleft()
        future.cancel()
        if reserved:
            self._ahead -= end - begin
            self._reader.release(end - begin)

    def close(self) -> None:
        """Give back this stream's share of the read-ahead (blocks already fetched are dropped)."""
        if self._open:
            self._open = False
            while self._blocks:
                self._drop()
            self._reader.opened(-1)

    def __del__(self) -> None:
        self.close()


def listed_files(fs, folder: str) -> dict[str, int]:
    """A remote folder's files (not its subfolders): name -> size."""
    entries = fs.ls(folder, detail=True)
    return {
        entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size") or 0
        for entry in entries
        if entry.get("type") != "directory"
    }


def _pin(details: dict) -> dict:
    """What identifies the version of an object in its description (ETag, version id, size, ...)."""
    return {key: details[key] for key in _PIN_KEYS if details.get(key) is not None}


def changed_message(url: str) -> str:
    return (
        f"{url}: changed while being read (a new upload over it, or one still under way); run again "
        "once it is complete"
    )


def tried(request, url: str, byte_range: tuple[int, int] | None = None):
    """`request()`, tried again after a failure that another try may mend (`REQUEST_TRIES` in all,
    after waits that double), since fsspec's HTTP file system retries nothing.

    Raises:
        InputError: what is left after the last try, one line naming the object (and the range).
    """
    for attempt in range(1, REQUEST_TRIES + 1):
        try:
            return request()
        except InputError:
            raise
        except Exception as e:
            if attempt == REQUEST_TRIES or not transient(e):
                raise InputError(storage_message(url, e, byte_range, attempt)) from e
        time.sleep(REQUEST_BACKOFF * 2 ** (attempt - 1))


def transient(error: BaseException) -> bool:
    """Whether another try may succeed, and no library tried already: not a missing object, a
    refusal, a changed object, a server that ignores ranges (fsspec's ValueError), an HTTP answer
    of 4xx other than 408 and 429, nor botocore's own errors (after its retries: a connection or
    time-out that more tries would only make wait longer)."""
    error = unanswered(error) or error
    kind = type(error)
    if isinstance(error, FileNotFoundError | PermissionError | ValueError) or kind.__name__ == "FileExpired":
        return False
    if kind.__module__.startswith("botocore."):
        return False
    status = getattr(error, "status", None)  # aiohttp's error for an HTTP answer
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))


def unanswered(error: BaseException) -> BaseException | None:
    """The failure behind a FileNotFoundError that is none: fsspec's HTTP file system raises one for
    any failure to describe a URL (nothing listening, no answer, a 503), not only for a 404."""
    cause = error.__cause__
    if not isinstance(error, FileNotFoundError) or not type(cause).__module__.startswith("aiohttp"):
        return None
    return None if getattr(cause, "status", None) in (404, 410) else cause


def storage_message(
    url: str, error: BaseException, byte_range: tuple[int, int] | None = None, tries: int = 1
) -> str:
    """One line for a storage error: no such object, permission denied, a changed object, or what
    was left after the last retry (with the byte range, and how many times ckptavg tried it)."""
    error = unanswered(error) or error
    if type(error).__name__ == "FileExpired":  # s3fs: the ETag no longer matches
        return changed_message(url)
    if isinstance(error, FileNotFoundError):
        return f"{url}: no such object (or bucket)"
    if isinstance(error, PermissionError):
        return (
            f"{url}: permission denied (check the credentials the storage library finds, or pass "
            "them in `storage_options`)"
        )
    cause = " ".join(str(error).split()) or type(error).__name__
    times = f" after {tries} tries" if tries > 1 else ""
    if byte_range:
        return f"{url}: reading bytes {byte_range[0]}-{byte_range[1] - 1} failed{times} ({cause})"
    return f"{url}: cannot be read{times} ({cause})"


def open_remote_checkpoint(
    remote: RemoteObject,
    reader: RangeReader,
    downloads,
    *,
    key: str | None = None,
    master_weights: bool = False,
    **opening,
):
    """A checkpoint in object storage: a safetensors object, or the index of safetensors shards, read
    by ranges; a torch file (or an index of torch shards), DCP or DeepSpeed folder from a copy in
    `downloads`, a `remote_downloads.Downloads` (`opening`: `strip_prefix`, `label`, `origin`, `include`,
    `exclude`, as `readers.open_checkpoint`).

    Raises:
        InputError: not a checkpoint ckptavg reads, a shard is missing, or the storage refuses.
    """
    import json

    from .readers import INDEX_SUFFIX, SAFETENSORS_SUFFIX, Checkpoint
    from .torch_format import TORCH_SUFFIXES

    name = remote.path.rstrip("/").rsplit("/", 1)[-1]
    if name.endswith(INDEX_SUFFIX) and not name.removesuffix(INDEX_SUFFIX).endswith(TORCH_SUFFIXES):
        try:
            index = json.loads(tried(lambda: remote.fs.cat_file(remote.path), remote.url))
        except ValueError as e:
            raise InputError(f"{remote.url}: not a valid shard index ({e})") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{remote.url}: not a valid shard index (no 'weight_map' of names to files)")
        folder, base = remote.path.rsplit("/", 1)[0], remote.url.rsplit("/", 1)[0]
        shards = [
            RemoteSafetensorsFile(RemoteObject(remote.fs, f"{folder}/{shard}", f"{base}/{shard}"), reader)
            for shard in dict.fromkeys(weight_map.values())
        ]
    elif name.endswith(SAFETENSORS_SUFFIX):
        weight_map, shards = None, [RemoteSafetensorsFile(remote, reader)]
    else:
        from .remote_downloads import open_downloaded

        return open_downloaded(remote, downloads, key=key, master_weights=master_weights, **opening)
    if not remote.immutable:
        opening["origin"] = f"{opening.get('origin') or remote.url} ({shards[0].version})"
    checkpoint = Checkpoint(None, shards, weight_map, **opening)
    if not checkpoint.tensors:
        raise InputError(f"{remote.url}: holds no tensors")
    return checkpoint
