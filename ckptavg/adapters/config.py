"""A LoRA adapter's `adapter_config.json`: what ckptavg can average exactly, each layer's scaling,
and the config of the averaged adapter.

peft scales a layer's update `B·A` by `lora_alpha / r` (by `lora_alpha / √r` with `use_rslora`),
where `rank_pattern` and `alpha_pattern` set `r` and `lora_alpha` per module: the first pattern
that matches the end of a module's name at a dot wins, as in peft. The averaged adapter has every
scaling folded into its factors, so its config gives each layer a scale of 1 (`lora_alpha = r`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..inputs.folders import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHT_NAMES

ADAPTER_WEIGHTS = ADAPTER_WEIGHT_NAMES[0]  # what an averaged adapter's weights are called

# Initializations that change the base model's weights: such an adapter's update is not B·A alone.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "mica")
# Variants whose update is not the scaled product of the factors.
_VARIANTS = {
    "use_dora": "DoRA adapters (`use_dora`) rescale each column by a learned magnitude",
    "use_qalora": "QA-LoRA adapters (`use_qalora`) pool their inputs",
    "lora_bias": "adapters with a bias on B (`lora_bias`) add a term outside B·A",
    "target_parameters": "adapters on parameters (`target_parameters`) are not B·A per module",
    "alora_invocation_tokens": "activated LoRA adapters (`alora_invocation_tokens`) apply after a token only",
    "layer_replication": "adapters with `layer_replication` change the model's layers",
    "use_bdlora": "block-diagonal LoRA adapters (`use_bdlora`) share factors",
}
# Set per module in the output, so the adapters' own rules no longer apply.
_TARGETING = ("layers_to_transform", "layers_pattern", "exclude_modules")


@dataclass(frozen=True)
class AdapterConfig:
    """One input adapter's config, checked to be a LoRA that averages exactly."""

    path: Path
    values: dict

    @property
    def base_model(self) -> str | None:
        return self.values.get("base_model_name_or_path")

    @property
    def rslora(self) -> bool:
        return bool(self.values.get("use_rslora"))

    @property
    def summary(self) -> str:
        """`r=8, alpha=16, rslora`: for the plan."""
        extra = ", rslora" if self.rslora else ""
        patterns = (
            ", per-module patterns"
            if self.values.get("rank_pattern") or self.values.get("alpha_pattern")
            else ""
        )
        return f"r={self.values.get('r')}, alpha={self.values.get('lora_alpha')}{extra}{patterns}"

    def rank(self, module: str) -> int:
        return int(_by_pattern(self.values.get("rank_pattern") or {}, module, self.values.get("r", 8)))

    def scaling(self, module: str) -> float:
        """What peft multiplies this module's `B·A` by."""
        rank = self.rank(module)
        alpha = float(
            _by_pattern(self.values.get("alpha_pattern") or {}, module, self.values.get("lora_alpha", 8))
        )
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def read_config(weights: Path, label: str) -> AdapterConfig:
    """The `adapter_config.json` beside an adapter's weights, refused unless it averages exactly.

    Raises:
        InputError: no config, an unreadable one, or an adapter that is not a plain LoRA.
    """
    path = weights.parent / ADAPTER_CONFIG_NAME
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InputError(
            f"{label}: a PEFT adapter's weights without its {ADAPTER_CONFIG_NAME}; put the config beside them"
        ) from e
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable adapter config ({e})") from e
    if not isinstance(values, dict):
        raise InputError(f"{path}: not a readable adapter config (not a JSON object)")
    kind = values.get("peft_type", "LORA")
    if kind != "LORA":
        raise InputError(
            f"{path}: a {kind} adapter; ckptavg averages LoRA adapters only (merge each into its model "
            "with peft's merge_and_unload and average the merged models)"
        )
    for name, why in _VARIANTS.items():
        if values.get(name):
            raise InputError(
                f"{path}: {why}, so their factors do not average exactly; merge each adapter into its model "
                "with peft's merge_and_unload and average the merged models"
            )
    init = values.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise InputError(
            f"{path}: initialized with {init}, which changes the base weights; convert it to a plain LoRA "
            "first (peft's save_pretrained with path_initial_model_for_weight_conversion)"
        )
    return AdapterConfig(path, values)


def output_config(template: dict, ranks: dict[str, int]) -> dict:
    """The averaged adapter's config: `template` (the last input's) with each module's rank, a scale
    of 1 everywhere (plain LoRA with `lora_alpha = r`), and the modules named one by one.

    `ranks` maps module names (as peft names them in the model) to their rank in the output.
    """
    values = dict(template)
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else values.get("r", 8)
    exceptions = {re.escape(module): rank for module, rank in sorted(ranks.items()) if rank != common}
    values.update(
        r=common,
        lora_alpha=common,
        use_rslora=False,
        rank_pattern=exceptions,
        alpha_pattern=dict(exceptions),
        target_modules=sorted(ranks),
        init_lora_weights=True,
        **dict.fromkeys(_TARGETING),
    )
    return values


def _by_pattern(patterns: dict, module: str, default):
    """peft's rule: the value of the first pattern matching the end of `module` at a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default
