"""How LoRA adapters are averaged: `LoraOptions` (the `--lora`, `--rank` and `--base` flags)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionsError
from ..options import option

LORA_MODES = ("concat", "svd", "merge")


@dataclass(frozen=True)
class LoraOptions:
    """What the average of LoRA adapters is written as.

    `concat` (exact): one adapter of rank Σ rᵢ whose update is Σ wᵢ·ΔWᵢ. `svd`: that update
    truncated to `rank`. `merge`: that update added to the weights of `base`, a full model.
    """

    lora: str = option(
        "concat",
        group="LoRA adapters",
        choices=LORA_MODES,
        show_default=True,
        help="How adapters are averaged: concat (exact, an adapter of rank r1+...+rN), svd (the exact "
        "average truncated to --rank), merge (the exact average merged into --base: a full model).",
    )
    rank: int | None = option(
        None, group="LoRA adapters", metavar="R", minimum=1, help="--lora svd: the output's rank."
    )
    base: str | None = option(
        None,
        group="LoRA adapters",
        metavar="CHECKPOINT",
        help="--lora merge: the base model the adapters were trained on (a file, folder or hf:// path).",
    )

    def __post_init__(self):
        if self.lora not in LORA_MODES:
            raise OptionsError(f"`lora` must be one of {', '.join(LORA_MODES)}, got {self.lora}")
        if self.lora == "svd" and self.rank is None:
            raise OptionsError("`lora=svd` needs the output's rank: give `rank`, e.g. `rank=16`")
        if self.lora != "svd" and self.rank is not None:
            raise OptionsError("`rank` applies to `lora=svd`")
        if self.lora == "merge" and self.base is None:
            raise OptionsError("`lora=merge` needs the base model: give `base=PATH`")
        if self.lora != "merge" and self.base is not None:
            raise OptionsError("`base` applies to `lora=merge`")
        if self.rank is not None and self.rank < 1:
            raise OptionsError(f"`rank` must be at least 1, got {self.rank}")

    @property
    def given(self) -> bool:
        """Whether anything but the default was asked for."""
        return self != LoraOptions()
