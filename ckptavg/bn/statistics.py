"""bn-update: recompute BatchNorm running statistics of averaged weights over data.

Averaged weights do not match the running statistics averaged alongside them;
one pass over training data with `torch.optim.swa_utils.update_bn` fixes that.
The pass is torch's own: this module builds the model (`--model`), loads the
weights strictly, feeds `update_bn` an iterator that moves batches to the
device (and counts images/s), and writes every tensor of the checkpoint
unchanged except the BatchNorm statistics, through the streaming writer.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import SHOWN_NAMES, CkptavgError, InputError, OutputError, name_list
from ..formats.readers import Checkpoint
from ..options import option
from ..plan.layout import Layout
from ..plan.like_last import plan_like_last
from ..plan.plan import Plan, build_plan
from ..plan.tensors import OutputFile
from ..schedules import swa
from .data import Batches, DataOptions, open_batches
from .imports import build_model

BN_KEY = "ckptavg.bn"


class NoBatchNormError(CkptavgError):
    """The model has no BatchNorm layer, so there is nothing to recompute."""


@dataclass(frozen=True)
class BatchNormPass:
    """How to recompute the statistics: the model to build, the data, and how to run it.

    Attributes:
        model: `package.module:callable`, `torchvision:NAME` or `timm:NAME`.
        data: where the batches come from (`data.DataOptions`).
        model_kwargs: keyword arguments for the model factory, e.g. `{"num_classes": 10}`.
        device: `auto`, `cpu`, `cuda` or `cuda:N`.
        amp: `bf16` or `fp16` to run the pass under autocast (GPU speed); None for full precision.
        channels_last: run the model in channels-last memory format.
    """

    model: str = option(
        group="BatchNorm pass",
        metavar="SPEC",
        help="The architecture, built with random weights: package.module:callable, torchvision:NAME "
        "or timm:NAME (imported and run: only give code you trust).",
    )
    data: DataOptions
    model_kwargs: dict = option(
        group="BatchNorm pass",
        factory=dict,
        metavar="JSON",
        parse="json",
        help="Keyword arguments for the model, e.g. '{\"num_classes\": 10}'.",
    )
    device: str = "auto"
    amp: str | None = option(
        None, group="BatchNorm pass", choices=("bf16", "fp16"), help="Run the pass under autocast (GPU)."
    )
    channels_last: bool = option(
        False, group="BatchNorm pass", help="Run the model in channels-last memory format."
    )


def describe_pass(bn: BatchNormPass) -> str:
    """One line for the plan: what the pass will run on."""
    kwargs = f" with {json.dumps(bn.model_kwargs)}" if bn.model_kwargs else ""
    bound = f", {bn.data.samples} samples" if bn.data.samples else ""
    return f"then:       BatchNorm statistics recomputed by {bn.model}{kwargs} over {bn.data.data}{bound}"


def recompute_statistics(checkpoint: Checkpoint, bn: BatchNormPass, *, progress: bool = False):
    """Run `update_bn` on the checkpoint's weights; the new statistics and a record of the pass.

    Returns:
        (name -> tensor for every BatchNorm running_mean, running_var and num_batches_tracked,
         a dict describing the pass for the output's metadata, the `Batches` that were used)

    Raises:
        NoBatchNormError: the model has no BatchNorm layer.
        MismatchError/InputError: the weights do not fit the model; no usable input.
    """
    import torch
    from torch.optim.swa_utils import update_bn
    from tqdm.auto import tqdm

    from ..run.engine import resolve_device

    model = build_model(bn.model, bn.model_kwargs)
    statistics = _statistics_names(model)
    if not statistics:
        raise NoBatchNormError(
            f"`model={bn.model}` has no BatchNorm layer: there are no statistics to "
            "recompute, and nothing was written"
        )
    _load_weights(model, checkpoint, bn.model)
    device = resolve_device(bn.device)
    model.to(device)
    if bn.channels_last:
        model.to(memory_format=torch.channels_last)
    batches = open_batches(bn.data, model)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(bn.amp) if bn.amp else None
    with tqdm(unit="img", desc="bn-update", disable=not progress, leave=False) as bar:
        feed = _feed(batches, device, bn.channels_last, bar)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            update_bn(feed, _calling_with_batch(model))
    if batches.samples == 0:
        raise InputError(
            f"`data={bn.data.data}`: no input reached the model"
            + (f" ({len(batches.skipped)} unreadable images skipped)" if batches.skipped else "")
        )
    state = model.state_dict()
    new = {name: state[name].detach().to("cpu", memory_format=torch.contiguous_format) for name in statistics}
    record = {
        "model": bn.model,
        "model_kwargs": bn.model_kwargs,
        "data": batches.description,
        "samples": batches.samples,
        "batches": batches.batches,
        "skipped": len(batches.skipped),
        "unreadable": batches.skipped[:SHOWN_NAMES],
        "options": {k: v for k, v in asdict(bn.data).items() if v not in (None, False) and k != "data"},
    }
    return new, record, batches


def write_with_new_statistics(
    checkpoint: Checkpoint,
    bn: BatchNormPass,
    *,
    output,
    provenance: dict[str, str],
    force: bool = False,
    max_shard_size=None,
    wrap_key: str | None = None,
    like_last: bool = False,
    like: Checkpoint | None = None,
    averaged: Collection[str] = (),
    extra_files: tuple[list[Path], Path | None] | None = None,
    progress: bool = False,
) -> tuple[Plan, Batches]:
    """Recompute the statistics of `checkpoint` and write it to `output` with them.

    The output is checked before the pass (so a mistake costs no data pass);
    every tensor but the statistics is copied unchanged, in its own dtype. An output
    like the last input copies the torch archive of `like` (default: `checkpoint`) with
    the new statistics and the `averaged` tensors (read from `checkpoint`) put in place.
    """
    from ..run.executor import execute

    replacements: dict = {}
    updated = _WithReplacements.wrap(checkpoint, replacements)
    template = like if like is not None else checkpoint
    plan = build_plan(
        [template if like_last or like is not None else updated],
        swa(),
        output=output,
        force=force,
        max_shard_size=max_shard_size,
        wrap_key=wrap_key,
        like_last=like_last,
    )
    if extra_files is not None:
        files, root = extra_files
        plan = replace(plan, layout=replace(plan.layout, extra_files=tuple(files), extra_root=root))
    new, record, batches = recompute_statistics(checkpoint, bn, progress=progress)
    replacements.update(new)
    plan = replace(plan, checkpoints=[updated])
    like_plan = plan.layout.like_last
    if like_plan is not None:  # the archive's records that change: known now the statistics are
        rewritten = {*averaged, *new}
        like_plan = plan_like_last(template, plan.tensors, plan.output, like_plan.implied_by, rewritten)
        plan = replace(plan, layout=replace(plan.layout, like_last=like_plan))
    (done,) = execute(
        [replace(plan, provenance={**provenance, BN_KEY: json.dumps(record)})], progress=progress
    )
    return done, batches


def average_then_recompute_statistics(
    plan: Plan, bn: BatchNormPass, *, device: str = "cpu", progress: bool = False
) -> Plan:
    """Carry out an averaging plan with a BatchNorm pass before the final write.

    The average goes to a scratch safetensors file next to the output (same
    dtypes, flat memory), the pass runs on it, and the output is written from
    it with the new statistics, keeping the plan's layout and provenance.
    """
    from ..formats.readers import open_checkpoint
    from ..run.executor import execute
    from ..run.transaction import temporary_path

    if plan.layout.remote is not None:
        raise OutputError(
            f"{plan.layout.remote.shown}: a BatchNorm pass writes to a local path only; "
            "write it here, then upload it"
        )
    target = plan.output
    scratch = temporary_path(target, ".safetensors")
    to_scratch = replace(plan, layout=Layout(scratch, files=(OutputFile(scratch.name, tuple(plan.tensors)),)))
    try:
        (averaged,) = execute([replace(to_scratch, force=False)], device=device, progress=progress)
        like = plan.layout.like_last is not None
        with open_checkpoint(scratch) as checkpoint:
            final, _ = write_with_new_statistics(
                checkpoint,
                bn,
                output=f"{target}/" if plan.folder else target,
                provenance=averaged.metadata(),
                force=plan.force,
                max_shard_size=plan.shard_size if plan.folder else None,
                wrap_key=plan.wrap_key,
                like_last=like,
                like=plan.checkpoints[-1] if like else None,
                averaged={t.name for t in plan.tensors if t.averaged},
                extra_files=(plan.extra_files, plan.extra_root),
                progress=progress,
            )
    finally:
        scratch.unlink(missing_ok=True)
    return replace(final, warnings=averaged.warnings)  # the averaging's, not those of the copy


def update_in_place(model, bn: BatchNormPass) -> Batches:
    """torch's `update_bn` over the pass's data on a model that already holds its weights (on the
    pass's device); the model is left in train mode, as `update_bn` leaves it.

    Raises:
        InputError: no input reached the model.
    """
    import torch
    from torch.optim.swa_utils import update_bn

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = open_batches(bn.data, model)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(bn.amp) if bn.amp else None
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        update_bn(_feed(batches, device, bn.channels_last, _NoBar()), _calling_with_batch(model))
    if batches.samples == 0:
        raise InputError(f"`data={bn.data.data}`: no input reached the model")
    return batches


class _NoBar:
    def update(self, count: int) -> None:
        pass


def _statistics_names(model) -> list[str]:
    from torch.nn.modules.batchnorm import _BatchNorm

    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            dot = f"{prefix}." if prefix else ""
            names += [dot + buffer for buffer in ("running_mean", "running_var", "num_batches_tracked")]
    return names


def check_pass(checkpoint: Checkpoint, bn: BatchNormPass) -> list[str]:
    """Everything but the pass itself: build the model, fit the weights' names and shapes, open the data.

    Needs no tensor data, so `--dry-run` can run it on a checkpoint known by its headers.
    """
    model = build_model(bn.model, bn.model_kwargs)
    statistics = _statistics_names(model)
    if not statistics:
        raise NoBatchNormError(
            f"`model={bn.model}` has no BatchNorm layer: there are no statistics to recompute"
        )
    check_fit(model, checkpoint, bn.model)
    batches = open_batches(bn.data, model)
    return [
        f"model:      {bn.model}: {len(statistics) // 3} BatchNorm layers, the weights fit",
        f"data:       {batches.description}, batches of {bn.data.batch_size}"
        + (f", at most {bn.data.max_batches} batches" if bn.data.max_batches else ""),
    ]


def _load_weights(model, checkpoint: Checkpoint, spec: str) -> None:
    check_fit(model, checkpoint, spec)
    model.load_state_dict({name: checkpoint.get(name) for name in model.state_dict()}, strict=True)


def check_fit(model, checkpoint: Checkpoint, spec: str) -> None:
    """Names and shapes of the weights against the model's, all listed at once (strict loading)."""
    from ..errors import MismatchError

    expected = model.state_dict()
    missing = sorted(expected.keys() - checkpoint.tensors.keys())
    unexpected = sorted(checkpoint.tensors.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({name_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({name_list(unexpected)})")
        hint = _prefix_hint(missing, unexpected)
        raise MismatchError(
            f"{checkpoint.label}: its tensors do not fit `model={spec}`: {'; '.join(parts)}{hint}"
        )
    for name, tensor in expected.items():
        shape = checkpoint.tensors[name].shape
        if tuple(tensor.shape) != shape:
            raise MismatchError(
                f"{checkpoint.label}: tensor '{name}' has shape {tuple(shape)} but `model={spec}` "
                f"expects {tuple(tensor.shape)}; check `model_kwargs`"
            )


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    for name in unexpected:
        head, _, rest = name.partition(".")
        if rest in missing:
            return f"; the checkpoint's names start with '{head}.': try `strip_prefix={head}.`"
    return "; check `model` and `model_kwargs`, or `strip_prefix`"


def _feed(batches: Batches, device, channels_last: bool, bar) -> Iterator:
    """Batches on the device (dicts too), counted on the progress bar."""
    import torch

    def move(tensor):
        tensor = tensor.to(device, non_blocking=True)
        if channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    for batch in batches:
        batch = {k: move(v) for k, v in batch.items()} if isinstance(batch, dict) else move(batch)
        yield batch
        bar.update(next(iter(batch.values())).shape[0] if isinstance(batch, dict) else batch.shape[0])


def _calling_with_batch(model):
    """The model in a module calling `model(**batch)` for dict batches; update_bn calls `model(batch)`."""
    import torch

    class CallWithBatch(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, batch):
            return self.inner(**batch) if isinstance(batch, dict) else self.inner(batch)

    return CallWithBatch(model)


class _WithReplacements:
    """A checkpoint as one `CheckpointFile`, with some tensors served from memory instead (the new
    statistics): the executor then writes it like any input, through the same atomic writer."""

    notes: tuple[str, ...] = ()
    stamp = None  # the wrapped checkpoint checks its own files

    def __init__(self, checkpoint: Checkpoint, replacements: dict):
        self.path, self.tensors, self.metadata = checkpoint.path, checkpoint.tensors, checkpoint.metadata
        self.tied, self.scalars = checkpoint.tied, checkpoint.scalars
        self._checkpoint, self._replacements = checkpoint, replacements

    def get(self, name: str, info):
        replaced = self._replacements.get(name)
        return replaced if replaced is not None else self._checkpoint.get(name)

    @classmethod
    def wrap(cls, checkpoint: Checkpoint, replacements: dict) -> Checkpoint:
        return Checkpoint(
            checkpoint.path, [cls(checkpoint, replacements)], None, (), checkpoint.label, checkpoint.origin
        )
