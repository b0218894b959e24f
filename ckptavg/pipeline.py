"""Overlap writing with computing: a writer thread fed through a bounded queue.

Torch arithmetic and file writes both release the GIL, so while the engine sums
the next chunk, a second thread writes (and periodically flushes) the previous
one. The queue is bounded by the engine's buffer pool: a buffer handed to the
writer comes back through its `release` callback once written.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

_STOP = object()


class WriteQueue:
    """Runs submitted write calls in order on one background thread.

    An error in the thread is re-raised in the caller at the next `submit` or
    `drain`; leaving the `with` block waits for the thread, so no write is
    still running when the caller cleans up its files.
    """

    def __init__(self, depth: int = 4):
        self._tasks: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="ckptavg-writer", daemon=True)

    def __enter__(self) -> WriteQueue:
        self._thread.start()
        return self

    def submit(self, call: Callable, *args, release: Callable[[], None] | None = None) -> None:
        """Queue `call(*args)`; `release()` runs after it, even if it failed."""
        self._raise_error()
        self._tasks.put((call, args, release))

    def drain(self) -> None:
        """Wait until everything submitted is done; raise the first error."""
        self._tasks.join()
        self._raise_error()

    def __exit__(self, exc_type, *exc) -> None:
        self._cancelled = exc_type is not None  # the caller failed: skip what is still queued
        self._tasks.put(_STOP)
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is _STOP:
                    return
                call, args, release = task
                try:
                    if self._error is None and not self._cancelled:
                        call(*args)
                except BaseException as e:  # handed to the caller's thread
                    self._error = e
                finally:
                    if release is not None:
                        release()
            finally:
                self._tasks.task_done()
