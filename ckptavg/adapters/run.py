"""Writing an average of adapters, atomically (through `run.transaction`): an adapter folder
(`adapter_model.safetensors`, `adapter_config.json`, the last input's side files), or for a merge the
base model with the average added to its weights, streamed tensor by tensor and in blocks of rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..disk import ensure_free_space
from ..errors import InputError, OutputError
from ..formats.safetensors_header import Entry
from ..inputs.folders import ADAPTER_CONFIG_NAME
from ..plan.layout import INDEX_NAME
from ..run import interrupts
from ..run.transaction import OutputTransaction
from .config import ADAPTER_WEIGHTS, output_config
from .factors import delta_rows, row_blocks, truncated
from .layers import base_tensor_name, base_weight_name
from .records import AdapterPlan
from .updates import averaged_other, cast, stacked_layer


def execute(plans: Sequence[AdapterPlan]) -> list[AdapterPlan]:
    """Write each plan's output; the plans as carried out."""
    for plan in plans:
        if plan.output is None:
            raise OutputError("a plan has no output; pass output= to build_adapter_plan")
        ensure_free_space(plan.output, plan.output_nbytes)
        if plan.mode == "merge":
            _write_merged(plan)
        else:
            _write_adapter(plan)
    return list(plans)


def _write_adapter(plan: AdapterPlan) -> None:
    tensors = {}
    for layer in plan.layers:
        factors = stacked_layer(plan, layer)
        if plan.mode == "svd":
            factors, _ = truncated(factors, layer.rank)
        _, names = layer.parts[0]
        tensors[names.a], tensors[names.b] = factors.a, factors.b
    for name in plan.others:
        tensors[name] = averaged_other(plan, name)
    entries = plan.entries()
    config = output_config(plan.configs[-1].values, plan.ranks())
    with OutputTransaction(plan.output, folder=True, force=plan.force) as output:
        writer = output.safetensors(ADAPTER_WEIGHTS, entries, plan.metadata())
        for entry in entries:
            interrupts.check()
            writer.write(entry.name, 0, _checked(cast(tensors[entry.name], entry.dtype), entry, plan))
        writer.finish()
        output.write_json(ADAPTER_CONFIG_NAME, config)
        for extra in plan.extra_files:
            output.add_side_file(extra, plan.extra_root or extra.parent)
        for checkpoint in plan.checkpoints:
            checkpoint.check_unchanged()
        output.commit()


def _write_merged(plan: AdapterPlan) -> None:
    """The base's tensors in order: copied, replaced by the adapters' average (modules to save),
    or with the average update added, a block of rows at a time."""
    layout, base = plan.layout, plan.base
    updates = {base_weight_name(layer.module): layer for layer in plan.layers}
    replaced = {base_tensor_name(name): name for name in plan.others}
    metadata = plan.metadata()
    with OutputTransaction(layout.output, folder=layout.folder, force=plan.force) as output:
        for file in layout.files:
            writer = output.safetensors(file.name, [t.entry for t in file.tensors], metadata)
            for tensor in file.tensors:
                entry = tensor.entry
                name = tensor.name
                source = averaged_other(plan, replaced[name]) if name in replaced else base.get(name)
                layer = updates.get(name)
                factors = stacked_layer(plan, layer) if layer is not None else None
                flat = source.reshape(source.shape[0] if source.dim() else 1, -1)
                row_bytes = entry.nbytes // max(1, flat.shape[0])
                for start, stop in row_blocks(flat.shape[0], flat.shape[1]):
                    interrupts.check()
                    rows = flat[start:stop]
                    if factors is not None:
                        rows = rows.to(torch.float64) + delta_rows(factors, layer.transposed, start, stop)
                    writer.write(name, start * row_bytes, _checked(cast(rows, entry.dtype), entry, plan))
            writer.finish()
        if len(layout.files) > 1:
            total = sum(f.nbytes for f in layout.files)
            weight_map = dict(sorted((t.name, f.name) for f in layout.files for t in f.tensors))
            output.write_json(
                INDEX_NAME, {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
            )
        for extra in layout.extra_files:
            output.add_side_file(extra, layout.extra_root or extra.parent)
        for checkpoint in [*plan.checkpoints, base]:
            checkpoint.check_unchanged()
        output.commit()


def _checked(tensor: torch.Tensor, entry: Entry, plan: AdapterPlan) -> torch.Tensor:
    """The tensor, unless casting made NaN or Inf of finite values (an average its dtype cannot hold)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        where = plan.base.label if plan.base is not None else "the adapters"
        raise InputError(
            f"{where}: tensor '{entry.name}' of the average holds NaN or Inf in {entry.dtype}; "
            "check the inputs, or write a wider `dtype`"
        )
    return tensor
