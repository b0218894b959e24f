"""Byte sizes as people write them: `5GB`, `500MB`, `2GiB`."""

from __future__ import annotations

import re

from .errors import CkptavgError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(size: int | str) -> int:
    """`"5GB"` -> 5_000_000_000 (decimal units as the Hub uses them; `GiB` for binary)."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise CkptavgError(f"cannot read size {size!r}; write it like 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise CkptavgError(f"size must be positive, got {size!r}")
    return value


def format_bytes(count: int) -> str:
    """Decimal units, as disks and the Hub count them: `1.2 GB`."""
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            break
    return f"{value:.1f} {unit}"
