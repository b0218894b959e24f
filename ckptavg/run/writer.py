"""Streaming safetensors writer and the atomic commit of an output.

`safetensors` can only save a dict held entirely in memory, so this module
writes the format itself: the header first (every offset is known from the
plan), then each tensor's bytes as soon as they are computed. Tensors are laid
out as `safetensors` lays them out (largest dtype first, then by name, header
padded to 8 bytes), which keeps every tensor aligned for zero-copy loading.

Everything is written under a temporary name in the target folder, fsynced,
and renamed into place only on success; on any failure, or Ctrl-C, the
temporary files are removed and an existing output is left as it was.
Temporary names carry the host and process id, so the next run writing to the
same folder removes those of a run that was killed (SIGKILL) and cannot clean up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import OutputError
from ..formats import dtypes
from ..units import format_bytes
from . import interrupts, supervision
from .direct import DirectAppender, write_at

HEADER_ALIGNMENT = 8
TEMP_MARKER = ".ckptavg-tmp"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
TORCH_OUTPUT_SUFFIXES = (".pt", ".pth", ".bin")
# Start the disk writing every this many bytes: the kernel would otherwise wait for
# gigabytes of dirty pages, and the final fsync would then wait for all of them.
WRITEBACK_BYTES = 64 * 2**20
_SYNC_FILE_RANGE_WRITE = 2
VERSION_KEY = "ckptavg.version"
COPIED_KEY = "ckptavg.copied"  # the side files a folder output holds, so a later --force knows them
METADATA_KEY = "__metadata__"
_SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# .{target}.{host}-{pid}-{random}[.old].ckptavg-tmp[suffix]
_TEMPORARY = re.compile(
    r"^\.(?P<target>.+)\.(?P<host>\w+)-(?P<pid>\d+)-[0-9a-f]{8}(?P<old>\.old)?"
    + re.escape(TEMP_MARKER)
    + ".*$"
)


@dataclass(frozen=True)
class Entry:
    """One tensor of an output file, in write order."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return dtypes.TensorInfo(self.dtype, self.shape).nbytes


def layout_order(entries: Iterable[Entry]) -> list[Entry]:
    """The order `safetensors.save_file` uses (by its dtype rank, then name): larger dtypes first."""
    return sorted(entries, key=lambda e: (-dtypes.layout_rank(e.dtype), e.name))


