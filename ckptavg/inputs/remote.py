"""URL specs -> checkpoints in object storage or behind HTTP, through fsspec.

`s3://`, `gs://`, `az://`, `https://` and every other protocol fsspec knows: a URL names an
object, a quoted glob pattern of them (expanded in natural order), or a folder read by the same
rules as a folder on disk (`folders.py`: the Hugging Face layout, runs of `checkpoint-N`
folders), over the storage's listing. fsspec and the storage's library are imported only when a
URL is given; a missing one is one line saying what to install. Credentials come from each
library's usual places, or `storage_options`, and are never shown.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import InputError
from ..formats.remote_files import RemoteObject, storage_message, tried
from .folders import GLOB_CHARS, HUB_PREFIX, Listing, Source, checkpoints_in_folder, natural_key

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_CREDENTIALS = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")
# Which extra of ckptavg brings each protocol's library.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "adl": "azure"}
NO_LISTING = ("http", "https")  # an HTTP server lists nothing: one object per URL
# Waits for a server that stopped answering, unless `storage_options` set their own: seconds to
# connect and between bytes of an answer. S3: botocore's tries of each request; s3fs's own retry
# loops, nested (they multiplied botocore's tries 25-fold), are left to botocore and to the range
# reads' tries (`remote_files.REQUEST_TRIES`).
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 20
S3_RETRIES = {"max_attempts": 3, "mode": "standard"}


def is_url(spec: str) -> bool:
    """Whether a spec is a URL read through fsspec (not `hf://`, which `hub.py` resolves)."""
    return bool(_URL.match(spec)) and not spec.startswith(HUB_PREFIX)


def shown(url: str) -> str:
    """The URL as messages and the plan show it: without a user name or password in it."""
    return _CREDENTIALS.sub(r"\1", url)


def filesystem(url: str, storage_options: dict | None) -> tuple[Any, str]:
    """The fsspec file system of a URL and the path there.

    Raises:
        InputError: the protocol is unknown, or its library is not installed (saying which extra).
    """
    protocol = _URL.match(url).group(1).lower()
    storage_options = storage_options or {}
    try:
        import fsspec.core

        options = _with_timeouts(protocol, storage_options)
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        extra = _EXTRAS.get(protocol)
        install = f"pip install 'ckptavg[{extra}]'" if extra else f"install it ({e})"
        raise InputError(
            f"{shown(url)}: reading {protocol}:// URLs needs its fsspec library: {install}"
        ) from e
    except ValueError as e:
        raise InputError(f"{shown(url)}: {protocol}:// is not a protocol fsspec knows ({e})") from e
    except TypeError as e:
        raise InputError(f"{shown(url)}: `storage_options` not accepted by its file system ({e})") from e
    if protocol in ("s3", "s3a") and "retries" not in _options_of(storage_options, "config_kwargs"):
        fs.retries = 1  # s3fs's loops: one try each
    return fs, path


def _options_of(options: dict, key: str) -> dict:
    value = options.get(key)
    return value if isinstance(value, dict) else {}


def _with_timeouts(protocol: str, options: dict) -> dict:
    """`options` with bounded waits for a server that stopped answering, where the libraries' own
    would wait half an hour (S3: 15 s a try, 125 tries of a range) or 5 minutes a request (HTTP,
    aiohttp), and what the user set kept. HTTP's `client_kwargs.timeout` may be a dict of
    `aiohttp.ClientTimeout`'s fields (JSON cannot spell the object)."""
    if protocol in ("s3", "s3a"):
        config = {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT}
        config["retries"] = dict(S3_RETRIES)
        return {**options, "config_kwargs": {**config, **_options_of(options, "config_kwargs")}}
    if protocol in NO_LISTING:
        import aiohttp

        client = _options_of(options, "client_kwargs")
        timeout = client.get("timeout", {"sock_connect": CONNECT_TIMEOUT, "sock_read": READ_TIMEOUT})
        if isinstance(timeout, dict):
            timeout = aiohttp.ClientTimeout(**{"total": None, **timeout})
        return {**options, "client_kwargs": {**client, "timeout": timeout}}
    return options


def remote_sources(spec: str, storage_options: dict | None, weights_name: str | None) -> list[Source]:
    """The checkpoints a URL names: an object, the matches of a glob in natural order, or a folder's.

    Raises:
        InputError: nothing there, a pattern matching nothing, a folder holding no checkpoint, or
            the storage refusing (permission, no such bucket), one line each.
    """
    fs, path = filesystem(spec, storage_options)
    label = shown(spec)
    protocol = _URL.match(spec).group(1).lower()
    try:
        if protocol in NO_LISTING:
            matches = [path]
        elif GLOB_CHARS.search(path):
            matches = sorted(fs.glob(path.rstrip("/")), key=natural_key)
            if not matches:
                raise InputError(f"{label}: the pattern matches no object or folder")
        else:
            matches = [path.rstrip("/")]
        sources = []
        for match in matches:
            url = label if match == path else shown(fs.unstrip_protocol(match))
            if protocol not in NO_LISTING and fs.isdir(match):
                found = checkpoints_in_folder("", _listing(fs, match), url, weights_name)
                sources += [_source(fs, f"{match}/{rel}" if rel else match, url, rel) for rel in found]
            else:
                tried(
                    lambda m=match: fs.info(m), url
                )  # no such object, permission: said now, before any read
                sources.append(_source(fs, match, url, ""))
        return sources
    except InputError:
        raise
    except Exception as e:
        raise InputError(storage_message(label, e)) from e


def _source(fs, path: str, url: str, relative: str) -> Source:
    url = f"{url.rstrip('/')}/{relative}" if relative else url
    return Source(None, url, url, remote=RemoteObject(fs, path, url))


def _listing(fs, root: str) -> Listing:
    def listing(folder: str) -> tuple[list[str], list[str]]:
        where = f"{root}/{folder}" if folder else root
        entries = fs.ls(where, detail=True)
        names = [(entry["name"].rstrip("/").rsplit("/", 1)[-1], entry.get("type")) for entry in entries]
        return [n for n, kind in names if kind != "directory"], [
            n for n, kind in names if kind == "directory"
        ]

    return listing
