"""What ckptavg trusts of a Hub endpoint: nothing it says is used as a path unchecked, and every
request has a deadline.

Branch, tag and pull-request names, listed paths and the ETag and commit headers
of files must be relative names without `..`, backslashes or control
characters, and commit ids 40 lowercase hex digits, so a compromised server
cannot make huggingface_hub write outside the cache. A response that delivers
less than 1 kB in `CKPTAVG_HUB_TIMEOUT` seconds (default 60), or makes any wait
(connect, send, a read) longer than that, is abandoned. The deadlines are added
to huggingface_hub's own HTTP client only while ckptavg makes its calls; a
program's own client factory is used and put back afterwards.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, partial

from ..errors import InputError
from ..units import format_bytes

TIMEOUT_VARIABLE = "CKPTAVG_HUB_TIMEOUT"


_DEFAULT_TIMEOUT_S = 60.0


_MIN_BYTES_PER_WINDOW = 1000  # below this in one timeout window, an answer counts as stalled


COMMIT_ID = re.compile(r"[0-9a-f]{40}")


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


_TIMEOUT_KINDS = ("connect", "read", "write", "pool")


class HubMisbehaved(Exception):
    """The Hub answered in a way ckptavg refuses to act on; `_hub_errors` adds the spec to the message."""


def unsafe_reason(name) -> str | None:
    """Why a name cannot be joined to a cache folder without risk, or None if it can."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if _CONTROL_CHARS.search(name):
        return "it holds a control character"
    if "\\" in name:
        return "it holds a backslash"
    if name.startswith("/"):
        return "it is absolute"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "it has an empty, '.' or '..' part"
    return None


@contextmanager
def watched_hub_session() -> Iterator[None]:
    """huggingface_hub's shared HTTP client with ckptavg's deadlines and checks, for the calls made inside.

    The client still comes from the factory that was in place (a program's own, or huggingface_hub's
    default), and that factory is put back afterwards: a program that also uses huggingface_hub keeps
    its configuration, and only ckptavg's calls get the deadlines.
    """
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    window = _hub_timeout()
    previous = _http._GLOBAL_CLIENT_FACTORY  # huggingface_hub has no public getter for it
    set_client_factory(lambda: _watched_client(previous(), window))
    try:
        yield
    finally:
        set_client_factory(previous)


def _hub_timeout() -> float:
    """The deadline window in seconds, from CKPTAVG_HUB_TIMEOUT."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return _DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise InputError(
            f"{TIMEOUT_VARIABLE}={text!r} is not a number of seconds above 0; set it to e.g. "
            f"{_DEFAULT_TIMEOUT_S:g}, or unset it"
        )
    return seconds


def _watched_client(client, window: float):
    """The client, with every wait capped at the window and every answer checked and watched for progress."""
    hooks = client.event_hooks
    client.event_hooks = {
        "request": [*hooks["request"], partial(_cap_timeouts, window=window)],
        "response": [*hooks["response"], partial(_watch_answer, window=window)],
    }
    return client


def _cap_timeouts(request, *, window: float) -> None:
    """No connect, send, read or wait for a free connection longer than the window; shorter ones stay."""
    asked = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        kind: window if asked.get(kind) is None else min(asked[kind], window) for kind in _TIMEOUT_KINDS
    }


def _watch_answer(response, *, window: float) -> None:
    """Check the headers of the answer, then watch its body for progress."""
    url = str(response.request.url)
    _check_file_headers(response.headers, url)
    response.stream = _progress_watch()(response.stream, url, window)


def _check_file_headers(headers, url: str) -> None:
    """Refuse the ETags and commit id that huggingface_hub joins to cache paths without checking them."""
    for header in ("ETag", "X-Linked-Etag"):
        etag = headers.get(header)
        if etag is None:
            continue
        name = etag.removeprefix("W/").strip('"')
        reason = unsafe_reason(name) or ("it holds a slash" if "/" in name else None)
        if reason:
            raise HubMisbehaved(
                f"the Hub at {url} sent {header} {etag!r}, which is not a safe name ({reason}); refusing it"
            )
    commit = headers.get("X-Repo-Commit")
    if commit is not None and not COMMIT_ID.fullmatch(commit):
        raise HubMisbehaved(
            f"the Hub at {url} sent X-Repo-Commit {commit!r}, which is not a commit id "
            "(40 lowercase hex digits); refusing it"
        )


@cache
def _progress_watch():
    """A response body that must keep coming: under 1 kB in a window of the timeout abandons it.

    In the spirit of curl's --speed-limit/--speed-time: a server that trickles, or stops in the
    middle (a read that times out), fails the run in bounded time instead of holding it forever.
    It is not retried: huggingface_hub would retry a timeout several times over.
    """
    import httpx2

    class ProgressWatch(httpx2.SyncByteStream):
        def __init__(self, stream, url: str, window: float):
            self._stream, self._url, self._window = stream, url, window

        def __iter__(self):
            started, received = time.monotonic(), 0
            try:
                for chunk in self._stream:
                    received += len(chunk)
                    if time.monotonic() - started >= self._window:
                        if received < _MIN_BYTES_PER_WINDOW:
                            raise self._stalled()
                        started, received = time.monotonic(), 0
                    yield chunk
            except httpx2.TimeoutException as e:
                raise self._stalled() from e

        def close(self):
            self._stream.close()

        def _stalled(self) -> HubMisbehaved:
            least = format_bytes(_MIN_BYTES_PER_WINDOW)
            return HubMisbehaved(
                f"the Hub at {self._url} stopped sending data (less than {least} in {self._window:g} s); "
                f"try again later, or raise {TIMEOUT_VARIABLE} (seconds) on a slow connection"
            )

    return ProgressWatch
