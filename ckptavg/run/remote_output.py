"""The commit of an output to a URL: each file a multipart upload that completes only at the commit.

`RemoteOutput` has `OutputTransaction`'s interface for the safetensors layouts. Each file is
streamed through its fsspec file, opened without autocommit: its parts are uploaded as the bytes
come (nothing lands on local disk), and the object appears only when `commit` completes the upload;
a folder's shards first, then its side files and index, then the objects of a replaced output
that the new one lacks are removed. Leaving the `with` block without `commit` aborts the
unfinished uploads and deletes the objects this commit had completed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import OutputError
from ..formats.safetensors_header import Entry, data_starts, encode_header
from ..inputs.remote import filesystem
from ..inputs.side_files import read_side_file
from ..memory import upload_part_bytes
from ..plan.remote_layout import RemoteTarget, output_message
from . import interrupts


class RemoteOutput:
    """Makes an output file or folder at a URL appear whole, or not at all."""

    def __init__(self, target: RemoteTarget, *, folder: bool, force: bool = False, stale: Sequence[str] = ()):
        self.target = Path(target.url)  # as the plan names it
        self.folder = folder
        self.force = force
        self._stale = stale  # objects of the replaced output the new one lacks: removed once it is in place
        self._remote = target
        self._fs, self._path = filesystem(target.url, target.storage_options)
        self._writers: list[RemoteSafetensorsWriter] = []
        self._documents: list[tuple[str, bytes]] = []
        self._completed: list[str] = []
        self._committed = False

    def __enter__(self) -> RemoteOutput:
        return self

    def key_of(self, name: str) -> str:
        """The path of file `name` of the output in its file system."""
        return f"{self._path.rstrip('/')}/{name}" if self.folder else self._path

    def safetensors(
        self, name: str, entries: Sequence[Entry], metadata: dict[str, str], path: Path | None = None
    ) -> RemoteSafetensorsWriter:
        """A writer streaming file `name` of the output as a multipart upload."""
        if path is not None:
            raise OutputError(
                f"{self._remote.shown}: no scratch files for an output to a URL (internal error)"
            )
        label = f"{self._remote.shown.rstrip('/')}/{name}" if self.folder else self._remote.shown
        writer = RemoteSafetensorsWriter(self._fs, self.key_of(name), entries, metadata, label)
        self._writers.append(writer)
        return writer

    def add_side_file(self, source: Path, root: Path) -> None:
        """Put a config or tokenizer file (`inputs.side_files`) after the weights, at the commit."""
        self._documents.insert(0, (source.name, read_side_file(source, root)))

    def write_json(self, name: str, content: dict) -> None:
        """Put `name` (the index) after the weights and side files, at the commit."""
        self._documents.append((name, (json.dumps(content, indent=2) + "\n").encode()))

    def commit(self) -> None:
        """Complete each file's upload, then put the documents (the index) last."""
        interrupts.check()  # never put an output in place after Ctrl-C, even a swallowed one
        try:
            if not self.force and not self.folder and self._fs.exists(self._path):
                raise OutputError(
                    f"{self._remote.shown}: appeared during the run; pass `force` to replace it"
                )
            for writer in self._writers:
                writer.complete()
                self._completed.append(writer.key)
            for name, data in self._documents:
                self._fs.pipe_file(self.key_of(name), data)
                self._completed.append(self.key_of(name))
        except OutputError:
            raise
        except Exception as e:  # the storage library's own errors too
            raise OutputError(output_message(self._remote.shown, e, "cannot complete the upload")) from e
        self._committed = True
        interrupts.note_commit(self.target)
        if not self._stale:
            return
        try:
            self._fs.rm([self.key_of(name) for name in self._stale])
        except Exception as e:  # the new output is in place: say what is left of the old one
            names = ", ".join(self._stale)
            raise OutputError(
                output_message(
                    self._remote.shown, e, f"written, but the old output's {names} could not be removed"
                )
            ) from e

    def __exit__(self, *exc) -> None:
        if self._committed:
            return
        # A failed clean-up must not hide why the run failed.
        for writer in self._writers:
            with contextlib.suppress(Exception):
                writer.abort()
        for key in self._completed:
            with contextlib.suppress(Exception):
                self._fs.rm_file(key)


class RemoteSafetensorsWriter:
    """Streams one safetensors file: the header, then each tensor's bytes in file order.

    An upload is written front to back, so each write must start where the last ended (the
    engine hands out bytes in file order; tied copies are refused for URLs by the layout).
    `finish` uploads the last part; `complete` makes the object appear; `abort` discards it.
    """

    direct = False  # the writer thread runs beside the sums

    def __init__(self, fs, key: str, entries: Sequence[Entry], metadata: dict[str, str], label: str):
        self.key = key
        self.label = label
        header = encode_header(entries, metadata)
        self._offsets = data_starts(entries, len(header))
        self._size = len(header) + sum(entry.nbytes for entry in entries)
        self._part = upload_part_bytes(self._size)
        try:
            self._file = fs.open(key, "wb", block_size=self._part, autocommit=False)
            self._put(memoryview(header))
        except Exception as e:
            raise OutputError(output_message(label, e, "cannot start the upload")) from e
        self._position = len(header)

    def write(self, name: str, start: int, tensor) -> None:
        """Write a contiguous CPU tensor's bytes into tensor `name`, `start` bytes into its data."""
        if tensor.numel() == 0:
            return
        import torch

        raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        if self._offsets[name] + start != self._position or self._position + len(raw) > self._size:
            raise OutputError(f"{self.label}: bytes out of file order (internal error)")
        self._put(raw)
        self._position += len(raw)

    def finish(self) -> None:
        """Check every declared byte was written, then upload the last part (the object is not there yet)."""
        if self._position != self._size:
            raise OutputError(f"{self.label}: wrote {self._position} of {self._size} bytes (internal error)")
        try:
            self._file.close()
        except Exception as e:
            raise OutputError(output_message(self.label, e, "cannot upload the last part")) from e

    def complete(self) -> None:
        self._file.commit()

    def abort(self) -> None:
        self._file.discard()
        self._file.closed = True  # nothing more is uploaded, even when collected

    def _put(self, data: memoryview) -> None:
        """Write in pieces of at most a part, so the file's buffer stays within two parts."""
        try:
            for begin in range(0, len(data), self._part):
                self._file.write(data[begin : begin + self._part])
        except Exception as e:
            raise OutputError(output_message(self.label, e, "cannot upload a part")) from e
