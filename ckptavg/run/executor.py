"""Carrying out plans: the engine's chunks into the writers, then the atomic commit.

The one place where plans become files: `api.average`, the BatchNorm pass and
the command line all come here. With `nonfinite="skip-checkpoint"`, a
checkpoint found holding NaN or Inf is dropped and the output computed again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from pathlib import Path

from ..disk import ensure_free_space
from ..errors import NonFiniteError, OutputError
from ..formats.torch_format import save_torch_file
from ..plan.plan import Plan
from ..plan.spans import spans
from ..plan.tensors import OutputFile
from . import interrupts
from .dcp_writer import DcpWriter
from .remote_output import RemoteOutput
from .torch_like import LikeLastWriter
from .transaction import OutputTransaction


def run_plan(plan: Plan, *, device: str = "cpu", progress: bool = False) -> Path:
    """Compute and write a planned output; returns its path. Nothing is left behind on failure."""
    return run_plans([plan], device=device, progress=progress)[0]


def run_plans(plans: Sequence[Plan], *, device: str = "cpu", progress: bool = False) -> list[Path]:
    """Write several outputs from one read of the inputs: plans that differ only in their weights.

    Example: one `--sigma-rel` each, built from the same checkpoints with `build_plan`.
    """
    return [plan.output for plan in execute(plans, device=device, progress=progress)]


def execute(
    plans: Sequence[Plan],
    *,
    device: str = "cpu",
    progress: bool = False,
    write: Callable[..., list[str]] | None = None,
) -> list[Plan]:
    """Carry out plans that differ only in their weights; the plans as carried out.

    `write(plans, device=..., progress=...)` writes the outputs and returns the warnings found
    while summing: by default in this process; `parallel` splits the work among ranks.

    Those are new plans: with the warnings found while summing added, and, with
    `nonfinite="skip-checkpoint"`, without the checkpoints found holding NaN or Inf
    (`Plan.without`; the output is then computed again).
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
            found = (write or _write)(plans, device=device, progress=progress)
        except NonFiniteError as e:
            if first.nonfinite != "skip-checkpoint" or len(plans[0].checkpoints) < 2:
                raise
            plans = [plan.without(e.index, e.reason) for plan in plans]  # every tensor had the old weights
            continue
        return [replace(plan, warnings=[*plan.warnings, *found]) for plan in plans]


def _write(plans: list[Plan], *, device: str, progress: bool) -> list[str]:
    """Write the plans' outputs; the warnings found while summing."""
    from tqdm.auto import tqdm

    from .engine import Engine, beside_a_writer_thread, resolve_device
    from .pipeline import WriteQueue

    first = plans[0]
    for plan in plans:
        if plan.layout.remote is None:
            ensure_free_space(plan.output, space_needed(plan))
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
        outputs = [stack.enter_context(_transaction(p)) for p in plans]
        streamed = [
            out.scratch_path(".safetensors") if p.torch_output else None
            for p, out in zip(plans, outputs, strict=True)
        ]
        writers: list[dict] = []
        for plan, output, stream, meta in zip(plans, outputs, streamed, metadata, strict=True):
            by_name = {}
            for file in plan.files:
                writer = _file_writer(plan, output, file, stream, meta)
                by_name.update((t.name, writer) for t in file.tensors)
            writers.append(by_name)
        files = list({id(w): w for by_name in writers for w in by_name.values()}.values())
        # Writing past the page cache costs the writer thread little CPU: then the sums get every core.
        threads = nullcontext() if all(file.direct for file in files) else beside_a_writer_thread()
        with WriteQueue() as queue, threads:
            for span, parts in engine.stream(spans(first)):
                interrupts.check()
                targets = first.targets(span.tensors[0])  # the first of several joined is never tied
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
            finish_output(plan, output, stream, meta)
    return engine.warnings


def _transaction(plan: Plan) -> OutputTransaction | RemoteOutput:
    """The output's commit: files renamed into place, or uploads completed (a URL output)."""
    if plan.layout.remote is not None:
        return RemoteOutput(plan.layout.remote, folder=plan.folder, force=plan.force, stale=plan.layout.stale)
    return OutputTransaction(plan.output, folder=plan.folder, force=plan.force)


def space_needed(plan: Plan) -> int:
    """The disk space an output takes: a torch output is streamed to safetensors first, then saved
    from its map; one like the last input is as large as that input."""
    if plan.layout.like_last is not None:
        return plan.layout.like_last.size
    return plan.output_nbytes * (2 if plan.torch_output else 1)


def _file_writer(
    plan: Plan, output: OutputTransaction, file: OutputFile, stream: Path | None, metadata: dict
):
    """The writer of one output file: safetensors (a torch output's scratch file, for one), a
    copy of the last input's archive with the averages put in place, or a DCP folder's data."""
    if plan.layout.dcp:
        entries = [t.entry for t in file.tensors]
        writer = DcpWriter(output.path_of(file.name), entries, metadata, plan.layout.dcp_key, plan.output)
        return output.track(writer)
    if plan.layout.like_last is not None:
        return output.track(LikeLastWriter(output.path_of(file.name), plan.layout.like_last, plan.output))
    return output.safetensors(file.name, [t.entry for t in file.tensors], metadata, path=stream)


def finish_output(plan: Plan, output: OutputTransaction, streamed: Path | None, metadata: dict) -> None:
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
        output.write_json(plan.layout.index_name, index)
    for extra in plan.extra_files:
        output.add_side_file(extra, plan.extra_root or extra.parent)
    output.commit()
