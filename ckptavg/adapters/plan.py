"""The plan of an average of LoRA adapters: their weights (from the schedule, as for any average),
their layers, and what is written (an adapter, or a base model with the average merged in).

Everything is checked before anything is written: the adapters are LoRA of one base model, their
factors fit together, and for a merge every update has its weight in the base. Adapters are small,
so the plan reads their factors (non-finite values, and for `svd` the energy each layer keeps).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from math import prod
from pathlib import Path

from ..errors import InputError, MismatchError, NonFiniteError, OptionsError, OutputError
from ..formats import dtypes
from ..formats.readers import Checkpoint
from ..formats.safetensors_header import layout_order
from ..inputs.duplicates import duplicate_warnings
from ..inputs.folders import ADAPTER_CONFIG_NAME, HUB_PREFIX
from ..inputs.selection import Selection, choose
from ..inputs.side_files import allowed_root, find_side_files
from ..options import OutputOptions
from ..plan.layout import check_target, lay_out
from ..plan.plan import NONFINITE_POLICIES
from ..plan.tensors import TensorPlan
from ..schedules import Schedule
from .config import ADAPTER_WEIGHTS, AdapterConfig, read_config
from .layers import LayerNames, base_tensor_name, base_weight_name, sort_tensors
from .options import LoraOptions
from .records import AdapterLayer, AdapterPlan, is_adapter


def build_adapter_plan(
    checkpoints: Sequence[Checkpoint],
    schedule: Schedule,
    lora: LoraOptions,
    options: OutputOptions | None = None,
    *,
    base: Checkpoint | None = None,
    selection: Selection | None = None,
) -> AdapterPlan:
    """Check the adapters and decide everything the average will do.

    Args:
        checkpoints: opened adapters, in averaging order (oldest first).
        schedule: the method, e.g. `schedules.swa()`.
        lora: how they are averaged (`LoraOptions`).
        options: the output (`OutputOptions`: output, dtype, max_shard_size for a merge, force,
            nonfinite, steps); the factors are computed in float64 on the CPU.
        base: the opened base model, for `lora=merge`.
        selection: which adapters to keep, e.g. `Selection(last=5)`.

    Raises:
        InputError: an input is not a LoRA adapter that averages exactly, or holds NaN or Inf.
        MismatchError: adapters of different base models, or factors that do not fit together.
        OutputError: the output cannot be written as asked.
    """
    options = options or OutputOptions()
    output, dtype, force, nonfinite = options.output, options.dtype, options.force, options.nonfinite
    if nonfinite not in NONFINITE_POLICIES:
        raise OutputError(f"`nonfinite` must be one of {', '.join(NONFINITE_POLICIES)}, got {nonfinite}")
    checkpoints = list(checkpoints)
    not_adapters = [ck for ck in checkpoints if not is_adapter(ck)]
    if len(not_adapters) == len(checkpoints):
        raise OptionsError(
            f"`lora={lora.lora}` applies to LoRA adapters ({ADAPTER_CONFIG_NAME} beside {ADAPTER_WEIGHTS}); "
            f"{not_adapters[0].label} is not one"
        )
    if not_adapters:
        raise MismatchError(
            f"{not_adapters[0].label}: not a LoRA adapter, averaged with adapters; give adapters alone "
            "(to put an average of adapters into a model, use `lora=merge` with `base`)"
        )
    for ck in checkpoints:
        if ck.path is None or ck.label.startswith(HUB_PREFIX):
            raise InputError(
                f"{ck.label}: a LoRA adapter on the Hub; average a local copy "
                "(huggingface-cli download ORG/REPO --local-dir FOLDER)"
            )
    configs = [read_config(ck.path, ck.label) for ck in checkpoints]
    chosen = choose(checkpoints, options.steps, selection)
    checkpoints, configs = [checkpoints[i] for i in chosen.kept], [configs[i] for i in chosen.kept]
    found, sources, selected = chosen.steps, chosen.sources, chosen.notes
    warnings, dropped = [], []
    for index in reversed(range(len(checkpoints))):
        problem = _nonfinite(checkpoints[index])
        if problem is None:
            continue
        message = f"{checkpoints[index].label}: tensor '{problem}' holds NaN or Inf"
        if nonfinite == "error" or (nonfinite == "skip-checkpoint" and len(checkpoints) < 2):
            raise NonFiniteError(
                message + "; pass `nonfinite=skip-checkpoint` to average the others", index, "NaN/Inf"
            )
        if nonfinite == "warn":
            warnings.append(message)
            continue
        warnings.append(f"dropped {checkpoints[index].label}: it holds NaN or Inf in '{problem}'")
        dropped.append({"path": checkpoints[index].origin, "reason": f"NaN/Inf in '{problem}'"})
        del checkpoints[index], configs[index], found[index], sources[index]
    _check_one_base(checkpoints, configs)
    weights = schedule.weights(len(checkpoints), found)
    warnings += [*schedule.warnings(len(checkpoints)), *duplicate_warnings(checkpoints)]
    if len(checkpoints) == 1:
        warnings.append(f"only one adapter ({checkpoints[0].label}): the output is a copy of it")
    layers, others = _layers(checkpoints, configs)
    if dtype is not None and dtype not in dtypes.USER_DTYPE_NAMES:
        raise OutputError(f"`dtype` must be one of {', '.join(dtypes.USER_DTYPE_NAMES)}; got {dtype}")
    plan = AdapterPlan(
        checkpoints,
        configs,
        schedule,
        weights,
        lora.lora,
        layers,
        others,
        Path(os.fspath(output)) if output is not None else None,
        dtype=dtypes.USER_DTYPE_NAMES[dtype] if dtype else None,
        base=base,
        force=force,
        warnings=warnings,
        steps=found,
        step_sources=sources,
        selected=selected,
        dropped=dropped,
    )
    if lora.lora == "merge":
        return _merge_plan(plan, base, output, options.max_shard_size)
    if lora.lora == "svd":
        plan = _truncated(plan, lora.rank)
    return _adapter_output(plan, output)


def _nonfinite(checkpoint: Checkpoint) -> str | None:
    """The first floating tensor holding NaN or Inf, or None."""
    import torch

    for name, info in checkpoint.tensors.items():
        if info.is_floating and not bool(torch.isfinite(checkpoint.get(name)).all()):
            return name
    return None


def _check_one_base(checkpoints: list[Checkpoint], configs: list[AdapterConfig]) -> None:
    first = configs[0].base_model
    for ck, config in zip(checkpoints[1:], configs[1:], strict=True):
        if config.base_model != first:
            raise MismatchError(
                f"{ck.label}: an adapter of {config.base_model} but {checkpoints[0].label} is one of {first} "
                f"(base_model_name_or_path in {ADAPTER_CONFIG_NAME}); average adapters of one base model, or "
                "make the names agree if they are the same model"
            )


def _layers(
    checkpoints: list[Checkpoint], configs: list[AdapterConfig]
) -> tuple[list[AdapterLayer], list[str]]:
    """Every module's layer across the adapters (one missing from an adapter adds nothing from it),
    and the other tensors, which every adapter must hold alike."""
    by_module: dict[str, list[tuple[int, LayerNames]]] = {}
    others_of = []
    for index, ck in enumerate(checkpoints):
        layers, others = sort_tensors(ck)
        others_of.append(others)
        for module, names in layers.items():
            rank = ck.tensors[names.a].shape[0]
            if rank != configs[index].rank(module):
                raise InputError(
                    f"{ck.label}: tensor '{names.a}' has rank {rank} but {ADAPTER_CONFIG_NAME} gives "
                    f"'{module}' r={configs[index].rank(module)}; is the config the adapter's own?"
                )
            by_module.setdefault(module, []).append((index, names))
    result = []
    for module, parts in sorted(by_module.items()):
        _check_fit(checkpoints, parts)
        rank = sum(checkpoints[i].tensors[names.a].shape[0] for i, names in parts)
        result.append(AdapterLayer(module, tuple(parts), rank))
    first, others = checkpoints[0], others_of[0]
    for ck, names in zip(checkpoints[1:], others_of[1:], strict=True):
        if set(names) != set(others):
            differ = sorted(set(names) ^ set(others))
            raise MismatchError(
                f"{ck.label}: holds other tensors than {first.label} besides its LoRA factors "
                f"('{differ[0]}': modules_to_save or bias differ); average adapters trained alike"
            )
        for name in names:
            if ck.tensors[name].shape != first.tensors[name].shape:
                raise MismatchError(
                    f"{ck.label}: tensor '{name}' has shape {list(ck.tensors[name].shape)}, expected "
                    f"{list(first.tensors[name].shape)} as in {first.label}"
                )
    return result, others


def _check_fit(checkpoints: list[Checkpoint], parts: list[tuple[int, LayerNames]]) -> None:
    """The adapters' factors of one module map the same input to the same output."""
    index, names = parts[0]
    reference = checkpoints[index]

    def shapes(ck, names):
        return names.embedding, ck.tensors[names.a].shape[1:], ck.tensors[names.b].shape[0]

    expected = shapes(reference, names)
    for index, other in parts[1:]:
        ck = checkpoints[index]
        if shapes(ck, other) != expected:
            raise MismatchError(
                f"{ck.label}: LoRA factors of '{other.module}' ('{other.a}' "
                f"{list(ck.tensors[other.a].shape)}, '{other.b}' {list(ck.tensors[other.b].shape)}) "
                f"do not fit those of {reference.label}; "
                "average adapters of one base model"
            )


