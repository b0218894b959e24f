"""Tensor dtypes by their safetensors names ("F32", "BF16", ...).

The plan and the writer work with these names and byte sizes only, so planning
(and `--dry-run`) never needs torch; `torch_dtype` maps a name when data moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from math import prod

# safetensors dtype name -> (bytes per element, is floating point)
_DTYPES: dict[str, tuple[int, bool]] = {
    "F64": (8, True),
    "F32": (4, True),
    "F16": (2, True),
    "BF16": (2, True),
    "F8_E4M3": (1, True),
    "F8_E5M2": (1, True),
    "I64": (8, False),
    "U64": (8, False),
    "I32": (4, False),
    "U32": (4, False),
    "I16": (2, False),
    "U16": (2, False),
    "I8": (1, False),
    "U8": (1, False),
    "BOOL": (1, False),
}

# The order of safetensors' own Dtype enum: `save_file` writes higher ranks first
# (then by name), which also puts larger elements first and keeps every tensor aligned.
_LAYOUT_RANK = {
    name: rank
    for rank, name in enumerate(
        (
            "BOOL",
            "U8",
            "I8",
            "F8_E5M2",
            "F8_E4M3",
            "I16",
            "U16",
            "F16",
            "BF16",
            "I32",
            "U32",
            "F32",
            "F64",
            "I64",
            "U64",
        )
    )
}

# Names users type for --dtype / --accum-dtype -> safetensors names.
USER_DTYPE_NAMES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
}


# The largest byte count a 64-bit signed size (torch's, the safetensors offsets') can hold.
MAX_BYTES = 2**63 - 1


def addressable(dtype: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of `shape` could exist at all, zero dimensions counted as one.

    An empty tensor stores nothing whatever its other dimensions, but torch still
    computes strides from them and safetensors overflows on some orders: a shape
    such as [0, 2**62] is damage, never a real tensor, and must not reach an output.
    """
    extent = itemsize(dtype)
    for dim in shape:
        extent *= max(dim, 1)
    return all(dim >= 0 for dim in shape) and extent <= MAX_BYTES


def user_name(dtype: str) -> str:
    """The name a user types for a dtype (`float32`), or its safetensors name where there is none."""
    return next((user for user, name in USER_DTYPE_NAMES.items() if name == dtype), dtype)


def is_known(dtype: str) -> bool:
    return dtype in _DTYPES


def itemsize(dtype: str) -> int:
    return _DTYPES[dtype][0]


def layout_rank(dtype: str) -> int:
    return _LAYOUT_RANK[dtype]


def is_floating(dtype: str) -> bool:
    return _DTYPES[dtype][1]


@cache
def _torch_dtypes() -> dict:
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64,
        "U64": torch.uint64,
        "I32": torch.int32,
        "U32": torch.uint32,
        "I16": torch.int16,
        "U16": torch.uint16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


def torch_dtype(dtype: str):
    """The torch dtype for a safetensors dtype name (imports torch)."""
    return _torch_dtypes()[dtype]


def safetensors_name(dtype) -> str:
    """The safetensors name of a torch dtype, e.g. torch.bfloat16 -> "BF16"."""
    for name, candidate in _torch_dtypes().items():
        if candidate == dtype:
            return name
    raise KeyError(f"dtype {dtype} has no safetensors name")


@dataclass(frozen=True)
class TensorInfo:
    """What is known of a stored tensor before its data is read."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def is_floating(self) -> bool:
        return is_floating(self.dtype)
