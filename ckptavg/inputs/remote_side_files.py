"""The config and tokenizer files beside a remote checkpoint, fetched for a folder output.

A folder output gets the last input's side files (`side_files.py`), so that it loads as the
model it came from. For a checkpoint in object storage or streamed from the Hub they are
fetched only when an output asks for them, into a private temporary folder from which they are
copied as a local folder's are; it is removed when the checkpoint is closed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import InputError
from ..formats.remote_files import RemoteObject, listed_files, storage_message
from .folders import HF_CONFIG_NAME, is_model_side_file
from .remote import NO_LISTING
from .side_files import MAX_SIDE_FILE_BYTES


class RemoteSideFiles:
    """The side files of the folder holding `remote`, fetched on first use."""

    def __init__(self, remote: RemoteObject):
        self._remote = remote
        self._temporary: tempfile.TemporaryDirectory | None = None
        self._looked = False

    def folder(self) -> Path | None:
        """A local folder holding copies of them, or None when the folder is no model folder
        (no `config.json` beside the weights).

        Raises:
            InputError: the storage refused the listing or a file, naming it.
        """
        if not self._looked:
            self._looked = True
            self._fetch()
        return Path(self._temporary.name) if self._temporary is not None else None

    def remove(self) -> None:
        """Remove the fetched copies (the run is over)."""
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    def _fetch(self) -> None:
        fs, path = self._remote.fs, self._remote.path
        if "/" not in path.rstrip("/") or set(_protocols(fs)) & set(NO_LISTING):
            return
        folder = path.rstrip("/").rsplit("/", 1)[0]
        where = self._remote.url.rstrip("/").rsplit("/", 1)[0]
        try:
            sizes = listed_files(fs, folder)
        except Exception as e:
            raise InputError(storage_message(where, e)) from e
        if HF_CONFIG_NAME not in sizes:
            return
        self._temporary = tempfile.TemporaryDirectory(prefix="ckptavg-side-files-")
        for name, size in sizes.items():
            if is_model_side_file(name) and size <= MAX_SIDE_FILE_BYTES:
                try:
                    fs.get_file(f"{folder}/{name}", str(Path(self._temporary.name) / name))
                except Exception as e:
                    raise InputError(storage_message(f"{where}/{name}", e)) from e


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
