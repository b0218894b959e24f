"""Carrying out plans on several ranks (torchrun): each rank sums its share into the shared output
files, and rank 0 commits once every rank's part is on disk.

The steps, each ended by a collective that every rank's outcome goes through
(`distributed.Group.check`), so one rank's failure stops every rank at that step:

1. rank 0 opens the output's transaction (`transaction`) and creates every output
   file whole, header and size (`shared.create`): the torch output's scratch file, a
   single file, each shard of a folder, or a DCP folder's `.distcp` (`dcp_shared`);
2. every rank finds those files where it sees the output (a file system shared by
   every rank, or the run stops here) and opens the ones its share writes;
3. every rank sums its share (`split`) and writes it in place, then fsyncs;
4. rank 0 writes what else the output needs (index, side files, the torch file, a
   DCP output's CRC-32s joined from every rank's pieces and its `.metadata`) and
   commits; nothing is in place before every rank has reported its part.

On failure rank 0's transaction removes the temporaries; the other ranks remove
them too, in case rank 0 is the one that died.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from ..disk import ensure_free_space
from ..errors import MismatchError, OutputError, name_list, plural
from ..plan.plan import Plan
from ..plan.spans import spans
from . import dcp_shared, interrupts
from .distributed import Group
from .executor import execute as execute_plans
from .executor import finish_output, space_needed
from .shared import SharedWriter, create, wait_until_seen
from .split import Share, describe_shares, shares
from .transaction import OutputTransaction


def execute(
    plans: Sequence[Plan], group: Group, *, device: str = "cpu", progress: bool = False
) -> list[Plan]:
    """`executor.execute` with the work split among the group's ranks; every rank returns the same plans."""
    remote = next((p.layout.remote for p in plans if p.layout is not None and p.layout.remote), None)
    if remote is not None:
        raise OutputError(
            f"{remote.shown}: outputs to a URL are written by one process: run it without torchrun"
        )

    def write(plans: list[Plan], *, device: str, progress: bool) -> list[str]:
        return _write(plans, group, device=device, progress=progress)

    return execute_plans(plans, device=device, progress=progress, write=write)


def agree(group: Group, plans: Sequence[Plan]) -> None:
    """Check every rank planned the same outputs (a collective); one error on every rank if not."""
    inputs = [ck.origin for ck in plans[0].checkpoints]
    found = group.gather((_digest(plans), inputs))
    for rank, (digest, seen) in enumerate(found):
        if digest == found[0][0]:
            continue
        if seen != found[0][1]:
            raise MismatchError(
                f"{group.who(rank)} sees {plural(len(seen), 'checkpoint')} ({name_list(seen)}), rank 0 "
                f"{plural(len(found[0][1]), 'checkpoint')} ({name_list(found[0][1])}): every rank must see "
                "the same inputs"
            )
        raise MismatchError(
            f"{group.who(rank)} plans another output than rank 0 (its inputs' tensors, dtypes or steps "
            "differ): every rank must see the same inputs"
        )


def _digest(plans: Sequence[Plan]) -> str:
    """What must be the same on every rank: the weights, tensors, files and metadata of each output."""
    described = [
        [
            plan.weights,
            plan.accum_dtype,
            plan.nonfinite,
            [(t.name, t.shape, t.dtype, t.averaged, t.same_as) for t in plan.tensors],
            [(f.name, [t.name for t in f.tensors]) for f in plan.files],
            plan.metadata(),
            plan.folder,
            plan.torch_output,
            [p.name for p in plan.extra_files],
        ]
        for plan in plans
    ]
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()


def describe(plan: Plan, group: Group) -> list[str]:
    """What each rank will read and write (the dry run's lines under torchrun)."""
    return describe_shares(plan, _shares(plan, group), group.hosts)


def _shares(plan: Plan, group: Group) -> list[Share]:
    return shares(plan, spans(plan), group.world)


def _write(plans: list[Plan], group: Group, *, device: str, progress: bool) -> list[str]:
    """Write this rank's share of the plans' outputs; every rank's warnings found while summing."""
    first = plans[0]
    if first.layout.like_last is not None:
        raise OutputError(
            f"{first.output}: an output like the last input (`like_last`, .ckpt, .pth.tar) is written by "
            "one process; run it without torchrun, or write a .safetensors, .pt or folder output"
        )
    share = _shares(first, group)[group.rank]
    metadata = [plan.metadata() for plan in plans]
    with ExitStack() as stack:
        error, opened, made = None, [], None
        if group.rank == 0:
            try:
                opened, made = _open_outputs(plans, metadata, stack)
            except Exception as e:
                error = e
        made = group.check(error, made)[0]
        committed = [False]
        if group.rank != 0:
            stack.callback(lambda: committed[0] or _remove(plans, made))
        writers = group.together(lambda: _attach(plans, made, metadata, share, stack))
        error, found = None, []
        try:
            found = _sum(plans, share, writers, group, device=device, progress=progress)
        except Exception as e:
            error = e
        outcomes = group.check(error, (found, _pieces(writers)))
        warnings = list(dict.fromkeys(w for ws, _ in outcomes for w in ws))
        by_plan = list(zip(*(pieces for _, pieces in outcomes), strict=True))  # each output's, by rank
        error = None
        if group.rank == 0:
            try:
                for plan, (output, streamed), meta, pieces in zip(
                    plans, opened, metadata, by_plan, strict=True
                ):
                    if plan.layout.dcp:
                        _complete_dcp(plan, output, meta, pieces)
                    finish_output(plan, output, streamed, meta)
            except Exception as e:
                error = e
        group.check(error)
        committed[0] = True
    return warnings


