"""The library's front door: `average` checkpoints into one file, `average_many` into one file per
schedule from one read, `bn_update` a checkpoint's BatchNorm statistics, `inspect` a checkpoint.

Each is one call that returns what was done; the command line is one of them per command.

Example:
    import ckptavg

    ckptavg.average(
        ["run/step_1000.safetensors", "run/step_2000.safetensors"],
        ckptavg.ema(decay=0.9),
        out="ema.safetensors",
    )
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .adapters.options import LoraOptions
from .errors import CkptavgError, OptionsError
from .formats.readers import Checkpoint, open_checkpoint, open_headers
from .formats.remote_downloads import Downloads
from .formats.remote_files import RangeReader, open_remote_checkpoint
from .inputs.folders import Source
from .inputs.hub_options import HubOptions
from .inputs.remote_side_files import RemoteSideFiles
from .inputs.selection import Selection
from .inputs.specs import resolve_sources
from .options import OutputOptions, ReadOptions
from .plan.plan import Plan, build_plan
from .plan.report import count_dtypes
from .run import distributed, parallel, supervision
from .run.executor import execute
from .schedules import Schedule
from .units import parse_size

if TYPE_CHECKING:
    from .adapters.records import AdapterPlan
    from .bn.statistics import BatchNormPass


@contextmanager
def open_checkpoints(
    specs: Sequence[str | os.PathLike],
    read: ReadOptions | None = None,
    *,
    hub: HubOptions | None = None,
    fetch: bool = True,
    **settings,
) -> Iterator[list[Checkpoint]]:
    """Resolve specs (files, folders, quoted globs, `hf://` paths) and open each checkpoint.

    `read` (or its fields as keywords: `key`, `strip_prefix`, `include`, `exclude`, `keep_order`,
    `weights_name`, `master_weights`; for URLs `storage_options`, `read_ahead`, `remote_requests`)
    says how; `hub` says how to reach the Hub (token, cache, offline).
    Hub inputs are fetched into its cache here, unless `fetch` is False: then Hub
    safetensors checkpoints not in the cache are opened from their headers, read with
    range requests, which is enough to plan (`dry_run`).
    """
    read = replace(read or ReadOptions(), **settings)
    read = replace(
        read,
        **{name: _patterns(getattr(read, name)) for name in ("strip_prefix", "include", "exclude")},
    )
    sources = resolve_sources(
        specs,
        keep_order=read.keep_order,
        hub=hub,
        fetch=fetch,
        weights_name=read.weights_name,
        storage_options=read.storage_options,
    )
    with ExitStack() as stack:
        reader = downloads = None
        if any(source.remote is not None for source in sources):  # one read-ahead for every URL
            reader = stack.enter_context(RangeReader(_read_ahead(read.read_ahead), read.remote_requests))
            downloads = stack.enter_context(Downloads(reader, fetch))  # torch files, DCP, DeepSpeed
        opened = (_open_source(source, read, reader, downloads) for source in sources)
        checkpoints = [stack.enter_context(checkpoint) for checkpoint in opened]
        for checkpoint in checkpoints:
            for path in checkpoint.files:
                supervision.announce_input(path)  # to name it if it changes under its memory map
        yield checkpoints


def _read_ahead(size: str | int) -> int:
    try:
        return parse_size(size)
    except CkptavgError as e:
        raise OptionsError(f"`read_ahead={size}`: {e}") from None


def _patterns(value: str | Sequence[str]) -> tuple[str, ...]:
    """A prefix or pattern given alone, or several, as a tuple."""
    return (value,) if isinstance(value, str) else tuple(value)


def _open_source(
    source: Source, read: ReadOptions, reader: RangeReader | None, downloads: Downloads | None
) -> Checkpoint:
    if source.remote is not None:
        checkpoint = open_remote_checkpoint(
            source.remote,
            reader,
            downloads,
            key=read.key,
            master_weights=read.master_weights,
            strip_prefix=read.strip_prefix,
            label=source.label,
            origin=source.origin,
            include=read.include,
            exclude=read.exclude,
        )
        checkpoint.remote_side_files = RemoteSideFiles(source.remote)  # downloaded or not
        return checkpoint
    if source.headers is not None:
        headers, weight_map = source.headers
        return open_headers(
            headers,
            label=source.label,
            origin=source.origin,
            weight_map=weight_map,
            strip_prefix=read.strip_prefix,
            include=read.include,
            exclude=read.exclude,
        )
    return open_checkpoint(
        source.path,
        key=read.key,
        strip_prefix=read.strip_prefix,
        label=source.label,
        origin=source.origin,
        master_weights=read.master_weights,
        include=read.include,
        exclude=read.exclude,
    )


def average(
    inputs: Sequence[str | os.PathLike],
    schedule: Schedule,
    out: str | os.PathLike,
    *,
    keep_order: bool = False,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    hub: HubOptions | None = None,
    dtype: str | None = None,
    accum_dtype: str = "auto",
    device: str = "cpu",
    max_shard_size: int | str | None = None,
    format: str | None = None,
    force: bool = False,
    wrap_key: str | None = None,
    like_last: bool = False,
    nonfinite: str = "error",
    steps: Sequence[int] | None = None,
    selection: Selection | None = None,
    bn: BatchNormPass | None = None,
    lora: LoraOptions | None = None,
    progress: bool = False,
) -> Plan | AdapterPlan:
    """Average checkpoints into `out`, streaming: memory stays flat whatever the model size.

    Args:
        inputs: checkpoint files (`.safetensors`, `.pt`, `.pth`, `.bin`, `.ckpt`), folders
            holding one checkpoint (or Trainer `checkpoint-N` folders), glob patterns, or
            `hf://ORG/REPO[@REVISION][/PATH]` paths on the Hub;
            sorted naturally (`step_2` before `step_10`) unless `keep_order`.
        schedule: `ckptavg.swa()`, `ckptavg.ema(decay)` or `ckptavg.weighted([...])`.
        out: a `.safetensors` file, a torch file (`.pt`, `.pth`, `.bin`; `.ckpt`, `.pth.tar`
            are written `like_last`), or a folder (ending in `/`) for Hugging Face shards plus
            the last input's config files.
        key: for torch files, the dict holding the weights (e.g. `state_dict_ema`).
        strip_prefix: prefixes removed from tensor names (e.g. `["module."]`).
        include, exclude: `fnmatch` patterns on the tensor names (after `strip_prefix`): average
            only the tensors an `include` pattern matches, then leave out those an `exclude`
            pattern matches (e.g. `exclude=["head.*"]`); the plan says what each removed.
        hub: for `hf://` inputs: `HubOptions(token=..., cache_dir=..., offline=...)`.
        dtype: output dtype of floating tensors; default: as in the first checkpoint.
        accum_dtype: `float64` (every output value correctly rounded), `float32` (a plain sum,
            a few units in the last place off), or `auto`: float64 for float32 and float64 outputs,
            float32 for narrower ones.
        device: `cpu`, `cuda`, `cuda:N` or `auto`; where the sums are computed.
        max_shard_size: largest output file, e.g. `"5GB"` (folder outputs).
        format: `"dcp"` writes the output folder as a torch.distributed.checkpoint.
        force: replace an existing output.
        wrap_key: for a torch output, save `{wrap_key: state_dict}`.
        like_last: for a torch output, write the last input's checkpoint (a torch zip archive)
            with the averaged weights put in place and all else (epoch, optimizer state,
            hyper-parameters) carried over unchanged.
        nonfinite: a NaN or Inf in an input: `error`, `warn`, or `skip-checkpoint`.
        steps: each checkpoint's training step, for step-aware schedules; default: stored
            with the checkpoint, else read from its name (`step_1000`, `checkpoint-1000`).
        selection: which checkpoints to keep, e.g. `Selection(last=5)`.
        bn: recompute the BatchNorm statistics of the average over data before the
            final write (`ckptavg.BatchNormPass(model=..., data=ckptavg.DataOptions(...))`).
        lora: for PEFT LoRA adapters (always averaged exactly, never factor by factor):
            `LoraOptions(lora="concat")` (the default), `"svd"` with `rank`, or `"merge"` with `base`.
        progress: show progress bars.

    Returns:
        The plan as carried out (weights, tensors, output files, warnings).

    Raises:
        CkptavgError: a bad input or output, with a one-line message naming the file and tensor.
    """
    (plan,) = average_many(
        inputs,
        [schedule],
        read=ReadOptions(
            key=key,
            strip_prefix=_patterns(strip_prefix),
            include=_patterns(include),
            exclude=_patterns(exclude),
            keep_order=keep_order,
        ),
        output=OutputOptions(
            output=os.fspath(out),
            dtype=dtype,
            max_shard_size=max_shard_size,
            format=format,
            wrap_key=wrap_key,
            like_last=like_last,
            force=force,
            accum_dtype=accum_dtype,
            device=device,
            nonfinite=nonfinite,
            steps=tuple(steps) if steps is not None else None,
        ),
        selection=selection,
        hub=hub,
        bn=bn,
        lora=lora,
        progress=progress,
    )
    return plan


def average_many(
    inputs: Sequence[str | os.PathLike],
    schedules: Sequence[Schedule],
    *,
    read: ReadOptions | None = None,
    output: OutputOptions | None = None,
    selection: Selection | None = None,
    hub: HubOptions | None = None,
    bn: BatchNormPass | None = None,
    lora: LoraOptions | None = None,
    dry_run: bool = False,
    progress: bool = False,
    on_plans: Callable[[list[Plan]], None] | None = None,
) -> list[Plan] | list[AdapterPlan]:
    """One output per schedule, from one read of the inputs (several `--sigma-rel`, say).

    With several schedules, `output.output` names each output by the schedule's
    parameters, e.g. `ema_{sigma_rel}.safetensors`. `on_plans` sees the plans
    before anything is read (to report them); `dry_run` stops there. PEFT LoRA adapters
    (or any `lora` but the default) go through `adapters/`: see `LoraOptions`.

    Returns:
        The plans as carried out (or as planned, with `dry_run`).

    Raises:
        OptionsError: the options contradict each other (no output, outputs that collide,
            a BatchNorm pass for several outputs).
        CkptavgError: a bad input or output, in one line.
    """
    read, output = read or ReadOptions(), output or OutputOptions()
    if output.output is None and not dry_run:
        raise OptionsError("give an output with `output=PATH` (or check the inputs with `dry_run=True`)")
    if bn is not None and len(schedules) > 1:
        raise OptionsError("a BatchNorm pass (`bn`) works with one output at a time; give one `sigma_rel`")
    names = output_names(output.output, schedules)
    with distributed.joined() as group, _opened(inputs, read, hub, not dry_run, group) as checkpoints:
        if group is not None and bn is not None:
            raise OptionsError("a BatchNorm pass (`bn`) runs in one process: run it without torchrun")
        if (lora is not None and lora.given) or _holds_adapters(checkpoints):
            if group is not None:
                raise OptionsError("LoRA adapters are averaged in one process: run it without torchrun")
            return _average_adapters(
                checkpoints,
                schedules,
                names,
                lora or LoraOptions(),
                read,
                output,
                selection,
                hub,
                bn,
                dry_run,
                on_plans,
            )
        plans = _together(
            group,
            lambda: [
                build_plan(
                    checkpoints,
                    schedule,
                    output,
                    selection=selection,
                    storage_options=read.storage_options,
                    output=name,
                )
                for schedule, name in zip(schedules, names, strict=True)
            ],
        )
        if group is not None:
            parallel.agree(group, plans)
        if on_plans is not None:
            on_plans(plans)
        if dry_run:
            return plans
        if group is not None:
            return parallel.execute(plans, group, device=output.device, progress=progress)
        if bn is None:
            return execute(plans, device=output.device, progress=progress)
        from .bn.statistics import average_then_recompute_statistics

        return [average_then_recompute_statistics(plans[0], bn, device=output.device, progress=progress)]


@contextmanager
def _opened(
    inputs, read: ReadOptions, hub: HubOptions | None, fetch: bool, group
) -> Iterator[list[Checkpoint]]:
    """`open_checkpoints`, under torchrun on every rank, each rank's failure raised on all. Hub inputs
    are fetched once per node: by its local rank 0 first, the others then find them in the cache."""
    with ExitStack() as stack:

        def here() -> list[Checkpoint]:
            return stack.enter_context(open_checkpoints(inputs, read, hub=hub, fetch=fetch))

        if group is None:
            yield here()
        elif fetch and any(os.fspath(spec).startswith("hf://") for spec in inputs):
            first = group.local_rank == 0
            fetched = group.together(lambda: here() if first else None)
            yield group.together(lambda: fetched if first else here())
        else:
            yield group.together(here)


def _together(group, make: Callable[[], list[Plan]]) -> list[Plan]:
    return make() if group is None else group.together(make)


def _holds_adapters(checkpoints: Sequence[Checkpoint]) -> bool:
    from .adapters.records import is_adapter

    return any(is_adapter(ck) for ck in checkpoints)


def _average_adapters(
    checkpoints, schedules, names, lora, read, output, selection, hub, bn, dry_run, on_plans
):
    """`average_many` for LoRA adapters: their factors are never averaged one by one."""

    from .adapters.plan import build_adapter_plan
    from .adapters.run import execute as write_adapters

    if bn is not None:
        raise OptionsError("a BatchNorm pass (`bn`) needs a full model, not LoRA adapters")
    with ExitStack() as stack:
        base = None
        if lora.base is not None:
            found = stack.enter_context(
                open_checkpoints([lora.base], replace(read, keep_order=False), hub=hub, fetch=not dry_run)
            )
            if len(found) > 1:
                raise OptionsError(f"`base` {lora.base} holds {len(found)} checkpoints; give one")
            (base,) = found
        plans = [
            build_adapter_plan(
                checkpoints, schedule, lora, replace(output, output=name), base=base, selection=selection
            )
            for schedule, name in zip(schedules, names, strict=True)
        ]
        if on_plans is not None:
            on_plans(plans)
        return plans if dry_run else write_adapters(plans)


def output_names(output: str | os.PathLike | None, schedules: Sequence[Schedule]) -> list[str | None]:
    """One output per schedule: `output` as given, or formatted with each schedule's parameters.

    Raises:
        OptionsError: several schedules would write to the same place.
    """
    output = os.fspath(output) if output is not None else None
    if output is None or len(schedules) == 1:
        return [output] * len(schedules)
    try:
        names = [output.format(**schedule.params()) for schedule in schedules]
    except (KeyError, IndexError, ValueError):
        names = [output] * len(schedules)
    if len(set(names)) < len(names):
        raise OptionsError(
            "several `sigma_rel`/`gamma` write several outputs: put {sigma_rel} (or {gamma}) "
            "in `output`, e.g. `output='ema_{sigma_rel}.safetensors'`"
        )
    return names


def bn_update(
    checkpoint_spec: str | os.PathLike,
    bn: BatchNormPass,
    *,
    read: ReadOptions | None = None,
    output: OutputOptions | None = None,
    hub: HubOptions | None = None,
    dry_run: bool = False,
    progress: bool = False,
    on_check: Callable[[str, list[str]], None] | None = None,
) -> Plan | None:
    """Recompute the BatchNorm statistics of one checkpoint and write it to `output.output`.

    With `dry_run`, builds the model, checks the weights fit and opens the data, passes
    (label, lines) to `on_check`, and returns None.

    Raises:
        OptionsError: no output, or the spec names several checkpoints.
    """
    from .bn.statistics import check_pass, write_with_new_statistics

    read, output = read or ReadOptions(), output or OutputOptions()
    if output.output is None and not dry_run:
        raise OptionsError("give an output with `output=PATH` (or check with `dry_run=True`)")
    if distributed.launched():  # every rank would run the pass and write the same output
        raise OptionsError("bn-update runs in one process: run it without torchrun")
    with open_checkpoints([checkpoint_spec], read, hub=hub, fetch=not dry_run) as checkpoints:
        if len(checkpoints) > 1:
            raise OptionsError(f"{checkpoint_spec} holds {len(checkpoints)} checkpoints; give one")
        (checkpoint,) = checkpoints
        if dry_run:
            lines = check_pass(checkpoint, bn)
            if on_check is not None:
                on_check(checkpoint.label, lines)
            return None
        plan, _ = write_with_new_statistics(
            checkpoint,
            bn,
            output=output.output,
            provenance=checkpoint.metadata,
            force=output.force,
            max_shard_size=output.max_shard_size,
            wrap_key=output.wrap_key,
            like_last=output.like_last,
            progress=progress,
        )
        return plan


@dataclass(frozen=True)
class Inspection:
    """What `inspect` finds in a checkpoint, from its headers."""

    label: str
    origin: str
    notes: list[str]
    tensors: dict  # name -> formats.dtypes.TensorInfo
    metadata: dict[str, str]

    @property
    def parameters(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def dtypes(self) -> str:
        """`14 F32, 2 I64`: how many tensors of each dtype."""
        return count_dtypes(info.dtype for info in self.tensors.values())


def inspect(path: str | os.PathLike, *, key: str | None = None, hub: HubOptions | None = None) -> Inspection:
    """Names, dtypes and shapes of a checkpoint's tensors, and its metadata, from headers only
    (Hub safetensors files are read with range requests, not downloaded).

    Raises:
        OptionsError: the path holds several checkpoints.
    """
    with open_checkpoints([path], key=key, hub=hub, fetch=False) as checkpoints:
        if len(checkpoints) > 1:
            raise OptionsError(f"{path} holds {len(checkpoints)} checkpoints; inspect one of them")
        (ck,) = checkpoints
        return Inspection(ck.label, ck.origin, list(ck.notes), dict(ck.tensors), dict(ck.metadata))
