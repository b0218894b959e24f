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
from typing import TYPE_CHECKING

from .inputs.hub import HubOptions
from .run import supervision

if TYPE_CHECKING:
    from .bn.statistics import BatchNormPass
from .formats.readers import Checkpoint, open_checkpoint, open_headers
from .inputs.folders import Source
from .inputs.selection import Selection
from .inputs.specs import resolve_sources
from .plan.plan import Plan, build_plan
from .run.executor import execute
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
            return execute([plan], device=device, progress=progress)[0]
        from .bn.statistics import average_then_recompute_statistics

        return average_then_recompute_statistics(plan, bn, device=device, progress=progress)