def _truncated(plan: AdapterPlan, rank: int) -> AdapterPlan:
    """The plan with each layer's rank and kept energy at rank `rank`."""
    from dataclasses import replace

    from .factors import truncated
    from .updates import stacked_layer

    layers = []
    for layer in plan.layers:
        factors, kept = truncated(stacked_layer(plan, layer), rank)
        layers.append(replace(layer, rank=factors.rank, kept=kept))
    return replace(plan, layers=layers)


def _adapter_output(plan: AdapterPlan, output: str | os.PathLike | None) -> AdapterPlan:
    """An adapter output: a folder, with the last adapter's side files (README, tokenizer)."""
    from dataclasses import replace

    if output is None:
        return plan
    text = os.fspath(output)
    target = Path(text)
    if not (text.endswith(("/", os.sep)) or target.is_dir()):
        raise OutputError(
            f"{target}: an averaged adapter is a folder ({ADAPTER_WEIGHTS} and {ADAPTER_CONFIG_NAME}); "
            f"give `output={target.with_suffix('')}/`"
        )
    for ck in plan.checkpoints:
        if ck.folder is not None and ck.folder.resolve() == target.resolve():
            raise OutputError(f"{target}: is an input ({ck.label}); write the output elsewhere")
    check_target(target, folder=True, force=plan.force)
    last = plan.checkpoints[-1]
    root = allowed_root(last.folder, last.label)
    extra, skipped = find_side_files(last.folder, root, marker=ADAPTER_CONFIG_NAME)
    extra = tuple(p for p in extra if p.name != ADAPTER_CONFIG_NAME)
    return replace(plan, extra_files=extra, extra_root=root, warnings=[*plan.warnings, *skipped])


