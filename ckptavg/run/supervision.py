"""A small supervising parent for the command line: a run that dies still ends in one clear line.

Inputs are memory-mapped. When another process truncates an input while it is
read, the next read of a page past the new end raises SIGBUS, which kills the
process on the spot: no message, no cleanup, a temporary file left behind. No
handler can recover from it, so the console script forks: the child does the
work and tells the parent, through a pipe, which inputs it mapped (with their
size and modification time) and which temporary paths it created. If the child
dies by a signal, the parent names the input that changed, removes the
temporaries that are still there, and exits 1. SIGTERM, SIGINT and SIGHUP sent
to the parent are passed on to the child, which cleans up as usual.

Where there is no `fork` (Windows), the command runs unsupervised.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from ..errors import printable

_FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP")
_POLL_SECONDS = 0.2
_report_fd: list[int] = []  # in the child: the pipe to the parent


def announce_input(path: Path) -> None:
    """Tell the parent an input is mapped, with the size and time it had when opened."""
    if _report_fd:
        with contextlib.suppress(OSError):
            info = os.stat(path)
            _send(["input", str(path), info.st_size, info.st_mtime_ns])


def announce_temporary(path: Path) -> None:
    """Tell the parent a temporary path is about to be created, so it can remove it if we die."""
    _send(["temporary", str(path)])


def _send(message: list) -> None:
    if _report_fd:
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            os.write(_report_fd[0], (json.dumps(message) + "\n").encode())


def run_supervised(work: Callable[[], int]) -> int:
    """Run `work` (returning an exit code) in a child process; its exit code, or 1 if it died."""
    if not hasattr(os, "fork"):
        return work()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        _report_fd.append(writer)
        return work()
    os.close(writer)
    previous = {
        getattr(signal, name): signal.signal(getattr(signal, name), lambda signum, _: _forward(child, signum))
        for name in _FORWARDED
        if hasattr(signal, name)
    }
    try:
        messages, status = _wait(child, reader)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(reader)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    _remove_temporaries(messages)
    _report_death(os.WTERMSIG(status), messages)
    return 1


def _forward(child: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signum)


def _wait(child: int, reader: int) -> tuple[list[list], int]:
    """Collect the child's messages until it ends (a process it forked may keep the pipe open)."""
    buffer = b""
    while True:
        ready, _, _ = select.select([reader], [], [], _POLL_SECONDS)
        chunk = os.read(reader, 65536) if ready else b""
        buffer += chunk
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            buffer += _read_available(reader)
            break
        if ready and not chunk:  # the pipe closed: the child is ending
            _, status = os.waitpid(child, 0)
            break
    messages = []
    for line in buffer.splitlines():
        with contextlib.suppress(ValueError):
            messages.append(json.loads(line))
    return messages, status


def _read_available(reader: int) -> bytes:
    os.set_blocking(reader, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(reader, 65536):
            data += chunk
    return data


def _remove_temporaries(messages: list[list]) -> None:
    for kind, *rest in messages:
        if kind != "temporary":
            continue
        path = Path(rest[0])
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _report_death(signum: int, messages: list[list]) -> None:
    changed = [rest[0] for kind, *rest in messages if kind == "input" and _changed(*rest)]
    if signum == signal.SIGBUS and changed:
        line = (
            f"error: {changed[0]}: changed while it was read (truncated or rewritten by another "
            "process?); nothing was written. Run again once it is complete"
        )
    elif signum == signal.SIGBUS:
        line = "error: a memory-mapped input could not be read (SIGBUS); nothing was written"
    else:
        name = signal.Signals(signum).name
        hint = " (out of memory?)" if signum == signal.SIGKILL else ""
        line = f"error: the run was killed by {name}{hint}; nothing was written"
    os.write(2, (printable(line) + "\n").encode())


def _changed(path: str, size: int, mtime_ns: int) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return True
    return (info.st_size, info.st_mtime_ns) != (size, mtime_ns)
