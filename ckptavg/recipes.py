"""The library's calls for the recipes that are more than a weight schedule: EDM2's post-hoc EMA
from EMA snapshots (`post_hoc_ema`, weights solved from the snapshots' profiles) and model soups
(`soup`, ingredients kept by an evaluation). Each is one call that returns what was done, like
those of `api`; the command line's `phema` and `soup` are one of them each."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .api import open_checkpoints, output_names
from .errors import OptionsError
from .inputs.hub_options import HubOptions
from .options import OutputOptions, ReadOptions
from .plan.plan import Plan, build_plan
from .run import distributed
from .run.executor import execute
from .soups.options import SoupOptions

if TYPE_CHECKING:
    from .bn.data import DataOptions
    from .soups.cook import Row


def post_hoc_ema(
    inputs: Sequence[str | os.PathLike],
    sigma_rel: float | Sequence[float],
    *,
    snapshot_sigma_rel: Sequence[float] | None = None,
    at_step: int | None = None,
    read: ReadOptions | None = None,
    output: OutputOptions | None = None,
    hub: HubOptions | None = None,
    dry_run: bool = False,
    progress: bool = False,
    on_plans: Callable[[list[Plan]], None] | None = None,
) -> list[Plan]:
    """EDM2's post-hoc EMA (Karras et al. 2024): the EMA of profile `sigma_rel`, synthesized from EMA
    snapshots by the paper's least-squares solve; one output per `sigma_rel`, from one read.

    Each snapshot's profile comes from `snapshot_sigma_rel` (one value per profile, assigned by name:
    ema-pytorch's `{profile_index}.{step}.pt`, or the value in the name), else its metadata
    (`sigma_rel`, `gamma`); its step from `output.steps`, a stored step, or its name. Only the
    snapshots at or before `at_step` (default: the last snapshot's) are used. The plans' parameters
    hold the fit's residual, and their warnings say when a target is poorly represented.

    Raises:
        OptionsError: no output, or options that would leave a snapshot out or run under torchrun.
        InputError: EDM2 `.pkl` snapshots (pickled code), or an unreadable input.
        ScheduleError: a snapshot's step or profile is unknown, or the solve is singular.
    """
    from .phema.schedule import PostHocEma
    from .phema.snapshots import at_step as snapshots_until
    from .phema.snapshots import read_snapshots, refuse_pickles, unused_profiles

    read, output = read or ReadOptions(), output or OutputOptions()
    if output.output is None and not dry_run:
        raise OptionsError("give an output with `output=PATH` (or check the inputs with `dry_run=True`)")
    if distributed.launched():
        raise OptionsError("phema runs in one process: run it without torchrun")
    if output.nonfinite == "skip-checkpoint":
        raise OptionsError(
            "`nonfinite=skip-checkpoint` cannot leave a snapshot out of a post-hoc EMA (the weights are "
            "solved for all of them); use `nonfinite=error` or `nonfinite=warn`"
        )
    targets = [float(sigma_rel)] if isinstance(sigma_rel, (int, float)) else [float(x) for x in sigma_rel]
    refuse_pickles(inputs)
    with open_checkpoints(inputs, read, hub=hub, fetch=not dry_run) as checkpoints:
        snapshots = read_snapshots(checkpoints, snapshot_sigma_rel, output.steps)
        kept, target, notes = snapshots_until(snapshots, at_step)
        profiles = tuple(s.profile for s in kept)
        schedules = [PostHocEma(x, profiles, target) for x in targets]
        options = replace(output, steps=tuple(p.step for p in profiles))
        plans = [
            replace(
                plan,
                step_sources=[s.step_source for s in kept],
                selected=notes,
                warnings=[*unused_profiles(snapshots, snapshot_sigma_rel), *plan.warnings],
            )
            for plan in (
                build_plan([s.checkpoint for s in kept], schedule, options, output=name)
                for schedule, name in zip(schedules, output_names(output.output, schedules), strict=True)
            )
        ]
        if on_plans is not None:
            on_plans(plans)
        return plans if dry_run else execute(plans, device=output.device, progress=progress)


def soup(
    inputs: Sequence[str | os.PathLike],
    options: SoupOptions | None = None,
    *,
    model: str | None = None,
    model_kwargs: dict | None = None,
    bn_data: DataOptions | None = None,
    read: ReadOptions | None = None,
    output: OutputOptions | None = None,
    hub: HubOptions | None = None,
    dry_run: bool = False,
    progress: bool = False,
    on_plan: Callable[[Plan, list[str]], None] | None = None,
    on_row: Callable[[Row], None] | None = None,
    **settings,
) -> Plan:
    """A model soup (Wortsman et al. 2022) of fine-tuned ingredients: uniform, or greedy.

    `options` (or its fields as keywords: `greedy`, `eval`, `mode`, `scores`; see `SoupOptions`) says
    which. With `eval`, the model `model` builds (`package.module:callable`, `timm:NAME`, with
    `model_kwargs`) is loaded with each candidate's weights and scored; the greedy soup adds each
    ingredient, best first, only if the score does not get worse. `bn_data` recomputes the
    BatchNorm statistics before each evaluation and of the final soup. `on_plan` sees the plan and
    lines about the model before any evaluation, `on_row` each row of the table as it is decided.
    The soup is written through the atomic writer; its metadata records the table.

    Raises:
        OptionsError: a greedy soup without `eval`, `eval` or `bn_data` without `model`, no output.
        EvalError: the `eval` callable failed or returned something else than a number.
    """
    import json

    from .bn.imports import build_model, resolve_callable
    from .bn.statistics import BatchNormPass, average_then_recompute_statistics, check_fit, update_in_place
    from .soups.cook import cook, memory_bytes
    from .soups.options import SoupSchedule
    from .soups.scores import read_scores
    from .units import format_bytes

    options = replace(options or SoupOptions(), **settings)
    read, output = read or ReadOptions(), output or OutputOptions()
    if output.output is None and not dry_run:
        raise OptionsError("give an output with `output=PATH` (or check the inputs with `dry_run=True`)")
    if options.greedy and options.eval is None:
        raise OptionsError("a greedy soup needs a score: give `eval=package.module:callable`")
    if (options.eval is not None or bn_data is not None) and model is None:
        raise OptionsError(
            "scoring a soup needs the architecture: give `model`, e.g. timm:vit_small_patch16_224"
        )
    if distributed.launched():
        raise OptionsError("soup runs in one process: run it without torchrun")
    bn = None
    if bn_data is not None:
        bn = BatchNormPass(
            model=model, data=bn_data, model_kwargs=dict(model_kwargs or {}), device=output.device
        )
    with open_checkpoints(inputs, read, hub=hub, fetch=not dry_run) as checkpoints:
        lines: list[str] = []
        net = None
        if options.eval is not None:
            from .run.engine import resolve_device

            evaluate = options.eval if callable(options.eval) else resolve_callable(options.eval, "eval")
            net = build_model(model, dict(model_kwargs or {}))
            check_fit(net, checkpoints[0], model)
            net.to(resolve_device(output.device))
            model_bytes, sum_bytes = memory_bytes(net)
            lines.append(
                f"model:      {model}: {format_bytes(model_bytes)} in memory, + {format_bytes(sum_bytes)} of "
                "running sums (float64) while the soup is made; evaluated by "
                f"{options.eval_name} ({options.mode})"
            )
            if options.greedy:
                lines.append("greedy:     the weights above if every ingredient is kept; the table decides")
        kept = list(range(len(checkpoints)))

        def planned(chosen: list[int], rows: list | None) -> Plan:
            schedule = SoupSchedule(options.greedy, options.mode, options.eval_name, len(checkpoints))
            plan = build_plan([checkpoints[i] for i in chosen], schedule, output)
            if rows is None:
                return plan
            record = json.dumps([row.record() for row in rows])
            return replace(plan, provenance={**plan.metadata(), "ckptavg.soup": record})

        if on_plan is not None:
            on_plan(planned(kept, None), lines)
        if dry_run:
            return planned(kept, None)
        rows = None
        if net is not None:
            given = read_scores(options.scores, checkpoints) if options.scores is not None else {}
            kept, rows = cook(
                checkpoints,
                net,
                evaluate,
                greedy=options.greedy,
                mode=options.mode,
                given=given,
                before_eval=(lambda: update_in_place(net, bn)) if bn is not None else None,
                on_row=on_row,
                eval_name=options.eval_name,
            )
            del net
        plan = planned(kept, rows)
        if bn is None:
            (done,) = execute([plan], device=output.device, progress=progress)
            return done
        return average_then_recompute_statistics(plan, bn, device=output.device, progress=progress)