def encode_header(entries: Sequence[Entry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length prefix and padded JSON header for tensors written in `entries` order."""
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = metadata
    offset = 0
    for entry in entries:
        if entry.name == METADATA_KEY:
            raise OutputError(f"a tensor is named '{METADATA_KEY}', which safetensors reserves; rename it")
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Writes one safetensors file: the header, then each tensor's bytes at its offset.

    Bytes that arrive in file order, as the engine hands them out, are appended
    past the page cache (see `direct`) where the file system allows it. The
    first write elsewhere (a tied weight's copy) ends that: from then on writes
    are positioned (`pwrite`) through the page cache, so a chunk can go to
    several tensors and the order of writes does not matter. `finish` checks
    that every declared byte was written.
    """

    def __init__(
        self, path: Path, entries: Sequence[Entry], metadata: dict[str, str], label: Path | None = None
    ):
        self.path = path
        self.label = label or path  # the file's name in error messages: the output, not its temporary name
        header = encode_header(entries, metadata)
        self._expected = sum(entry.nbytes for entry in entries)
        self._written = 0
        self._unflushed = 0
        self._offsets: dict[str, int] = {}
        offset = len(header)
        for entry in entries:
            self._offsets[entry.name] = offset
            offset += entry.nbytes
        self._file = open(path, "xb", buffering=0)  # noqa: SIM115 (closed in finish/abort)
        self._direct = DirectAppender.open(path, header, self.label)
        if self._direct is None:
            self._write_all(memoryview(header), 0)

    @property
    def direct(self) -> bool:
        """Whether bytes written now bypass the page cache."""
        return self._direct is not None

    def write(self, name: str, start: int, tensor) -> None:
        """Write a contiguous CPU tensor's bytes into tensor `name`, `start` bytes into its data."""
        if tensor.numel() == 0:
            return
        import torch

        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        self._written += raw.nbytes
        if self._written > self._expected:
            raise OutputError(f"{self.label}: more data than the header declares (internal error)")
        offset = self._offsets[name] + start
        if self._direct is not None:
            if offset == self._direct.position:
                self._direct.append(memoryview(raw))
                return
            self._end_direct()
        self._write_all(memoryview(raw), offset)
        self._unflushed += raw.nbytes
        if self._unflushed >= WRITEBACK_BYTES:
            _start_writeback(self._file.fileno())
            self._unflushed = 0

    def finish(self) -> None:
        """Check every declared byte was written, then flush to disk."""
        if self._written != self._expected:
            raise OutputError(
                f"{self.label}: wrote {self._written} of {self._expected} data bytes (internal error)"
            )
        if self._direct is not None:
            self._end_direct()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        try:
            if self._direct is not None:
                self._direct.abort()
        finally:
            self._file.close()

    def _end_direct(self) -> None:
        """Stop appending past the page cache; what was still staged is written the ordinary way."""
        direct, self._direct = self._direct, None
        staged, offset = direct.close()
        self._write_all(staged, offset)

    def _write_all(self, data: memoryview, offset: int) -> None:
        write_at(self._file.fileno(), data, offset, self.label)


class OutputTransaction:
    """Makes an output file or folder appear whole, or not at all.

    Files are created under a temporary path next to `target` (same file
    system, so the final rename is atomic) and moved into place by `commit`.
    Leaving the `with` block without `commit` removes them.
    """

    def __init__(self, target: Path, *, folder: bool, force: bool = False):
        self.target = target
        self.folder = folder
        self.force = force
        check_target(target, folder=folder, force=force)
        self._temp = temporary_path(target)
        self._writers: list[SafetensorsWriter] = []
        self._scratch: list[Path] = []
        self._committed = False

    def __enter__(self) -> OutputTransaction:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.target.parent)
            if self.folder:
                self._temp.mkdir()
        except OSError as e:
            raise OutputError(f"{self.target}: cannot create the output here: {e.strerror or e}") from e
        return self

    def path_of(self, name: str) -> Path:
        """Where to write file `name` of the output (a temporary path until commit)."""
        return self._temp / name if self.folder else self._temp

    def scratch_path(self, suffix: str) -> Path:
        """A temporary file next to the output, removed when the block ends, committed or not."""
        path = temporary_path(self.target, suffix)
        self._scratch.append(path)
        return path

    def safetensors(
        self, name: str, entries: Sequence[Entry], metadata: dict[str, str], path: Path | None = None
    ) -> SafetensorsWriter:
        """A writer for file `name` of the output (or for `path`, such as a scratch file)."""
        try:
            label = self.target / name if self.folder else self.target
            writer = SafetensorsWriter(path or self.path_of(name), entries, metadata, label)
        except OSError as e:
            raise OutputError(f"{self.target}: cannot create {name}: {e.strerror or e}") from e
        self._writers.append(writer)
        return writer

    def write_json(self, name: str, content: dict) -> None:
        path = self.path_of(name)
        try:
            with open(path, "x", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"{self.target}: cannot write {name}: {e.strerror or e}") from e

    def commit(self) -> None:
        """Move the finished output into place; an old one is removed only after that.

        An old folder output keeps the files ckptavg did not write (a user's
        `eval_results.json`): they are linked into the new folder before the swap.
        """
        interrupts.check()  # never put an output in place after Ctrl-C, even a swallowed one
        try:
            if self.folder:
                self._commit_folder()
            else:
                os.replace(self._temp, self.target)
            _fsync_dir(self.target.parent)
        except OSError as e:
            raise OutputError(f"{self.target}: cannot put the output in place: {e.strerror or e}") from e
        self._committed = True
        interrupts.note_commit(self.target)

    def _commit_folder(self) -> None:
        for name in kept_files(self.target, {p.name for p in self._temp.iterdir()}):
            _link_or_copy(self.target / name, self._temp / name)
        _fsync_dir(self._temp)
        old = None
        if self.target.exists():
            old = temporary_path(self.target, old=True)
            os.rename(self.target, old)
        os.rename(self._temp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        # A failed removal (a read-only file system) must not hide why the run failed.
        for path in self._scratch:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if self._committed:
            return
        for writer in self._writers:
            writer.abort()
        if self.folder:
            shutil.rmtree(self._temp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self._temp.unlink(missing_ok=True)


def temporary_path(target: Path, suffix: str = "", *, old: bool = False) -> Path:
    """A new temporary path next to `target`, named for this host and process.

    The supervising parent is told of it first, so it can remove it if this process dies.
    """
    tag = f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{'.old' if old else ''}"
    path = target.parent / f".{target.name}.{tag}{TEMP_MARKER}{suffix}"
    supervision.announce_temporary(path)
    return path


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporaries that runs on this host left in `folder` when killed.

    Only those whose process is gone; an old output that a killed run had moved
    aside, with no new output in its place, is put back instead.
    """
    host = _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or match["host"] != host or _alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        target = folder / match["target"]
        with contextlib.suppress(OSError):
            if match["old"] and not target.exists():
                os.rename(path, target)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()


def _host() -> str:
    """This machine's name as it goes into temporary names: a process id means something only here."""
    return re.sub(r"\W", "_", socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that has ended but not been reaped (its parent died too, and nobody waits for it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):  # no /proc (not Linux): take it as running
        return False
    return state in (b"Z", b"X")


def kept_files(folder: Path, replaced: set[str]) -> list[str]:
    """The files of an old ckptavg folder output that ckptavg did not write, and the new one does not
    replace: what a user added (evaluation results, notes). Kept by `--force`."""
    if not folder.is_dir():
        return []
    ours = _files_written_by_ckptavg(folder)
    return sorted(p.name for p in folder.iterdir() if p.name not in ours and p.name not in replaced)


def _files_written_by_ckptavg(folder: Path) -> set[str]:
    """The weights, index and copied side files of a ckptavg folder output, as its metadata lists them."""
    ours = {INDEX_NAME, SINGLE_FILE_NAME}
    ours.update(p.name for p in folder.iterdir() if _SHARD_PATTERN.match(p.name))
    metadata = _output_metadata(folder) or {}
    with contextlib.suppress(ValueError, TypeError):
        ours.update(name for name in json.loads(metadata.get(COPIED_KEY, "[]")) if isinstance(name, str))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
        ours.update(v for v in index.get("weight_map", {}).values() if isinstance(v, str))
    return ours


def _link_or_copy(source: Path, destination: Path) -> None:
    """A second name for a kept file inside the new output (a copy where links are not supported)."""
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def check_target(target: Path, *, folder: bool, force: bool) -> None:
    """Refuse an output that would replace something without `force`, or that is not ours to replace.

    Raises:
        OutputError: with what to do instead.
    """
    if not target.exists() and not target.is_symlink():
        return
    if folder:
        if not target.is_dir():
            raise OutputError(f"{target}: exists and is not a folder; choose another output folder")
        contents = list(target.iterdir())
        if not contents:
            return
        if not _written_by_ckptavg(target) or any(not p.is_file() for p in contents):
            raise OutputError(
                f"{target}: holds files that ckptavg did not write; write to a new or empty folder"
            )
        if not force:
            raise OutputError(f"{target}: already holds a checkpoint; pass --force to replace it")
        return
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; for a folder output end the path with '/'")
    if not force:
        raise OutputError(f"{target}: already exists; pass --force to replace it")


def _written_by_ckptavg(folder: Path) -> bool:
    """Whether a folder holds a checkpoint whose metadata says ckptavg wrote it."""
    return VERSION_KEY in (_output_metadata(folder) or {})


def _output_metadata(folder: Path) -> dict | None:
    """The metadata of the checkpoint in a folder output (its index's, or its single file's)."""
    try:
        if (folder / INDEX_NAME).is_file():
            metadata = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8")).get("metadata", {})
            return metadata if isinstance(metadata, dict) else None
        if (folder / SINGLE_FILE_NAME).is_file():
            from safetensors import safe_open

            with safe_open(folder / SINGLE_FILE_NAME, framework="pt") as f:
                return f.metadata() or {}
    except Exception:  # unreadable: not ours to replace
        return None
    return None


def free_space(path: Path) -> int:
    """Bytes free on the file system that holds `path` (or would hold it, once its folders exist)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def ensure_free_space(target: Path, nbytes: int) -> None:
    """Fail before writing when the output cannot fit on its file system."""
    free = free_space(target.parent)
    if nbytes > free:
        raise OutputError(
            f"{target}: needs {format_bytes(nbytes)} but only {format_bytes(free)} is free there; "
            "free some space or write elsewhere"
        )


@cache
def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none.

    Looked up among the symbols already loaded into the process: `find_library`
    would run `ldconfig -p` in a child process on every run.
    """
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux: no such call, or no process handle
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting for them (a hint only)."""
    function = _sync_file_range()
    if function is not None:
        function(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
