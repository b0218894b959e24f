"""An adapter's tensors sorted out: its LoRA layers (the `A` and `B` factors of one module) and the
other tensors it holds (`modules_to_save`, trained biases), with the names they have in the base model.

peft saves a module `X` of the model as `base_model.model.X.lora_A.weight` and
`base_model.model.X.lora_B.weight` (embeddings: `X.lora_embedding_A` and `X.lora_embedding_B`).
`A` is `(r, ...)` and `B` is `(out, r, ...)`: a layer's update is `B·A` with `B` flattened to
`(out, r)` and `A` to `(r, in)`, shaped as the base weight (transposed for embeddings and for
`fan_in_fan_out` layers such as GPT-2's Conv1D).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError
from ..formats.readers import Checkpoint

PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$"
)
_A_OF = {"lora_A.weight": "lora_B.weight", "lora_embedding_A": "lora_embedding_B"}
_BASE_LAYER = ".base_layer."


@dataclass(frozen=True)
class LayerNames:
    """One LoRA layer of one adapter: its module and the stored names of its factors."""

    module: str  # as peft names it in the model, e.g. `model.layers.0.self_attn.q_proj`
    a: str
    b: str
    embedding: bool


def sort_tensors(checkpoint: Checkpoint) -> tuple[dict[str, LayerNames], list[str]]:
    """The adapter's LoRA layers by module, and its other tensors' names.

    Raises:
        InputError: a factor without its other half, or factors whose shapes do not fit together.
    """
    found: dict[str, dict[str, str]] = {}
    others = []
    for name in checkpoint.tensors:
        match = _FACTOR.match(name)
        if match is None:
            others.append(name)
            continue
        found.setdefault(match["module"], {})[match["kind"]] = name
    layers = {}
    for stored_module, kinds in found.items():
        a_kind = next((k for k in _A_OF if k in kinds), None)
        if a_kind is None or _A_OF[a_kind] not in kinds or len(kinds) != 2:
            missing = next(iter(kinds.values()))
            raise InputError(
                f"{checkpoint.label}: tensor '{missing}' has no matching LoRA factor; is the adapter whole?"
            )
        a, b = kinds[a_kind], kinds[_A_OF[a_kind]]
        a_shape, b_shape = checkpoint.tensors[a].shape, checkpoint.tensors[b].shape
        if (
            len(a_shape) < 2
            or len(b_shape) < 2
            or a_shape[0] != b_shape[1]
            or any(d != 1 for d in b_shape[2:])
        ):
            raise InputError(
                f"{checkpoint.label}: LoRA factors '{a}' {list(a_shape)} and '{b}' {list(b_shape)} "
                "do not multiply (A must be (r, ...), B (out, r))"
            )
        module = stored_module.removeprefix(PEFT_PREFIX)
        layers[module] = LayerNames(module, a, b, embedding=a_kind == "lora_embedding_A")
    return layers, others


def base_weight_name(module: str) -> str:
    """The base model's weight that a module's update is merged into."""
    return f"{module}.weight"


def base_tensor_name(stored: str) -> str:
    """The base model's tensor that an adapter's other tensor replaces (a module to save, a bias)."""
    return stored.removeprefix(PEFT_PREFIX).replace(_BASE_LAYER, ".")
