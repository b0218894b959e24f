"""Free space on the file system a path is (or will be) on: checked before downloading or writing."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import OutputError
from .units import format_bytes


def free_space(path: Path) -> int:
    """Bytes free on the file system that holds `path` (or would hold it, once its folders exist)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def ensure_free_space(target: Path, nbytes: int) -> None:
    """Fail before writing when the output cannot fit on its file system."""
    free = free_space(target.parent)
    if nbytes > free:
        raise OutputError(
            f"{target}: needs {format_bytes(nbytes)} but only {format_bytes(free)} is free there; "
            "free some space or write elsewhere"
        )
