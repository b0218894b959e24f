"""The training step of each checkpoint: given, stored with it, or read from its name.

Step-aware schedules, selection by step and the implied `sigma_rel` need to know
when each checkpoint was saved. In order of trust: `--steps`; a number stored
with the checkpoint (`global_step`, `step`, `epoch` in a torch checkpoint's dict
or a safetensors file's metadata); the file or folder name (`step_1000`,
`checkpoint-1000`, `epoch=3-step=1000.ckpt`, `model_01000.pt`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

STEP_KEYS = ("global_step", "step", "epoch")
_NAMED_STEP = re.compile(r"(?:^|[^a-z])(?:global_)?step[_=\-]?(\d+)", re.IGNORECASE)
_TRAINER = re.compile(r"^checkpoint[-_](\d+)$")  # Trainer's checkpoint-N, accelerate's checkpoint_N
_TRAILING = re.compile(r"(\d+)$")
# The names libraries give a model's weights file (or a shard of it): they never say the step.
_MODEL_FILE = re.compile(
    r"^(model|pytorch_model|diffusion_pytorch_model|adapter_model|consolidated|mp_rank_\d+_model_states)"
    r"(-\d{5}-of-\d{5})?$|-\d{5}-of-\d{5}$"
)
_INDEX_SUFFIX = ".index.json"


def infer_step(label: str, scalars: Mapping[str, float]) -> tuple[int | None, str]:
    """(step, where it came from) for one checkpoint; (None, "unknown") when nothing says."""
    for key in STEP_KEYS:
        value = scalars.get(key)
        if value is not None and float(value).is_integer() and value >= 0:
            return int(value), f"stored '{key}'"
    path = PurePosixPath(label.removeprefix("hf://"))
    stem, folder = path.name.removesuffix(_INDEX_SUFFIX).split(".")[0], path.parent.name
    # A step the name spells out (step_1000, checkpoint-1000), in the file's name or its folder's
    # (so accelerate's step_N/model_1.safetensors is step N); then a bare number ending the file's
    # name (model_01000.pt), unless it is a model's own name or a shard's: then the folder's.
    named = (_NAMED_STEP, _TRAINER)
    tries = [(stem, named), (folder, named)]
    tries.append((folder, (_TRAILING,)) if _MODEL_FILE.search(stem) else (stem, (_TRAILING,)))
    for text, patterns in tries:
        for pattern in patterns:
            match = pattern.search(text)
            if match:
                return int(match.group(1)), f"name '{text}'"
    return None, "unknown"


def resolve_steps(
    labels: Sequence[str], scalars: Sequence[Mapping[str, float]], given: Sequence[int] | None = None
) -> tuple[list[int | None], list[str]]:
    """Steps and their sources for every checkpoint; `given` (from --steps) wins."""
    if given is not None:
        if len(given) != len(labels):
            from ..errors import ScheduleError

            raise ScheduleError(
                f"`steps` has {len(given)} values for {len(labels)} checkpoints; give one each"
            )
        return list(given), ["`steps`"] * len(labels)
    found = [infer_step(label, values) for label, values in zip(labels, scalars, strict=True)]
    return [step for step, _ in found], [source for _, source in found]