def _merge_plan(
    plan: AdapterPlan, base: Checkpoint | None, output: str | os.PathLike | None, max_shard_size
) -> AdapterPlan:
    """A merge: every update has its weight in the base, laid out as peft merges it."""
    from dataclasses import replace

    if base is None:
        raise OutputError("`lora=merge` needs the base model: give `base=PATH`")
    layers = []
    for layer in plan.layers:
        name = base_weight_name(layer.module)
        if name not in base.tensors:
            raise MismatchError(
                f"{base.label}: has no tensor '{name}' for the adapters' module '{layer.module}'; "
                "is it the adapters' base model (or do its names need `strip_prefix`)?"
            )
        transposed = layer.parts[0][1].embedding or bool(
            plan.configs[layer.parts[0][0]].values.get("fan_in_fan_out")
        )
        index, names = layer.parts[0]
        ck = plan.checkpoints[index]
        rows, columns = ck.tensors[names.b].shape[0], prod(ck.tensors[names.a].shape[1:])
        shape = base.tensors[name].shape
        fits = (
            (shape == (columns, rows))
            if transposed
            else (shape[:1] == (rows,) and prod(shape[1:]) == columns)
        )
        if not fits:
            raise MismatchError(
                f"{base.label}: tensor '{name}' has shape {list(shape)}, but the adapters' update of "
                f"'{layer.module}' is {[rows, columns]}{' transposed' if transposed else ''}; "
                "is it the adapters' base model?"
            )
        layers.append(replace(layer, transposed=transposed))
    for stored in plan.others:
        name = base_tensor_name(stored)
        if name not in base.tensors or base.tensors[name].shape != plan.checkpoints[0].tensors[stored].shape:
            raise MismatchError(
                f"{base.label}: has no tensor '{name}' shaped as the adapters' '{stored}'; "
                "is it the adapters' base model?"
            )
    plan = replace(plan, layers=layers)
    if output is None:
        return plan
    text = os.fspath(output)
    if not (text.endswith(("/", os.sep)) or Path(text).is_dir() or text.endswith(".safetensors")):
        raise OutputError(
            f"{text}: `lora=merge` writes safetensors: give `output=merged.safetensors` or `output=merged/`"
        )
    tensors = [
        TensorPlan(
            name, info.shape, (plan.dtype or info.dtype) if info.is_floating else info.dtype, averaged=True
        )
        for name, info in base.tensors.items()
    ]
    order = {entry.name: i for i, entry in enumerate(layout_order(t.entry for t in tensors))}
    tensors.sort(key=lambda t: order[t.name])
    layout = lay_out(
        [*plan.checkpoints, base],
        tensors,
        output,
        force=plan.force,
        max_shard_size=max_shard_size,
        wrap_key=None,
    )
    return replace(plan, layout=layout, warnings=[*plan.warnings, *layout.warnings])
