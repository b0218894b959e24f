"""The CRC-32 of bytes written in pieces: each piece's CRC-32 computed as it streams, joined after.

`zlib.crc32` continues a CRC-32 only over bytes that follow in order; `combine` joins the CRC-32s
of two consecutive pieces from their values and the second's length, as zlib's `crc32_combine`
does (by applying the CRC's shift register to the first CRC-32 as if that many zero bytes followed).
"""

from __future__ import annotations

from collections.abc import Iterable

_POLYNOMIAL = 0xEDB88320  # CRC-32 (zip, zlib), reflected


def _times(matrix: list[int], vector: int) -> int:
    """A 32x32 matrix over GF(2) (one column per bit) times a 32-bit vector."""
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, column) for column in matrix]


def combine(first: int, second: int, second_length: int) -> int:
    """The CRC-32 of A + B, from A's CRC-32, B's CRC-32 and B's length in bytes."""
    if second_length <= 0:
        return first
    if not first:  # the zero bytes leave a zero register as it is (A empty, or its CRC-32 zero)
        return second
    odd = [_POLYNOMIAL] + [1 << n for n in range(31)]  # the register shifted by one zero bit
    even = _square(odd)  # two zero bits
    odd = _square(even)  # four
    while True:  # apply len(B) zero bytes, one bit of the length at a time
        even = _square(odd)
        if second_length & 1:
            first = _times(even, first)
        second_length >>= 1
        if not second_length:
            break
        odd = _square(even)
        if second_length & 1:
            first = _times(odd, first)
        second_length >>= 1
        if not second_length:
            break
    return first ^ second


def joined(pieces: Iterable[tuple[int, int]]) -> int:
    """The CRC-32 of consecutive pieces given as (CRC-32, length), in order."""
    total = 0
    for crc, length in pieces:
        total = combine(total, crc, length)
    return total
