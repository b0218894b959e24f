"""Which files of a folder make a checkpoint: the Hugging Face layout, trainer state, runs of
`checkpoint-N` folders, DeepSpeed `global_stepN` folders, natural order. Names only, so a listing
of the Hub and a listing of the disk are read the same way; nothing here touches a file system.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import InputError
from ..formats.deepspeed import STEP_FOLDERS, is_deepspeed_folder
from ..formats.readers import INDEX_SUFFIX, SAFETENSORS_SUFFIX
from ..formats.torch_format import TORCH_SUFFIXES

HUB_PREFIX = "hf://"
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)
# What a Hugging Face folder's weights are called, in order of preference.
HF_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HF_CONFIG_NAME = "config.json"
# A PEFT adapter folder: its config beside its weights (named in order of preference).
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# Files a training run keeps next to the weights that are not weights.
TRAINER_STATE = re.compile(r"^(optimizer|scheduler|scaler|rng_state.*|training_args|trainer_state)\.\w+$")
TRAINER_CHECKPOINT = "checkpoint-*"
GLOB_CHARS = re.compile(r"[*?\[]")
_DIGITS = re.compile(r"(\d+)")

# A folder listing: (file names, subfolder names) of a folder given relative to some root.
Listing = Callable[[str], tuple[list[str], list[str]]]


@dataclass(frozen=True)
class Source:
    """A checkpoint file on disk, or a Hub checkpoint known by its headers, and where it came from.

    Attributes:
        path: the local file: a weights file, or the `*.index.json` of shards; None when the
            checkpoint is known by `headers` alone.
        label: what the plan shows, e.g. `ckpts/step_2.safetensors` or `hf://org/run@step2/model.safetensors`.
        origin: what the output's metadata records: the label, with a Hub revision pinned to its commit.
        headers: for a Hub checkpoint that was not fetched (planning only): (file name ->
            (tensors, metadata) of each safetensors file, weight map or None), read with range requests.
    """

    path: Path | None
    label: str
    origin: str
    headers: tuple | None = None

    @classmethod
    def local(cls, path: Path) -> Source:
        return cls(path, str(path), str(path))


def natural_key(text: str | os.PathLike) -> list:
    """Sort key that orders `step_2` before `step_10` (digit runs compare as numbers)."""
    parts = _DIGITS.split(str(text))
    return [(0, int(part), part) if part.isdigit() else (1, part.lower(), part) for part in parts]


def checkpoints_in_folder(folder: str, listing: Listing, label: str) -> list[str]:
    """The checkpoints of a folder, as paths relative to the listing's root.

    One checkpoint in the Hugging Face layout (or the folder's only weights
    file), else each Trainer `checkpoint-N` subfolder in step order. A DeepSpeed
    checkpoint is a folder (its files are read together), and a DeepSpeed run
    (`global_stepN` folders beside the `latest` tag) is each of them in step order.

    Raises:
        InputError: no checkpoint, or several candidates and no way to choose.
    """
    files, folders = listing(folder)
    if is_deepspeed_folder(files):
        return [folder]
    found = _weights_among(files, label)
    if found is not None:
        return [_join(folder, found)]
    steps = _deepspeed_steps(folder, folders, listing, label)
    if steps:
        return steps
    runs = sorted((f for f in folders if fnmatchcase(f, TRAINER_CHECKPOINT)), key=natural_key)
    if not runs:
        raise InputError(
            f"{label}: holds no checkpoint (no {', '.join(HF_WEIGHT_NAMES)}, weights file or "
            f"{TRAINER_CHECKPOINT} folders)"
        )
    checkpoints = []
    for run in runs:
        run_label = f"{label.rstrip('/')}/{run}"
        run_folder = _join(folder, run)
        run_files, run_folders = listing(run_folder)
        weights = _weights_among(run_files, run_label)
        steps = _deepspeed_steps(run_folder, run_folders, listing, run_label) if weights is None else []
        if weights is None and not steps:
            raise InputError(
                f"{run_label}: holds no checkpoint (no {', '.join(HF_WEIGHT_NAMES)}, weights file or "
                f"DeepSpeed {STEP_FOLDERS} folder)"
            )
        checkpoints += [_join(folder, run, weights)] if weights is not None else steps
    return checkpoints


def _deepspeed_steps(folder: str, folders: Sequence[str], listing: Listing, label: str) -> list[str]:
    """A DeepSpeed run's checkpoints: its `global_stepN` folders, in step order."""
    steps = sorted((f for f in folders if fnmatchcase(f, STEP_FOLDERS)), key=natural_key)
    for step in steps:
        if not is_deepspeed_folder(listing(_join(folder, step))[0]):
            raise InputError(
                f"{label.rstrip('/')}/{step}: holds no DeepSpeed *_model_states.pt file (a save cut short?)"
            )
    return [_join(folder, step) for step in steps]


def is_model_side_file(name: str) -> bool:
    """Whether a file of a Hugging Face model folder goes with the weights (config, tokenizer, ...)."""
    return (
        not name.startswith(".")
        and not name.endswith((*WEIGHT_SUFFIXES, INDEX_SUFFIX))
        and not TRAINER_STATE.match(name)
    )


def _weights_among(files: Sequence[str], label: str) -> str | None:
    """The checkpoint among a folder's file names: Hugging Face names first, then a PEFT adapter's,
    else the only weights file."""
    for name in HF_WEIGHT_NAMES:
        if name in files:
            return name
    if ADAPTER_CONFIG_NAME in files:
        for name in ADAPTER_WEIGHT_NAMES:
            if name in files:
                return name
    indexes = sorted(f for f in files if f.endswith(INDEX_SUFFIX))
    if len(indexes) > 1:
        raise InputError(f"{label}: holds several shard indexes ({', '.join(indexes)}); pass one of them")
    if indexes:
        return indexes[0]
    weights = sorted(
        (f for f in files if f.endswith(WEIGHT_SUFFIXES) and not TRAINER_STATE.match(f)), key=natural_key
    )
    if len(weights) > 1:
        raise InputError(
            f"{label}: holds {len(weights)} weights files and no {HF_WEIGHT_NAMES[0]} or shard index; "
            f"to average them, pass '{label.rstrip('/')}/*{Path(weights[0]).suffix}'"
        )
    return weights[0] if weights else None


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)
