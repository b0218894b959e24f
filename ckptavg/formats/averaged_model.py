"""torch's `AveragedModel` wrapper: its bookkeeping is not a weight.

`torch.optim.swa_utils.AveragedModel` (and torchvision's `ExponentialMovingAverage`)
holds the averaged model as its submodule `module` and counts its updates in a
buffer `n_averaged`, an integer scalar registered beside it: its state dict is
`n_averaged` and `module.*`, or `P.n_averaged` and `P.module.*` where the wrapper
is an attribute `P` of a larger module. `n_averaged` is dropped, so that the
average loads into the plain model; a state that is the wrapper alone is read as
the model it wraps (`module.` stripped).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .dtypes import TensorInfo

COUNTER = "n_averaged"
WRAPPED = "module."


@dataclass(frozen=True)
class Wrapper:
    """What is read differently in a state holding `AveragedModel` wrappers."""

    dropped: tuple[str, ...]  # stored names of their `n_averaged` counters
    prefix: str | None  # `module.` when the state is one wrapper alone, else None

    @property
    def note(self) -> str:
        """How the plan says it."""
        counters = ", ".join(f"'{name}'" for name in self.dropped)
        stripped = f", stripped its '{self.prefix}'" if self.prefix else ""
        return f"AveragedModel state: dropped {counters}{stripped}"


def averaged_model_wrapper(tensors: Mapping[str, TensorInfo]) -> Wrapper | None:
    """The `AveragedModel` wrappers in a state (stored name -> `TensorInfo`), or None if it has none."""
    dropped = tuple(
        name
        for name, info in tensors.items()
        if _is_counter(name, info) and any(other.startswith(_owner(name) + WRAPPED) for other in tensors)
    )
    if not dropped:
        return None
    alone = dropped == (COUNTER,) and all(n.startswith(WRAPPED) for n in tensors if n != COUNTER)
    return Wrapper(dropped, WRAPPED if alone else None)


def _is_counter(name: str, info: TensorInfo) -> bool:
    """An integer scalar named `n_averaged`, as `AveragedModel` registers it."""
    named = name == COUNTER or name.endswith("." + COUNTER)
    return (
        named and not info.is_floating and info.dtype != "BOOL" and len(info.shape) <= 1 and info.numel == 1
    )


def _owner(counter: str) -> str:
    """`P.` for `P.n_averaged`, empty for `n_averaged`."""
    return counter[: -len(COUNTER)]
