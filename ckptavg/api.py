"""The library's front door: `average` a series of checkpoints into one file.

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
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NonFiniteError, OutputError
from .inputs.hub import HubOptions
from .run import interrupts, supervision

if TYPE_CHECKING:
    from .bn.statistics import BatchNormPass
from .formats.readers import Checkpoint, open_checkpoint, open_headers
from .formats.torch_format import save_torch_file
from .inputs.selection import Selection
from .inputs.side_files import copy_side_file
from .inputs.specs import Source, resolve_sources
from .plan.plan import Plan, TensorPlan, build_plan
from .run.writer import INDEX_NAME, OutputTransaction, ensure_free_space
from .schedules import Schedule


@contextmanager
def open_checkpoints(
    specs: Sequence[str | os.PathLike],
    *,
    keep_order: bool = False,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    hub: HubOptions | None = None,
    fetch: bool = True,
) -> Iterator[list[Checkpoint]]:
    """Resolve specs (files, folders, quoted globs, `hf://` paths) and open each checkpoint.

    `key` and `strip_prefix` are as in `open_checkpoint`; `hub` says how to reach the
    Hub (token, cache, offline). Hub inputs are fetched into its cache here, unless
    `fetch` is False: then Hub safetensors checkpoints not in the cache are opened from
    their headers, read with range requests, which is enough to plan (`--dry-run`).
    """
    with ExitStack() as stack:
        checkpoints = [
            stack.enter_context(_open_source(source, key, strip_prefix))
            for source in resolve_sources(specs, keep_order=keep_order, hub=hub, fetch=fetch)
        ]
        for checkpoint in checkpoints:
            for path in checkpoint.files:
                supervision.announce_input(path)  # to name it if it changes under its memory map
        yield checkpoints


def _open_source(source: Source, key: str | None, strip_prefix: Sequence[str]) -> Checkpoint:
    if source.headers is not None:
        headers, weight_map = source.headers
        return open_headers(
            headers,
            label=source.label,
            origin=source.origin,
            weight_map=weight_map,
            strip_prefix=strip_prefix,
        )
    return open_checkpoint(
        source.path, key=key, strip_prefix=strip_prefix, label=source.label, origin=source.origin
    )


def average(
    inputs: Sequence[str | os.PathLike],
    schedule: Schedule,
    out: str | os.PathLike,
    *,
    keep_order: bool = False,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    hub: HubOptions | None = None,
    dtype: str | None = None,
    accum_dtype: str = "float32",
    device: str = "cpu",
    max_shard_size: int | str | None = None,
    force: bool = False,
    wrap_key: str | None = None,
    nonfinite: str = "error",
    steps: Sequence[int] | None = None,
    selection: Selection | None = None,
    bn: BatchNormPass | None = None,
    progress: bool = False,
) -> Plan:
    """Average checkpoints into `out`, streaming: memory stays flat whatever the model size.

    Args:
        inputs: checkpoint files (`.safetensors`, `.pt`, `.pth`, `.bin`, `.ckpt`), folders
            holding one checkpoint (or Trainer `checkpoint-N` folders), glob patterns, or
            `hf://ORG/REPO[@REVISION][/PATH]` paths on the Hub;
            sorted naturally (`step_2` before `step_10`) unless `keep_order`.
        schedule: `ckptavg.swa()`, `ckptavg.ema(decay)` or `ckptavg.weighted([...])`.
        out: a `.safetensors` file, a torch file (`.pt`, `.pth`, `.bin`), or a folder
            (ending in `/`) for Hugging Face shards plus the last input's config files.
        key: for torch files, the dict holding the weights (e.g. `state_dict_ema`).
        strip_prefix: prefixes removed from tensor names (e.g. `["module."]`).
        hub: for `hf://` inputs: `HubOptions(token=..., cache_dir=..., offline=...)`.
        dtype: output dtype of floating tensors; default: as in the first checkpoint.
        accum_dtype: `float32`, or `float64` for extra precision.
        device: `cpu`, `cuda`, `cuda:N` or `auto`; where the sums are computed.
        max_shard_size: largest output file, e.g. `"5GB"` (folder outputs).
        force: replace an existing output.
        wrap_key: for a torch output, save `{wrap_key: state_dict}`.
        nonfinite: a NaN or Inf in an input: `error`, `warn`, or `skip-checkpoint`.
        steps: each checkpoint's training step, for step-aware schedules; default: stored
            with the checkpoint, else read from its name (`step_1000`, `checkpoint-1000`).
        selection: which checkpoints to keep, e.g. `Selection(last=5)`.
        bn: recompute the BatchNorm statistics of the average over data before the
            final write (`ckptavg.BatchNormPass(model=..., data=ckptavg.DataOptions(...))`).
        progress: show progress bars.

    Returns:
        The plan that was carried out (weights, tensors, output files).

    Raises:
        CkptavgError: a bad input or output, with a one-line message naming the file and tensor.
    """
    with open_checkpoints(
        inputs, keep_order=keep_order, key=key, strip_prefix=strip_prefix, hub=hub
    ) as checkpoints:
        plan = build_plan(
            checkpoints,
            schedule,
            output=out,
            dtype=dtype,
            accum_dtype=accum_dtype,
            max_shard_size=max_shard_size,
            force=force,
            wrap_key=wrap_key,
            nonfinite=nonfinite,
            steps=steps,
            selection=selection,
        )
        if bn is None:
            run_plan(plan, device=device, progress=progress)
            return plan
        from .bn.statistics import average_then_recompute_statistics

        return average_then_recompute_statistics(plan, bn, device=device, progress=progress)


def run_plan(plan: Plan, *, device: str = "cpu", progress: bool = False) -> Path:
    """Compute and write a planned output; returns its path. Nothing is left behind on failure.

    With `nonfinite="skip-checkpoint"`, a checkpoint found holding NaN or Inf is
    dropped from the plan (see `Plan.drop`) and the output is computed again.
    """
    return run_plans([plan], device=device, progress=progress)[0]


def run_plans(plans: Sequence[Plan], *, device: str = "cpu", progress: bool = False) -> list[Path]:
    """Write several outputs from one read of the inputs: plans that differ only in their weights.

    Example: one `--sigma-rel` each, built from the same checkpoints with `build_plan`.
    """
    plans = list(plans)
    if any(plan.output is None for plan in plans):
        raise OutputError("a plan has no output; pass output= to build_plan")
    first = plans[0]
    if any(
        [ck.path for ck in p.checkpoints] != [ck.path for ck in first.checkpoints]
        or p.tensors != first.tensors
        for p in plans
    ):
        raise OutputError("plans written together must average the same checkpoints into the same tensors")
    while True:
        try:
            return _write(plans, device=device, progress=progress)
        except NonFiniteError as e:
            if first.nonfinite != "skip-checkpoint" or len(first.checkpoints) < 2:
                raise
            for plan in plans:  # and start again: every tensor so far had the old weights
                plan.drop(e.index, e.reason)


def _write(plans: list[Plan], *, device: str, progress: bool) -> list[Path]:
    from tqdm.auto import tqdm

    from .run.engine import Engine, beside_a_writer_thread, resolve_device
    from .run.pipeline import WriteQueue

    first = plans[0]
    for plan in plans:  # a torch output is streamed to safetensors first, then saved from its map
        ensure_free_space(plan.output, plan.output_nbytes * (2 if plan.torch_output else 1))
    metadata = [plan.metadata() for plan in plans]
    with (
        tqdm(
            total=first.bytes_to_read,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc=first.schedule.method,
            disable=not progress,
            leave=False,
        ) as bar,
        ExitStack() as stack,
    ):
        engine = Engine(plans, resolve_device(device), on_read=bar.update)
        outputs = [
            stack.enter_context(OutputTransaction(p.output, folder=p.folder, force=p.force)) for p in plans
        ]
        streamed = [
            out.scratch_path(".safetensors") if p.torch_output else None
            for p, out in zip(plans, outputs, strict=True)
        ]
        writers: list[dict] = []
        for plan, output, stream, meta in zip(plans, outputs, streamed, metadata, strict=True):
            by_name = {}
            for file in plan.files:
                writer = output.safetensors(file.name, [t.entry for t in file.tensors], meta, path=stream)
                by_name.update((t.name, writer) for t in file.tensors)
            writers.append(by_name)
        files = list({id(w): w for by_name in writers for w in by_name.values()}.values())
        # Writing past the page cache costs the writer thread little CPU: then the sums get every core.
        threads = nullcontext() if all(file.direct for file in files) else beside_a_writer_thread()
        with WriteQueue() as queue, threads:
            for tensor, parts in engine.stream(first.work()):
                interrupts.check()
                targets = first.targets(tensor) if isinstance(tensor, TensorPlan) else [tensor.name]
                for by_name, (start, chunk, release) in zip(writers, parts, strict=True):
                    for i, name in enumerate(targets):
                        last = i == len(targets) - 1
                        queue.submit(
                            by_name[name].write, name, start, chunk, release=release if last else None
                        )
            for file in files:
                queue.submit(file.finish)
            queue.drain()
        for checkpoint in first.checkpoints:
            checkpoint.check_unchanged()
        for plan, output, stream, meta in zip(plans, outputs, streamed, metadata, strict=True):
            _finish_output(plan, output, stream, meta)
    return [plan.output for plan in plans]


def _finish_output(plan: Plan, output: OutputTransaction, streamed: Path | None, metadata: dict) -> None:
    """What an output needs besides its safetensors files, then the atomic commit."""
    if plan.torch_output:
        save_torch_file(
            streamed,
            output.path_of(plan.output.name),
            names=list(plan.checkpoints[0].tensors),
            wrap_key=plan.wrap_key,
            metadata=metadata,
        )
    index = plan.index()
    if index is not None:
        output.write_json(INDEX_NAME, index)
    for extra in plan.extra_files:
        copy_side_file(extra, output.path_of(extra.name), plan.extra_root or extra.parent)
    output.commit()
