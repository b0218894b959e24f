"""The same checkpoint given twice silently doubles its weight: found by path, or by content."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from ..formats.readers import Checkpoint

_SAMPLE = 64 * 1024  # bytes read at three places of each file to recognize copies


def duplicate_warnings(checkpoints: Sequence[Checkpoint]) -> list[str]:
    """The same checkpoint given twice silently doubles its weight: the same file (a Hub file
    under two revisions resolves to one cached blob), or files with the same content."""
    by_path: dict[Path, str] = {}
    by_content: dict[tuple, str] = {}
    warnings = []
    for ck in checkpoints:
        if ck.path is None:  # known by its headers alone: nothing here to compare
            continue
        real = ck.path.resolve()
        fingerprint = _fingerprint(ck)
        if real in by_path:
            warnings.append(f"{ck.label} is given twice (also as {by_path[real]}): it counts twice")
        elif fingerprint is not None and fingerprint in by_content:
            warnings.append(f"{ck.label} has the same content as {by_content[fingerprint]}: it counts twice")
        by_path.setdefault(real, ck.label)
        if fingerprint is not None:
            by_content.setdefault(fingerprint, ck.label)
    return warnings


def _fingerprint(checkpoint: Checkpoint) -> tuple | None:
    """Size, tensors and sampled bytes (start, middle, end) of each file: equal for copies, cheap to read."""
    parts = []
    for path in checkpoint.files:
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                samples = []
                for offset in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
                    f.seek(offset)
                    samples.append(f.read(_SAMPLE))
        except OSError:
            return None  # unreadable: no fingerprint
        parts.append((size, hashlib.sha256(b"".join(samples)).hexdigest()))
    return tuple(parts), tuple(sorted((n, i.dtype, i.shape) for n, i in checkpoint.tensors.items()))
