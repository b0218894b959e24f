"""Ctrl-C and SIGTERM, honoured from a command's first instruction to its last.

The signals raise `KeyboardInterrupt` (SIGTERM: its subclass `Terminated`), so
every `with` block cleans up on the way out. Some libraries swallow that
exception: torch's C++ code clears any error raised while it imports numpy,
which once let an interrupted run go on, replace its output and exit 0. So the
handler also records the signal, and `check` raises it again wherever ckptavg
is about to make progress visible (between tensors, before a commit). Only the
first signal raises; later ones are recorded, so they cannot cut a cleanup short.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), raised like Ctrl-C so every `with` block cleans up."""


_received: list[int] = []  # signals received while handlers are installed, in order
_committed: list[Path] = []  # outputs put in place since then
_depth = [0]  # how many `honoured` blocks are open
_HANDLED = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))


def _handle(signum, frame) -> None:
    _received.append(signum)
    if len(_received) == 1:
        _raise(signum)


def _raise(signum: int) -> None:
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


@contextmanager
def honoured() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise once and are remembered.

    Signal handlers belong to the main thread: elsewhere the block changes nothing.
    The outermost block starts with a clean record.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth[0] == 0:
        _received.clear()
        _committed.clear()
    previous = {signum: signal.signal(signum, _handle) for signum in _HANDLED}
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check() -> None:
    """Raise again a signal received earlier whose exception a library swallowed."""
    if _received:
        _raise(_received[0])


def received() -> int | None:
    """The first signal received, if any."""
    return _received[0] if _received else None


def note_commit(path: Path) -> None:
    """Record an output put in place, so an interrupt's message can say it was written."""
    _committed.append(path)


def committed() -> list[Path]:
    return list(_committed)
