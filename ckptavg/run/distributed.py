"""The process group of a run launched by torchrun, or inside a script's own group: who is who,
each step's outcome agreed by every rank, and a failing rank's word passed on while others work.

Ranks coordinate only through torch.distributed. Each step ends with a collective
(`together`, `check`) that carries every rank's outcome, so a failure on one rank
is raised on every rank, at the same step. A rank that fails mid-run also posts its
error in the group's store (`post`), which the others look at twice a second
while they sum (`tick`): they stop within a second and meet at that step's
collective. A rank that dies without a word closes its connections (the others'
collective fails at once) or, with its node lost, answers no more: every
collective waits at most `CKPTAVG_DIST_TIMEOUT` seconds.

Nothing here imports torch.distributed unless the process is part of a group.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import TypeVar

from ..errors import CkptavgError, NonFiniteError, OptionsError, RankError

TIMEOUT_VARIABLE = "CKPTAVG_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds a collective waits for the slowest rank
_TICK_SECONDS = 0.5

T = TypeVar("T")
_current: list[Group] = []


class Stopped(CkptavgError):
    """This rank stopped because another one failed (its error is the one reported)."""


def launched() -> bool:
    """Whether this process is one of several: torchrun's environment, or a group already set up."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return True
    except ValueError:
        pass
    dist = sys.modules.get("torch.distributed")
    return bool(dist and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def speaks() -> bool:
    """Whether this process prints: the only one, or rank 0 of a group."""
    if _current:
        return _current[0].rank == 0
    return os.environ.get("RANK", "0") in ("", "0") or not launched()


# How long a silent rank waits before it exits on an error every rank meets (a usage error, an
# input no rank can read): torchrun stops the other ranks once one exits, and rank 0 must have
# printed the error by then.
SILENT_EXIT_DELAY_S = 3.0


def exit_silently(code: int) -> None:
    """Exit with `code`, after rank 0 has had the time to say why (see `SILENT_EXIT_DELAY_S`)."""
    time.sleep(SILENT_EXIT_DELAY_S)
    sys.exit(code)


def current() -> Group | None:
    """The group of the run under way, if it runs on several processes."""
    return _current[0] if _current else None


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise OptionsError(f"{TIMEOUT_VARIABLE}={value}: give a number of seconds above 0")
    return seconds


class Group:
    """This rank's view of the group: its rank, every rank's host, the collectives and the store."""

    def __init__(self, dist, group, store, rank: int, hosts: list[str], local_rank: int, timeout: float):
        self._dist = dist
        self._group = group
        self._store = store
        self.rank = rank
        self.world = len(hosts)
        self.hosts = hosts
        self.local_rank = local_rank
        self.timeout = timeout
        self._step = 0
        self._last_tick = time.monotonic()
        self._unreported = 0

    def who(self, rank: int) -> str:
        return f"rank {rank} ({self.hosts[rank]})"

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order (a collective)."""
        found = [None] * self.world
        try:
            self._dist.all_gather_object(found, value, group=self._group)
        except (RuntimeError, ValueError) as e:  # a rank died, its node is lost, or it timed out
            raise self._lost() from e
        return found

    def together(self, work: Callable[[], T]) -> T:
        """Run `work` here, then raise its first failure on every rank (a collective)."""
        try:
            result = work()
        except Exception as e:
            self.check(e)
            raise
        self.check(None)
        return result

    def check(self, error: BaseException | None, value=None) -> list:
        """Every rank's outcome of the step just done, and its `value`; the first failure is raised on
        every rank (the failing rank's own exception there). A collective."""
        self._step += 1
        with suppress(Exception):
            self._store.set(f"step/{self.rank}", str(self._step))
        if error is not None and not isinstance(error, Stopped):
            self.post(error)
        outcomes = self.gather((_describe(error), value))
        failed = [(rank, found) for rank, (found, _) in enumerate(outcomes) if found is not None]
        real = [(rank, found) for rank, found in failed if found["kind"] != "stopped"]
        if real or failed:
            rank, found = (real or failed)[0]
            if rank == self.rank and error is not None:
                raise error
            raise self._error_of(rank, found)
        return [found for _, found in outcomes]

    def post(self, error: BaseException) -> None:
        """Tell the others this rank failed (only the first rank's word is kept)."""
        with suppress(Exception):
            if self._store.add("errors", 1) == 1:
                self._store.set("error", json.dumps({"rank": self.rank, **_describe(error)}))

    def posted(self) -> RankError | None:
        """The error another rank posted, if any."""
        with suppress(Exception):
            if self._store.check(["error"]):
                found = json.loads(self._store.get("error"))
                if found["rank"] != self.rank:
                    return self._error_of(found["rank"], found)
        return None

    def tick(self, nbytes: int) -> int | None:
        """Count bytes read here; twice a second, add them to the group's count (returned) and stop
        (`Stopped`) if another rank failed."""
        self._unreported += nbytes
        now = time.monotonic()
        if now - self._last_tick < _TICK_SECONDS:
            return None
        self._last_tick = now
        done, self._unreported = self._unreported, 0
        if self._store.check(["error"]):
            raise Stopped("stopped: another rank failed")
        return self._store.add("read", done)

    def _step_of(self, rank: int) -> int:
        """The last step `rank` reached, as it told the store (0 if unknown)."""
        key = f"step/{rank}"
        with suppress(Exception):
            return int(self._store.get(key)) if self._store.check([key]) else 0
        return 0

    def _error_of(self, rank: int, found: dict) -> CkptavgError:
        message = found["message"]
        if found["kind"] == "NonFiniteError":
            return NonFiniteError(message, found["index"], found["reason"])
        if found["kind"] == "OptionsError":
            return OptionsError(message)
        return RankError(f"{self.who(rank)}: {message}", rank)

    def _lost(self) -> CkptavgError:
        """Why a collective failed: another rank's posted error, or the ranks that never reached it."""
        posted = self.posted()
        if posted is not None:
            return posted
        behind = [rank for rank in range(self.world) if self._step_of(rank) < self._step]
        who = ", ".join(self.who(rank) for rank in behind) if behind else "another rank"
        return RankError(
            f"{who} stopped without a word (killed, or its node lost), or did not answer within "
            f"{self.timeout:g} s ({TIMEOUT_VARIABLE}); nothing was written",
            behind[0] if behind else -1,
        )


def _describe(error: BaseException | None) -> dict | None:
    if error is None:
        return None
    if isinstance(error, Stopped):
        return {"kind": "stopped", "message": str(error)}
    if isinstance(error, NonFiniteError):
        return {"kind": "NonFiniteError", "message": str(error), "index": error.index, "reason": error.reason}
    if isinstance(error, OptionsError):
        return {"kind": "OptionsError", "message": str(error)}
    if isinstance(error, CkptavgError):
        return {"kind": "error", "message": str(error)}
    return {"kind": "unexpected", "message": f"unexpected {type(error).__name__}: {error}"}


@contextmanager
def joined() -> Iterator[Group | None]:
    """The group for a run: None for a single process; else torchrun's (created here, gloo on the
    CPU, NCCL beside it where there is a GPU, and closed at the end) or the one already set up."""
    if not launched():
        yield None
        return
    if _current:  # a run inside a run (the library called again): the same group
        yield _current[0]
        return
    import torch
    import torch.distributed as dist

    timeout = timeout_seconds()
    created = not dist.is_initialized()
    try:
        if created:
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        # all coordination goes through gloo: small objects on the CPU, whatever the default backend
        group = None if created else dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError) as e:
        raise RankError(f"cannot join torchrun's process group: {str(e).splitlines()[0]}", -1) from e
    try:
        rank = dist.get_rank()
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, (socket.gethostname(), uuid.uuid4().hex), group=group)
        run_store = dist.PrefixStore(f"ckptavg/{found[0][1]}/", store)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        this = Group(dist, group, run_store, rank, [host for host, _ in found], local_rank, timeout)
    except (RuntimeError, ValueError) as e:
        if created:
            dist.destroy_process_group()
        raise RankError(f"cannot reach the other ranks: {str(e).splitlines()[0]}", -1) from e
    _current.append(this)
    try:
        yield this
    except Exception as e:
        this.post(e)
        raise
    except KeyboardInterrupt:  # torchrun stops every rank when one ends: say why, if it said
        posted = this.posted()
        if posted is None:
            raise
        raise posted from None
    finally:
        _current.clear()
        if created:
            with suppress(Exception):
                dist.destroy_process_group()
