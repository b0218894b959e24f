"""The atomic commit of an output: a file or folder appears whole, or not at all.

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
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..errors import OutputError
from ..formats.safetensors_header import Entry
from ..inputs.side_files import copy_side_file
from ..plan.layout import check_target, kept_files
from . import interrupts, supervision
from .writer import SafetensorsWriter

TEMP_MARKER = ".ckptavg-tmp"


# .{target}.{host}-{pid}-{random}[.old].ckptavg-tmp[suffix]
_TEMPORARY = re.compile(
    r"^\.(?P<target>.+)\.(?P<host>\w+)-(?P<pid>\d+)-[0-9a-f]{8}(?P<old>\.old)?"
    + re.escape(TEMP_MARKER)
    + ".*$"
)


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

    def track(self, writer):
        """Have `writer` (anything with `abort()`, writing under `path_of`) aborted unless committed."""
        self._writers.append(writer)
        return writer

    def add_side_file(self, source: Path, root: Path) -> None:
        """Copy a config or tokenizer file (`inputs.side_files`) into the output folder."""
        copy_side_file(source, self.path_of(source.name), root)

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


def _link_or_copy(source: Path, destination: Path) -> None:
    """A second name for a kept file inside the new output (a copy where links are not supported)."""
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
