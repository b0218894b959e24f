"""DCP's extension transforms (`FileSystemWriter(_extensions=[ZStandard()])`): chunks stored encoded.

The metadata names each chunk's transforms by descriptor (`stream.zstd/1`); the names are data,
looked up in `KNOWN` (nothing of the checkpoint chooses code to run), and any other is refused by
name. A chunk is decoded whole into an anonymous map no larger than its tensor's bytes and
`SLACK` (the few records of its `torch.save` archive), so a damaged or crafted stream cannot
decode into more.
"""

from __future__ import annotations

import mmap

from ..errors import InputError

ZSTD = "stream.zstd"
KNOWN = (ZSTD,)  # DCP's own ZStandard, the one transform DCP ships
SLACK = 64 * 2**10  # an archive's records besides the tensor's bytes (pickle, directory): under 2 KB


def check(descriptors: tuple[str, ...], where: str) -> None:
    """Refuse transforms ckptavg does not decode: unknown names, other versions, chains.

    Raises:
        InputError: naming the descriptor.
    """
    if len(descriptors) != 1:
        raise InputError(
            f"{where}: is stored through {len(descriptors)} DCP extension transforms "
            f"({', '.join(descriptors)}); ckptavg decodes one ({ZSTD}); save it with one, or none"
        )
    name, _, version = descriptors[0].partition("/")
    if name not in KNOWN:
        raise InputError(
            f"{where}: is stored through the DCP extension transform '{descriptors[0]}', which ckptavg "
            f"does not decode (it decodes {', '.join(KNOWN)}); save it without it"
        )
    if version.partition(".")[0] != "1":
        raise InputError(
            f"{where}: is stored through '{descriptors[0]}', a version of {name} ckptavg does not decode (1)"
        )


def decode(encoded, limit: int, where: str) -> tuple[mmap.mmap, int]:
    """A chunk's bytes decoded (zstd, one frame) into an anonymous map: the map and how much it holds.

    Raises:
        InputError: zstandard is not installed, the stream is damaged, or it decodes to more than
            `limit` bytes.
    """
    try:
        import zstandard
    except ImportError:
        raise InputError(
            f"{where}: is stored compressed by DCP's ZStandard extension; install zstandard to read it "
            "(pip install zstandard)"
        ) from None
    out = mmap.mmap(-1, max(limit, 1))
    view = memoryview(out)
    filled = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(encoded, read_across_frames=False)
        while filled < limit:
            count = reader.readinto(view[filled:limit])
            if not count:
                break
            filled += count
        more = filled == limit and reader.readinto(bytearray(1))
    except zstandard.ZstdError as e:
        raise InputError(
            f"{where}: cannot be decoded ({e}); the file is damaged, or was saved in DCP's safetensors "
            "serialization with extensions, which DCP's own load cannot read either"
        ) from None
    finally:
        view.release()
    if more:
        raise InputError(
            f"{where}: decodes to more than the {limit} bytes its tensor's archive takes; the file is damaged"
        )
    return out, filled
