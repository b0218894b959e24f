"""The averaging commands, `swa`, `ema`, `avg` and `anneal`: a schedule from the method's flags, then one
library call (`api.average_many`), its plans reported before the run and its outputs after."""

from __future__ import annotations

import functools
import sys

import click

from ..adapters.options import LoraOptions
from ..bn.data import DataOptions
from ..bn.statistics import BatchNormPass
from ..inputs.hub_options import HubOptions
from ..inputs.selection import Selection
from ..options import OutputOptions, ReadOptions
from ..run import distributed
from .flags import (
    CONTEXT,
    GroupedCommand,
    GroupedOption,
    apply,
    bn_pass,
    flags,
    parser,
    report_pass,
    reports_errors,
    run_flags,
    say,
    take,
)


def _averaging_flags(command):
    """The flags every averaging command takes; each has the name of its Python argument."""
    return apply(
        [
            click.argument("inputs", nargs=-1, required=True, metavar="INPUTS..."),
            *flags(LoraOptions),
            *flags(ReadOptions),
            *flags(Selection),
            *flags(OutputOptions),
            *flags(BatchNormPass),
            *flags(DataOptions, rename={"data": "bn_data"}, help={"data": _BN_DATA_HELP}),
            *flags(HubOptions),
            *run_flags("Check the inputs and print the plan; write nothing."),
        ],
        command,
    )


_BN_DATA_HELP = (
    "Data for a BatchNorm pass over the average before it is written: an image folder, a tensor file "
    "(.safetensors, .pt, .npy) or package.module:callable returning batches."
)


def _method(*names, **kwargs):
    return click.option(*names, cls=GroupedOption, group="Method", **kwargs)


@click.command(cls=GroupedCommand, context_settings=CONTEXT)
@_averaging_flags
@reports_errors
def swa(**values):
    """Equal-weight average (SWA, uniform soup), as torch's AveragedModel computes it.

    Floating tensors are averaged in float32; integer and bool tensors (such as
    BatchNorm's num_batches_tracked) are copied from the last checkpoint.

    \b
    ckptavg swa 'ckpts/*.safetensors' -o swa.safetensors
    ckptavg swa run/step_*/ -o swa/ --max-shard-size 5GB
    ckptavg swa 'ckpts/*.pth' --key model_ema --strip-prefix module. -o swa.pt
    """
    from ..schedules import swa as schedule

    _average([schedule()], values)


@click.command(cls=GroupedCommand, context_settings=CONTEXT)
@_method(
    "--decay",
    type=float,
    help="Weight kept by the running average per checkpoint (per step with --per-step).",
)
@_method(
    "--per-step",
    is_flag=True,
    help="The decay is per training step: each checkpoint weighs the steps since the one before.",
)
@_method(
    "--half-life", type=float, metavar="STEPS", help="Instead of --decay: the half-life in training steps."
)
@_method(
    "--bias-correction",
    is_flag=True,
    help="Start from zeros and divide by 1 - decay^N (as Adam and optax), not from the first checkpoint.",
)
@_method(
    "--sigma-rel",
    type=float,
    multiple=True,
    metavar="X",
    help="Post-hoc power EMA of this relative width, e.g. 0.05 (repeatable: several outputs, one "
    "read; put {sigma_rel} in -o).",
)
@_method("--gamma", type=float, multiple=True, metavar="G", help="Post-hoc power EMA by its exponent.")
@_averaging_flags
@reports_errors
def ema(decay, per_step, half_life, bias_correction, sigma_rel, gamma, **values):
    """Exponential moving average: torch's per-checkpoint EMA, per-step EMA, or post-hoc power EMA.

    \b
    Per checkpoint (--decay): the first checkpoint is the starting value, then
    each later one applies avg = decay * avg + (1 - decay) * x, as torchvision's
    reference EMA does. The decay applies once per checkpoint: --decay 0.999
    over 10 checkpoints leaves 99.1% of the weight on the first one, and the
    plan warns about such weights.

    \b
    Per step (--per-step with --decay, or --half-life): the decay applies once
    per training step, and each checkpoint stands for the steps since the one
    before (weights taken as constant between saves), so the result equals
    torch's per-step EMA when every step is saved and does not depend on how
    often checkpoints were saved otherwise. Needs each checkpoint's step.

    \b
    Post-hoc power EMA (--sigma-rel or --gamma; Karras et al. 2024): the
    profile p(t) ~ t^gamma at the last step, integrated over each checkpoint's
    steps; sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3))), below 0.289. Several
    values write several outputs from one read of the inputs.

    \b
    ckptavg ema --decay 0.9 'ckpts/*.safetensors' -o ema.safetensors
    ckptavg ema --half-life 5000 'run/step_*.safetensors' -o ema.safetensors
    ckptavg ema --sigma-rel 0.05 --sigma-rel 0.1 'run/step_*' -o 'ema_{sigma_rel}.safetensors'
    """
    from .. import schedules

    power = [schedules.power_ema(sigma_rel=x) for x in sigma_rel] + [
        schedules.power_ema(gamma=g) for g in gamma
    ]
    if power and (decay is not None or half_life is not None):
        raise click.UsageError("give either --decay/--half-life or --sigma-rel/--gamma")
    if not power and decay is None and half_life is None:
        raise click.UsageError("give --decay (or --half-life, --sigma-rel, --gamma)")
    schedule = power or [
        schedules.ema(decay, half_life=half_life, per_step=per_step, bias_correction=bias_correction)
    ]
    _average(schedule, values)


