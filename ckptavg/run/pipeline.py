"""Overlap writing with computing: a writer thread fed through a queue.

Torch arithmetic and file writes both release the GIL, so while the engine sums
the next chunk, a second thread writes (and periodically flushes) the previous
one. Memory stays bounded by the engine's buffer pools: a buffer handed to the
writer comes back through its `release` callback once written, and the engine
waits for one before computing more.

Ctrl-C and SIGTERM raise in the main thread between any two bytecodes. Raised
inside `queue.Queue` or `threading.Event`, whose locks are Python code, such
an exception can leave a lock held and both threads waiting forever. So the
thread is started with `_thread` (not `threading.Thread`, whose start and join
use such locks) and shares only `queue.SimpleQueue`s with the main thread:
they are implemented in C and safe to interrupt.
"""

from __future__ import annotations

import _thread
import queue
from collections.abc import Callable
from typing import Generic, TypeVar

Buffer = TypeVar("Buffer")

_STOP = object()
_DRAIN = object()
# Waits are timed and re-tried: a wake-up lost to a signal landing at the same moment as the
# item it waits for then costs this long, not the run.
_WAIT_SECONDS = 0.1


def _next(items: queue.SimpleQueue):
    """The next item of `items`, however long it takes to come."""
    while True:
        try:
            return items.get(timeout=_WAIT_SECONDS)
        except queue.Empty:
            continue


class BufferPool(Generic[Buffer]):
    """Up to `limit` buffers from `make`, made on first need; `acquire` waits for one to be released.

    Whoever hands a buffer to the writer thread passes `release` along, so the
    producer blocks here, not in memory growth, when writing falls behind.
    """

    def __init__(self, make: Callable[[], Buffer], limit: int):
        self._make = make
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._made = 0
        self._limit = limit

    def acquire(self) -> Buffer:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._made < self._limit:
                self._made += 1
                return self._make()
            return _next(self._free)

    def release(self, buffer: Buffer) -> None:
        self._free.put(buffer)


class WriteQueue:
    """Runs submitted write calls in order on one background thread.

    An error in the thread is re-raised in the caller at the next `submit` or
    `drain`; leaving the `with` block waits for the thread, so no write is
    still running when the caller closes its files.
    """

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._drained: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._cancelled = False

    def __enter__(self) -> WriteQueue:
        _thread.start_new_thread(self._run, ())
        return self

    def submit(self, call: Callable, *args, release: Callable[[], None] | None = None) -> None:
        """Queue `call(*args)`; `release()` runs after it, even if it failed."""
        self._raise_error()
        self._tasks.put((call, args, release))

    def drain(self) -> None:
        """Wait until everything submitted is done; raise the first error."""
        self._tasks.put(_DRAIN)
        _next(self._drained)
        self._raise_error()

    def __exit__(self, exc_type, *exc) -> None:
        self._cancelled = exc_type is not None  # the caller failed: skip what is still queued
        self._tasks.put(_STOP)
        interrupted = None
        while True:
            try:
                _next(self._stopped)
                break
            except KeyboardInterrupt as e:  # a second Ctrl-C: wait still, files must not close mid-write
                self._cancelled = True
                interrupted = e
        if interrupted is not None:
            raise interrupted

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            task = _next(self._tasks)
            if task is _STOP:
                self._stopped.put(None)
                return
            if task is _DRAIN:
                self._drained.put(None)
                continue
            call, args, release = task
            try:
                if self._error is None and not self._cancelled:
                    call(*args)
            except BaseException as e:  # handed to the caller's thread
                self._error = e
            finally:
                if release is not None:
                    release()
