"""Streaming safetensors writer and the atomic commit of an output.

`safetensors` can only save a dict held entirely in memory, so this module
writes the format itself: the header first (every offset is known from the
plan), then each tensor's bytes as soon as they are computed. Tensors are laid
out as `safetensors` lays them out (largest dtype first, then by name, header
padded to 8 bytes), which keeps every tensor aligned for zero-copy loading.

Everything is written under a temporary name in the target folder, fsynced,
and renamed into place only on success; on any failure, or Ctrl-C, the
temporary files are removed and an existing output is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from . import dtypes
from .direct import DirectAppender, write_at
from .errors import OutputError
from .units import format_bytes

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
METADATA_KEY = "__metadata__"


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
        self._temp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}{TEMP_MARKER}"
        self._writers: list[SafetensorsWriter] = []
        self._scratch: list[Path] = []
        self._committed = False

    def __enter__(self) -> OutputTransaction:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
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
        path = self.target.parent / f".{self.target.name}.{uuid.uuid4().hex[:8]}{TEMP_MARKER}{suffix}"
        self._scratch.append(path)
        return path

    def copy_file(self, source: Path) -> None:
        """Copy `source` into the output folder under its own name."""
        try:
            shutil.copyfile(source, self.path_of(source.name))
        except OSError as e:
            raise OutputError(f"{self.target}: cannot copy {source}: {e.strerror or e}") from e

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
        with open(path, "x", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> None:
        """Move the finished output into place; an old one is removed only after that."""
        if self.folder:
            _fsync_dir(self._temp)
            old = None
            if self.target.exists():
                old = self.target.parent / f".{self.target.name}.{uuid.uuid4().hex[:8]}.old{TEMP_MARKER}"
                os.rename(self.target, old)
            os.rename(self._temp, self.target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._temp, self.target)
        _fsync_dir(self.target.parent)
        self._committed = True

    def __exit__(self, *exc) -> None:
        for path in self._scratch:
            path.unlink(missing_ok=True)
        if self._committed:
            return
        for writer in self._writers:
            writer.abort()
        if self.folder:
            shutil.rmtree(self._temp, ignore_errors=True)
        else:
            self._temp.unlink(missing_ok=True)


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
    try:
        if (folder / INDEX_NAME).is_file():
            index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
            return VERSION_KEY in index.get("metadata", {})
        if (folder / SINGLE_FILE_NAME).is_file():
            from safetensors import safe_open

            with safe_open(folder / SINGLE_FILE_NAME, framework="pt") as f:
                return VERSION_KEY in (f.metadata() or {})
    except Exception:  # unreadable: not ours to replace
        return False
    return False


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