@click.command(cls=GroupedCommand, context_settings=CONTEXT)
@_method(
    "--weights",
    required=True,
    callback=parser("floats"),
    metavar="W1,W2,...",
    help="One weight per checkpoint, in averaging order; normalized to sum to 1.",
)
@_averaging_flags
@reports_errors
def avg(weights, **values):
    """Weighted average with explicit weights, normalized to sum to 1.

    The weights follow the averaging order (natural order unless --keep-order),
    which the plan prints next to each weight.

    \b
    ckptavg avg --weights 0.2,0.3,0.5 a.safetensors b.safetensors c.safetensors -o mix.safetensors
    ckptavg avg --weights 1,3 --keep-order best.safetensors last.safetensors -o mix.safetensors
    """
    from ..schedules import weighted

    _average([weighted(weights)], values)


@click.command(cls=GroupedCommand, context_settings=CONTEXT)
@_method(
    "--shape",
    required=True,
    metavar="SHAPE",
    help="The decay the merge stands for: linear, cosine, 1-sqrt or exp:RATE (e^(-RATE x)).",
)
@_method(
    "--final-lr-ratio",
    type=float,
    default=0.0,
    show_default=True,
    metavar="R",
    help="The learning rate at the end of the decay, as a fraction of the constant one.",
)
@_averaging_flags
@reports_errors
def anneal(shape, final_lr_ratio, **values):
    """The merge that stands in for a learning-rate decay (WSM, Tian et al. 2025).

    \b
    Checkpoints of a constant-learning-rate phase, merged with weights such that
    every update between two checkpoints counts with the decayed rate's mean over
    those steps: f(x) = R + (1 - R) h(x), x from 0 at the first checkpoint's step
    to 1 at the last's. With every step saved this is exactly SGD with the decay;
    otherwise the run whose rate is held at that mean between checkpoints. Needs
    each checkpoint's step (stored, from names, or --steps). --dry-run shows the
    weights and the decay they stand for.

    \b
    ckptavg anneal --shape 1-sqrt 'ckpt/step-*' --from-step 80000 -o merged/
    ckptavg anneal --shape linear --last 8 run/ -o merged.safetensors
    ckptavg anneal --shape cosine --final-lr-ratio 0.1 'ckpt/step-*' -o merged.safetensors
    """
    from ..schedules import anneal as schedule

    _average([schedule(shape, final_lr_ratio=final_lr_ratio)], values)


