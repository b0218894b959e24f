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
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NonFiniteError, OutputError
from .hub import HubOptions

if TYPE_CHECKING:
    from .bn import BatchNormPass
from .plan import Plan, build_plan
from .readers import Checkpoint, open_checkpoint, open_headers
from .schedules import Schedule
from .sources import Source, resolve_sources
from .torch_format import save_torch_file
from .writer import INDEX_NAME, OutputTransaction, ensure_free_space


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
        yield [
            stack.enter_context(_open_source(source, key, strip_prefix))
            for source in resolve_sources(specs, keep_order=keep_order, hub=hub, fetch=fetch)
        ]


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
        )
        if bn is None:
            run_plan(plan, device=device, progress=progress)
            return plan
        from .bn import average_then_recompute_statistics

        return average_then_recompute_statistics(plan, bn, device=device, progress=progress)


def run_plan(plan: Plan, *, device: str = "cpu", progress: bool = False) -> Path:
    """Compute and write a planned output; returns its path. Nothing is left behind on failure.

    With `nonfinite="skip-checkpoint"`, a checkpoint found holding NaN or Inf is
    dropped from the plan (see `Plan.drop`) and the output is computed again.
    """
    if plan.output is None:
        raise OutputError("the plan has no output; pass output= to build_plan")
    while True:
        try:
            return _write(plan, device=device, progress=progress)
        except NonFiniteError as e:
            if plan.nonfinite != "skip-checkpoint" or len(plan.checkpoints) < 2:
                raise
            plan.drop(e.index, e.reason)  # and start again: every tensor so far had the old weights


def _write(plan: Plan, *, device: str, progress: bool) -> Path:
    from tqdm.auto import tqdm

    from .engine import Engine, resolve_device
    from .pipeline import WriteQueue

    # A torch output is streamed to safetensors first, then saved from that file's map.
    ensure_free_space(plan.output, plan.output_nbytes * (2 if plan.torch_output else 1))
    metadata = plan.metadata()
    with tqdm(
        total=plan.bytes_to_read,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc=plan.schedule.method,
        disable=not progress,
        leave=False,
    ) as bar:
        engine = Engine(plan, resolve_device(device), on_read=bar.update)
        with OutputTransaction(plan.output, folder=plan.folder, force=plan.force) as output:
            streamed = output.scratch_path(".safetensors") if plan.torch_output else None
            writers = {}
            for file in plan.files:
                writer = output.safetensors(
                    file.name, [t.entry for t in file.tensors], metadata, path=streamed
                )
                writers.update((t.name, writer) for t in file.tensors)
            with WriteQueue() as queue:
                for tensor in plan.computed:
                    targets = plan.targets(tensor)
                    for start, chunk, release in engine.chunks(tensor):
                        for i, name in enumerate(targets):
                            last = i == len(targets) - 1
                            queue.submit(
                                writers[name].write, name, start, chunk, release=release if last else None
                            )
                for writer in dict.fromkeys(writers.values()):
                    queue.submit(writer.finish)
                queue.drain()
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
                output.copy_file(extra)
            for checkpoint in plan.checkpoints:
                checkpoint.check_unchanged()
            output.commit()
    return plan.output
