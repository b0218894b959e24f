"""Which files of a folder make a checkpoint: the Hugging Face layout, trainer state, runs of
`checkpoint-N` folders, DeepSpeed `global_stepN` folders, DCP folders and runs of them, natural
order. Names only, so a listing
of the Hub and a listing of the disk are read the same way; nothing here touches a file system.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from ..errors import InputError, name_list
from ..formats.dcp import DISTCP_SUFFIX, is_dcp_folder
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
# Files a training run keeps next to the weights that are not weights (accelerate numbers them:
# optimizer_1.bin, random_states_0.pkl).
TRAINER_STATE = re.compile(
    r"^(optimizer|scheduler|scaler|sampler|rng_state|random_states|training_args|trainer_state)"
    r"(_\d+)?\.\w+$"
)
# The weights files of one model share a name whatever their format, variant or shard:
# model.safetensors, pytorch_model.bin, model.fp16.safetensors, model-00001-of-00002.safetensors.
_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")
TRAINER_CHECKPOINT = "checkpoint-*"
# The step folders of runs saved as DCP: torchtitan's step-N, Megatron's iter_NNNNNNN (a Trainer's
# checkpoint-N may hold DCP too: it is read with the other checkpoint-N folders of its run).
DCP_STEP_FOLDERS = ("step-*", "step_*", "iter_*")
# accelerate's (and so a Trainer's) FSDP sharded state dict: a DCP folder per model in checkpoint-N.
FSDP_MODEL_FOLDERS = "pytorch_model_fsdp_*"
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
        remote: for a checkpoint in object storage (a URL), its `remote_files.RemoteObject`.
    """

    path: Path | None
    label: str
    origin: str
    headers: tuple | None = None
    remote: Any = None

    @classmethod
    def local(cls, path: Path) -> Source:
        return cls(path, str(path), str(path))


def natural_key(text: str | os.PathLike) -> list:
    """Sort key that orders `step_2` before `step_10` (digit runs compare as numbers)."""
    parts = _DIGITS.split(str(text))
    return [(0, int(part), part) if part.isdigit() else (1, part.lower(), part) for part in parts]


def model_name(file_name: str) -> str:
    """The model a weights file holds: `model_1` for `model_1.safetensors`, `model` for both of
    transformers' names (`model.safetensors`, `pytorch_model-00001-of-00002.bin`)."""
    stem = _SHARD_SUFFIX.sub("", file_name.split(".")[0])
    return "model" if stem == "pytorch_model" else stem


def checkpoints_in_folder(
    folder: str, listing: Listing, label: str, weights_name: str | None = None
) -> list[str]:
    """The checkpoints of a folder, as paths relative to the listing's root.

    One checkpoint in the Hugging Face layout (or the folder's only weights
    file, or accelerate's FSDP `pytorch_model_fsdp_0` DCP folder), else each Trainer
    `checkpoint-N` subfolder in step order, in whichever of these forms each holds. A DeepSpeed
    checkpoint is a folder (its files are read together), and a DeepSpeed run
    (`global_stepN` folders beside the `latest` tag) is each of them in step order;
    so is a DCP checkpoint (`.metadata` beside `*.distcp`), and a run of them (`step-N`
    or `iter_N` folders; one without `.metadata` yet, a save under way, is left out).

    `weights_name` picks one model of a folder holding several (`model_1` of accelerate's
    `model.safetensors` and `model_1.safetensors`, `pytorch_model_fsdp_1` of its FSDP folders).

    Raises:
        InputError: no checkpoint, several candidates and no way to choose, or DCP step folders
            beside `checkpoint-N` folders.
    """
    files, folders = listing(folder)
    if is_deepspeed_folder(files) or is_dcp_folder(files):
        return [folder]
    found = _model_here(folder, files, folders, listing, label, weights_name)
    if found is not None:
        return [found]
    runs = sorted((f for f in folders if fnmatchcase(f, TRAINER_CHECKPOINT)), key=natural_key)
    steps = _deepspeed_steps(folder, folders, listing, label) or _dcp_steps(folder, folders, listing)
    if steps and runs:
        raise InputError(
            f"{label}: holds DCP step folders ({Path(steps[0]).name}, ...) and {TRAINER_CHECKPOINT} "
            f"folders ({runs[0]}, ...); pass the ones to average, e.g. "
            f"'{label.rstrip('/')}/{TRAINER_CHECKPOINT}'"
        )
    if steps:
        return steps
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
        if is_dcp_folder(run_files):
            checkpoints.append(run_folder)
            continue
        weights = _model_here(run_folder, run_files, run_folders, listing, run_label, weights_name)
        steps = _deepspeed_steps(run_folder, run_folders, listing, run_label) if weights is None else []
        if weights is None and not steps:
            cut_short = any(f.endswith(DISTCP_SUFFIX) for f in run_files)
            raise InputError(
                f"{run_label}: holds no checkpoint ("
                + (
                    "its *.distcp files have no .metadata: a DCP save cut short or still under way"
                    if cut_short
                    else f"no {', '.join(HF_WEIGHT_NAMES)}, weights file, DeepSpeed {STEP_FOLDERS} "
                    "folder or DCP folder"
                )
                + ")"
            )
        checkpoints += [weights] if weights is not None else steps
    return checkpoints