@click.command(cls=GroupedCommand, context_settings=CONTEXT)
@_method(
    "--sigma-rel",
    type=float,
    multiple=True,
    required=True,
    metavar="X",
    help="The EMA profile to synthesize, e.g. 0.10 (repeatable: several outputs, one read; put "
    "{sigma_rel} in -o).",
)
@_method(
    "--snapshot-sigma-rel",
    "snapshot_sigma_rel",
    callback=parser("floats"),
    metavar="X1,X2,...",
    help="The snapshots' profiles, one per profile in the order of ema-pytorch's {profile_index} "
    "names (or spelled in the names) [default: sigma_rel or gamma in each snapshot's metadata].",
)
@_method(
    "--at-step",
    type=int,
    metavar="STEP",
    help="The EMA as of this step, from the snapshots at or before it [default: the last snapshot's].",
)
@functools.partial(
    apply,
    [
        click.argument("inputs", nargs=-1, required=True, metavar="SNAPSHOTS..."),
        *flags(ReadOptions),
        *flags(OutputOptions),
        *flags(HubOptions),
        *run_flags("Check the snapshots, solve the weights and print the plan; write nothing."),
    ],
)
@reports_errors
def phema(sigma_rel, snapshot_sigma_rel, at_step, inputs, dry_run, quiet, **values):
    """Post-hoc EMA from EMA snapshots (EDM2, Karras et al. 2024): any sigma_rel after training.

    \b
    Training keeps two or more power-function EMAs (ema-pytorch's PostHocEMA, EDM2)
    and saves snapshots of them; this solves the paper's least-squares problem over
    the snapshots' profiles (in closed form, float64) for the EMA of another
    sigma_rel, normalizes the weights to sum to 1 as EDM2 does, and averages the
    snapshots with them. Weights may be negative. The plan shows the weights and
    the fit's residual (0: the target profile is represented exactly) and warns
    when a target lies outside what the snapshots represent well.

    \b
    Each snapshot needs its step and profile: from ema-pytorch's names
    ({profile_index}.{step}.pt) with --snapshot-sigma-rel, names holding the value,
    or sigma_rel/gamma and step in the metadata. EDM2's .pkl snapshots are pickled
    code and refused: save each one's state dict first.

    \b
    ckptavg phema --sigma-rel 0.10 --sigma-rel 0.15 'snapshots/*.pt' \\
        --snapshot-sigma-rel 0.05,0.28 -o 'phema_{sigma_rel}.safetensors'
    ckptavg phema --sigma-rel 0.10 --at-step 400000 'snapshots/*.pt' --snapshot-sigma-rel 0.05,0.28 -o ema.pt
    """
    from ..recipes import post_hoc_ema

    progress = not quiet and sys.stderr.isatty()
    shown: list[str] = []

    def report(plans) -> None:
        if not quiet or dry_run:
            for i, plan in enumerate(plans):
                residual = plan.schedule.solution.residual
                fit = f"fit:        residual {residual:.2%} of the target profile (0: exact)"
                say(*([""] if i else []), *plan.describe(), fit)
        shown.extend(w for plan in plans for w in plan.warnings)
        for warning in shown:
            say(f"warning: {warning}", err=True)

    plans = post_hoc_ema(
        inputs,
        sigma_rel,
        snapshot_sigma_rel=snapshot_sigma_rel,
        at_step=at_step,
        read=take(ReadOptions, values),
        output=take(OutputOptions, values),
        hub=take(HubOptions, values, progress=progress),
        dry_run=dry_run,
        progress=progress,
        on_plans=report,
    )
    _report_written(plans, dry_run, quiet, len(shown))


def _report_written(plans, dry_run: bool, quiet: bool, shown: int) -> None:
    """After the run: warnings found while averaging, then each output written."""
    if dry_run:
        say("dry run: nothing written")
        return
    for warning in [w for plan in plans for w in plan.warnings][shown:]:
        say(f"warning: {warning}", err=True)
    if not quiet:
        for plan in plans:
            say(_written(plan))


def _average(schedules, values: dict) -> None:
    """One library call (`average_many`), reporting the plans before the run and the outputs after."""
    from ..api import average_many
    from ..bn.statistics import describe_pass

    inputs, dry_run, quiet = values.pop("inputs"), values.pop("dry_run"), values.pop("quiet")
    progress = not quiet and sys.stderr.isatty() and distributed.speaks()
    output = take(OutputOptions, values)
    bn = bn_pass(values, output.device, data_flag="bn_data")
    shown: list[str] = []

    def report(plans) -> None:
        if not quiet or dry_run:
            for i, plan in enumerate(plans):
                say(*([""] if i else []), *plan.describe())
            group = distributed.current()
            if group is not None:
                from ..run.parallel import describe

                say(*describe(plans[0], group))
            if bn is not None:
                say(describe_pass(bn))
        shown.extend(plans[0].warnings)
        for warning in shown:
            say(f"warning: {warning}", err=True)

    plans = average_many(
        inputs,
        schedules,
        read=take(ReadOptions, values),
        output=output,
        selection=take(Selection, values),
        hub=take(HubOptions, values, progress=progress),
        bn=bn,
        lora=take(LoraOptions, values),
        dry_run=dry_run,
        progress=progress,
        on_plans=report,
    )
    if dry_run:
        say("dry run: nothing written")
        return
    for warning in plans[0].warnings[len(shown) :]:  # found while averaging (non-finite values)
        say(f"warning: {warning}", err=True)
    if not quiet:
        if bn is not None:
            report_pass(plans[0])
        for plan in plans:
            say(_written(plan))


def _written(plan) -> str:
    """`wrote PATH (SIZE, N tensors)`: a local file's size on disk (a torch file like the last input
    holds more than the averages), else the bytes of the tensors written."""
    from ..units import format_bytes

    local_file = not plan.folder and plan.layout.remote is None and plan.output.is_file()
    size = plan.output.stat().st_size if local_file else plan.output_nbytes
    return (
        f"wrote {plan.output}{'/' if plan.folder else ''} ({format_bytes(size)}, {len(plan.tensors)} tensors)"
    )