def _open_outputs(plans: list[Plan], metadata: list[dict], stack: ExitStack):
    """Rank 0: each output's transaction, and its files created whole; where they are, relative to
    each output's folder, and the temporaries to remove if the run fails."""
    opened, made = [], []
    for plan, meta in zip(plans, metadata, strict=True):
        ensure_free_space(plan.output, space_needed(plan))
        output = stack.enter_context(OutputTransaction(plan.output, folder=plan.folder, force=plan.force))
        streamed = output.scratch_path(".safetensors") if plan.torch_output else None
        files = {}
        for file in plan.files:
            path = streamed or output.path_of(file.name)
            make = dcp_shared.create if plan.layout.dcp else create
            make(path, [t.entry for t in file.tensors], meta, _label(plan, file.name))
            files[file.name] = os.path.relpath(path, plan.output.parent)
        temporaries = [output.path_of("")] if plan.folder else [output.path_of(plan.output.name)]
        temporaries += [streamed] if streamed is not None else []
        opened.append((output, streamed))
        made.append(
            {"files": files, "temporaries": [os.path.relpath(p, plan.output.parent) for p in temporaries]}
        )
    return opened, made


def _attach(plans: list[Plan], made: list[dict], metadata: list[dict], share: Share, stack: ExitStack):
    """This rank's writers into the files rank 0 made, found where this rank sees the output."""
    writers = []
    for plan, files, meta in zip(plans, made, metadata, strict=True):
        by_name = {}
        for i, file in enumerate(plan.files):
            path = plan.output.parent / files["files"][file.name]
            expected = share.writes.get(i, 0)
            if (expected or i == 0) and not wait_until_seen(path):
                raise OutputError(
                    f"{path}: not there, though rank 0 created it: every rank must see the output "
                    f"(`output={plan.output}`) on a file system they share"
                )
            if expected:
                entries = [t.entry for t in file.tensors]
                kind = dcp_shared.SharedDcpWriter if plan.layout.dcp else SharedWriter
                writer = kind(path, entries, meta, _label(plan, file.name), expected)
                stack.callback(writer.abort)
                by_name.update((t.name, writer) for t in file.tensors)
        writers.append(by_name)
    return writers


def _sum(plans: list[Plan], share: Share, writers: list[dict], group: Group, *, device: str, progress: bool):
    """Sum this rank's share into its writers, then flush them; the warnings found while summing."""
    from tqdm.auto import tqdm

    from .engine import Engine, beside_a_writer_thread, resolve_device
    from .pipeline import WriteQueue

    first = plans[0]
    bar = tqdm(
        total=first.bytes_to_read,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc=first.schedule.method,
        disable=not (progress and group.rank == 0),
        leave=False,
    )

    def on_read(nbytes: int) -> None:
        total = group.tick(nbytes)
        if total is not None:
            bar.update(total - bar.n)

    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        import torch

        resolved = torch.device("cuda", group.local_rank)  # one GPU per rank on a node
    engine = Engine(plans, resolved, on_read=on_read)
    files = list({id(w): w for by_name in writers for w in by_name.values()}.values())
    with bar, WriteQueue() as queue, beside_a_writer_thread():
        for span, parts in engine.stream(share.spans):
            interrupts.check()
            targets = first.targets(span.tensors[0])
            for by_name, (start, chunk, release) in zip(writers, parts, strict=True):
                for i, name in enumerate(targets):
                    last = i == len(targets) - 1
                    queue.submit(by_name[name].write, name, start, chunk, release=release if last else None)
        for file in files:
            queue.submit(file.finish)
        queue.drain()
    for checkpoint in first.checkpoints:
        checkpoint.check_unchanged()
    return engine.warnings


def _pieces(writers: list[dict]) -> list[dcp_shared.Pieces]:
    """Each output's CRC-32s of the pieces this rank wrote, by tensor (DCP outputs; others have none)."""
    found = []
    for by_name in writers:
        pieces: dcp_shared.Pieces = {}
        for writer in {id(w): w for w in by_name.values()}.values():
            if isinstance(writer, dcp_shared.SharedDcpWriter):
                pieces.update(writer.pieces)
        found.append(pieces)
    return found


def _complete_dcp(
    plan: Plan, output: OutputTransaction, metadata: dict, pieces: Sequence[dcp_shared.Pieces]
) -> None:
    """Rank 0: the DCP output's archives completed from every rank's pieces, then its `.metadata`."""
    for file in plan.files:
        entries = [t.entry for t in file.tensors]
        label = _label(plan, file.name)
        dcp_shared.complete(output.path_of(file.name), entries, metadata, plan.layout.dcp_key, label, pieces)


def _label(plan: Plan, name: str) -> Path:
    """An output file's name in messages: the output's, not its temporary one."""
    return plan.output / name if plan.folder else plan.output


def _remove(plans: list[Plan], made: list[dict]) -> None:
    """Remove the temporaries rank 0 made (it removes them too, unless it is the rank that died)."""
    for plan, files in zip(plans, made, strict=True):
        for name in files["temporaries"]:
            path = plan.output.parent / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