def _model_here(
    folder: str, files: Sequence[str], folders: Sequence[str], listing: Listing, label: str, weights_name
) -> str | None:
    """A folder's one model: its weights file, or accelerate's FSDP DCP folder of it (path from
    the listing's root); None if it holds neither."""
    fsdp = [f for f in folders if fnmatchcase(f, FSDP_MODEL_FOLDERS)]
    fsdp = sorted((f for f in fsdp if is_dcp_folder(listing(_join(folder, f))[0])), key=natural_key)
    if weights_name in fsdp:
        return _join(folder, weights_name)
    found = _weights_among(files, label, weights_name)
    if found is not None or not fsdp:
        return _join(folder, found) if found is not None else None
    if len(fsdp) > 1:
        raise InputError(
            f"{label}: holds the FSDP checkpoints of {len(fsdp)} models ({name_list(fsdp)}): "
            f"take one with `weights_name={fsdp[0]}`"
        )
    return _join(folder, fsdp[0])


def _dcp_steps(folder: str, folders: Sequence[str], listing: Listing) -> list[str]:
    """A run's DCP checkpoints: its step folders (`step-N`, `iter_N`, `checkpoint-N`) that hold one,
    in step order."""
    steps = [f for f in folders if any(fnmatchcase(f, pattern) for pattern in DCP_STEP_FOLDERS)]
    found = [step for step in steps if is_dcp_folder(listing(_join(folder, step))[0])]
    return [_join(folder, step) for step in sorted(found, key=natural_key)]


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


def _weights_among(files: Sequence[str], label: str, weights_name: str | None) -> str | None:
    """The checkpoint among a folder's file names: the weights of its one model (or of
    `weights_name`; a PEFT adapter's `adapter_model` is a model too), in the best form stored."""
    weights = [
        f for f in files if f.endswith((*WEIGHT_SUFFIXES, INDEX_SUFFIX)) and not TRAINER_STATE.match(f)
    ]
    models: dict[str, list[str]] = {}
    for name in sorted(weights, key=natural_key):
        models.setdefault(model_name(name), []).append(name)
    if weights_name is not None:
        wanted = model_name(weights_name)
        if not models:  # a run folder: its checkpoint-N folders hold them
            return None
        if wanted not in models:
            raise InputError(
                f"{label}: holds no weights named {weights_name} (it holds {name_list(sorted(models))})"
            )
        models = {wanted: models[wanted]}
    if len(models) > 1:
        raise InputError(
            f"{label}: holds the weights of {len(models)} models ({name_list(list(models))}): "
            f"take one with `weights_name={next(iter(models))}`, or to average these files as "
            f"checkpoints, pass '{label.rstrip('/')}/*{Path(weights[0]).suffix}'"
        )
    if not models:
        return None
    return _best_form(next(iter(models.values())), label)


def _best_form(names: list[str], label: str) -> str:
    """One model's weights file: safetensors before torch, the index of shards (never one shard),
    the file without a variant (`model.safetensors`, not `model.fp16.safetensors`) when both exist."""
    singles = [n for n in names if not _SHARD_SUFFIX.search(n.split(".")[0])]
    if not singles:
        raise InputError(f"{label}: holds shards ({names[0]}, ...) but not their {INDEX_SUFFIX} index")

    def preference(name: str) -> tuple:
        stored = name.removesuffix(INDEX_SUFFIX)
        return (not stored.endswith(SAFETENSORS_SUFFIX), stored.count(".") - 1, name != stored)

    singles.sort(key=preference)
    best = [n for n in singles if preference(n) == preference(singles[0])]
    if len(best) > 1:
        raise InputError(
            f"{label}: holds {name_list(best)}, equally good forms of one model; pass the file to use"
        )
    return best[0]


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)
