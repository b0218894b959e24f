"""The `ckptavg` command line: parse options, call the library, report in one line.

Only this module imports click. Heavy imports (torch) happen inside commands,
so `ckptavg --help` and `--version` answer at once.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import sys

import click

from . import __version__
from .errors import CkptavgError, printable
from .run import interrupts, supervision

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _say(*lines: str, err: bool = False) -> None:
    """Print lines with whatever a name could smuggle in (newlines, escape sequences) escaped."""
    click.echo("\n".join(printable(line) for line in lines), err=err)


def _reports_errors(command):
    """One line on stderr and a non-zero exit instead of a traceback (unless --debug)."""

    @functools.wraps(command)
    def wrapper(*args, debug: bool, **kwargs):
        try:
            with interrupts.honoured():
                result = command(*args, **kwargs)
                interrupts.check()  # a signal whose exception a library swallowed
                return result
        except click.ClickException:
            raise  # usage errors: click prints them with the command's usage line
        except CkptavgError as e:
            if debug:
                raise
            _say(f"error: {e}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt as e:
            if debug:
                raise
            _report_interrupt(e)
        except BrokenPipeError:  # the reader left (ckptavg inspect | head): stop quietly, as on SIGPIPE
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_ERROR)
        except Exception as e:
            if debug:
                raise
            _say(
                f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True
            )
            sys.exit(EXIT_ERROR)

    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)


_hub_options = [
    click.option(
        "--token", metavar="TOKEN", help="Hub access token [default: HF_TOKEN, or hf auth login's]."
    ),
    click.option(
        "--cache-dir", metavar="DIR", help="Hub cache folder [default: HF_HUB_CACHE, or HF_HOME/hub]."
    ),
    click.option(
        "--offline",
        is_flag=True,
        default=None,
        help="Use only the Hub cache, no network (also HF_HUB_OFFLINE=1).",
    ),
]


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


def _json_object(ctx, param, value):
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"{value!r} is not a JSON object such as '{{\"num_classes\": 10}}'")
    return parsed


def _bn_options(data_flag: str, required: bool):
    """The BatchNorm pass's options; `data_flag` is --data (bn-update) or --bn-data (averaging)."""
    data_help = (
        "Data for the BatchNorm pass: an image folder (class subfolders or flat), a tensor file "
        "(.safetensors, .pt, .npy) or package.module:callable returning batches."
    )
    if not required:
        data_help += " Recomputes the BatchNorm statistics of the average before writing it."
    options = [
        click.option(
            "--model",
            "model",
            metavar="SPEC",
            help="The architecture, built with random weights: package.module:callable, "
            "torchvision:NAME or timm:NAME (imported and run: only give code you trust).",
        ),
        click.option(
            "--model-kwargs",
            default="{}",
            callback=_json_object,
            metavar="JSON",
            help="Keyword arguments for the model, e.g. '{\"num_classes\": 10}'.",
        ),
        click.option(data_flag, "bn_data", required=required, metavar="PATH|SPEC", help=data_help),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
        click.option(
            "--samples", type=click.IntRange(min=1), help="Use this many inputs, drawn with --seed."
        ),
        click.option("--max-batches", type=click.IntRange(min=1), help="Stop after this many batches."),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            default=2,
            show_default=True,
            help="Processes decoding images (0: decode in this process).",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing --samples."),
        click.option("--data-key", metavar="NAME", help="Tensor files: the tensor holding the inputs."),
        click.option("--image-size", type=click.IntRange(min=1), help="Center-crop size [default: 224]."),
        click.option(
            "--resize-size",
            type=click.IntRange(min=1),
            help="Resize the shorter side to this before cropping [default: image size / 0.875].",
        ),
        click.option(
            "--mean", callback=_floats, metavar="R,G,B", help="Normalization mean [default: ImageNet's]."
        ),
        click.option(
            "--std", callback=_floats, metavar="R,G,B", help="Normalization std [default: ImageNet's]."
        ),
        click.option(
            "--strict-data", is_flag=True, help="Fail on an unreadable image instead of skipping it."
        ),
        click.option("--amp", type=click.Choice(["bf16", "fp16"]), help="Run the pass under autocast (GPU)."),
        click.option("--channels-last", is_flag=True, help="Run the model in channels-last memory format."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _bn_pass(options: dict, device: str):
    """The BatchNormPass the bn options describe (removing them from `options`), or None without data."""
    from .bn.data import DataOptions
    from .bn.statistics import BatchNormPass

    names = (
        "model",
        "model_kwargs",
        "bn_data",
        "batch_size",
        "samples",
        "max_batches",
        "workers",
        "seed",
        "data_key",
        "image_size",
        "resize_size",
        "mean",
        "std",
        "strict_data",
        "amp",
        "channels_last",
    )
    values = {name: options.pop(name) for name in names}
    if values["bn_data"] is None:
        return None
    if values["model"] is None:
        raise click.UsageError(
            "the BatchNorm pass needs the architecture: add --model, e.g. torchvision:resnet50"
        )
    data = DataOptions(
        data=values["bn_data"],
        batch_size=values["batch_size"],
        samples=values["samples"],
        max_batches=values["max_batches"],
        workers=values["workers"],
        seed=values["seed"],
        data_key=values["data_key"],
        image_size=values["image_size"],
        resize_size=values["resize_size"],
        mean=values["mean"],
        std=values["std"],
        strict_data=values["strict_data"],
    )
    return BatchNormPass(
        model=values["model"],
        data=data,
        model_kwargs=values["model_kwargs"],
        device=device,
        amp=values["amp"],
        channels_last=values["channels_last"],
    )


def _report_pass(plan) -> None:
    """The pass's counts, from the record kept in the output's metadata; unreadable images as a warning."""
    from .bn.statistics import BN_KEY

    record = json.loads(plan.provenance[BN_KEY])
    _say(f"recomputed BatchNorm statistics over {record['samples']} inputs in {record['batches']} batches")
    if record["skipped"]:
        _say(
            f"warning: skipped {record['skipped']} unreadable images, e.g. {record['unreadable'][0]}",
            err=True,
        )


def _report_interrupt(interrupt: KeyboardInterrupt) -> None:
    """Say what an interrupt left (nothing, or the outputs already in place) and exit 130 or 143."""
    terminated = isinstance(interrupt, interrupts.Terminated)
    what = "terminated" if terminated else "interrupted"
    written = interrupts.committed()
    if written:
        _say(f"{what} after writing {', '.join(map(str, written))}", err=True)
    else:
        _say(f"{what}: nothing was written", err=True)
    sys.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)


def _hub_option_decorators(command):
    for option in reversed(_hub_options):
        command = option(command)
    return command


def _hub(token, cache_dir, offline, progress):
    from .inputs.hub import HubOptions

    return HubOptions(token=token, cache_dir=cache_dir, offline=offline, progress=progress)


def _averaging_options(command):
    """Options every averaging command shares; a flag and its Python argument share a name."""
    options = [
        click.argument("inputs", nargs=-1, required=True, metavar="INPUTS..."),
        click.option(
            "-o",
            "--output",
            "output",
            metavar="PATH",
            help="Output file (.safetensors, or .pt/.pth/.bin for torch.save), or a folder "
            "ending in '/' for Hugging Face shards.",
        ),
        click.option(
            "--key",
            metavar="NAME",
            help="Torch files: the dict holding the weights, e.g. state_dict_ema or model_ema "
            "(dotted for nesting) [default: a flat dict, else state_dict, model, ...].",
        ),
        click.option(
            "--strip-prefix",
            multiple=True,
            metavar="PREFIX",
            help="Remove this prefix from tensor names, e.g. module. (repeatable).",
        ),
        click.option(
            "--keep-order",
            is_flag=True,
            help="Average in the order given instead of natural order (step_2 before step_10).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "bfloat16", "float16"]),
            help="Output dtype of floating tensors [default: as in the first checkpoint].",
        ),
        click.option(
            "--accum-dtype",
            type=click.Choice(["float32", "float64"]),
            default="float32",
            show_default=True,
            help="Dtype the sums are computed in.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            metavar="auto|cpu|cuda|cuda:N",
            help="Where the sums are computed; auto picks CUDA when available.",
        ),
        click.option(
            "--max-shard-size",
            metavar="SIZE",
            help="Largest output file, e.g. 5GB; writes Hugging Face shards into a folder "
            "[default for a folder: 50GB].",
        ),
        click.option(
            "--wrap-key",
            metavar="NAME",
            help="Torch output: save {NAME: state_dict} instead of the plain state dict.",
        ),
        click.option(
            "--nonfinite",
            type=click.Choice(["error", "warn", "skip-checkpoint"]),
            default="error",
            show_default=True,
            help="A NaN or Inf in an input: stop, warn and keep it, or drop that checkpoint and "
            "average the others (checked during the sum, at no extra pass).",
        ),
        click.option("--force", is_flag=True, help="Replace an existing output."),
        click.option("--dry-run", is_flag=True, help="Check the inputs and print the plan; write nothing."),
        click.option("-q", "--quiet", is_flag=True, help="Print only warnings and errors."),
    ]
    for option in reversed(options):
        command = option(command)
    return _selection_options(_bn_options("--bn-data", required=False)(_hub_option_decorators(command)))


def _ints(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of whole numbers") from None


def _selection_options(command):
    """Steps and which checkpoints to average (see ckptavg.selection)."""
    options = [
        click.option(
            "--steps",
            callback=_ints,
            metavar="S1,S2,...",
            help="Training step of each checkpoint, in averaging order [default: stored in the "
            "checkpoint (global_step, step, epoch), else read from its name, e.g. step_1000].",
        ),
        click.option(
            "--last", type=int, metavar="K", help="Average only the K latest checkpoints by step (LAWA)."
        ),
        click.option(
            "--every", type=int, metavar="K", help="Keep every K-th checkpoint, counted back from the last."
        ),
        click.option("--from-step", type=int, metavar="A", help="Keep checkpoints from step A on."),
        click.option("--to-step", type=int, metavar="B", help="Keep checkpoints up to step B."),
        click.option("--best", type=int, metavar="K", help="Keep the K best checkpoints by --metric."),
        click.option(
            "--metric",
            metavar="NAME",
            help="Scalar for --best, stored in torch checkpoints (metric, best_acc1, ...) or --metrics.",
        ),
        click.option(
            "--mode",
            type=click.Choice(["max", "min"]),
            default="max",
            show_default=True,
            help="Whether a larger or a smaller --metric is better.",
        ),
        click.option(
            "--metrics",
            type=click.Path(dir_okay=False),
            metavar="FILE",
            help="JSON or CSV of metrics per checkpoint, with a 'step' or 'checkpoint' column.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run() -> None:
    """The `ckptavg` console script: `main`, then leave without the interpreter's teardown.

    Tearing down the modules after `import torch` takes about 0.3 s, a sixth of a
    small run, and does nothing a finished command needs: its output is already
    fsynced and renamed. The exit handlers libraries registered (workers to stop,
    logs to flush) still run, and the standard streams are flushed. A traceback
    (--debug) exits the usual way.

    Signals are honoured from here on (see `interrupts`), and the work runs under a
    supervising parent (see `supervision`), so even a crash ends in one line.
    """
    try:
        with interrupts.honoured():
            code = supervision.run_supervised(_main)
    except KeyboardInterrupt as e:  # before the command started
        try:
            _report_interrupt(e)
        except SystemExit as exit:
            code = exit.code
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (ckptavg inspect | head)
            stream.flush()
    os._exit(code)


def _main() -> int:
    """`main` as an exit code, with the exit handlers libraries registered run."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = EXIT_ERROR
    atexit._run_exitfuncs()
    return code or 0


@click.group(context_settings=_CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="ckptavg")
def main():
    """Average model checkpoints: EMA, SWA or explicit weights.

    Inputs are checkpoint files (.safetensors, .pt, .pth, .bin, .ckpt), Hugging Face
    model folders (model.safetensors, pytorch_model.bin, or shards with an index),
    runs of Trainer checkpoint-N folders, quoted glob patterns, or Hugging Face Hub
    paths hf://ORG/REPO[@REVISION][/PATH] (revisions and paths may be globs). They are
    averaged in natural order (step_2 before step_10), one tensor at a time, so
    memory stays flat whatever the model size. The output is written atomically:
    a failed or interrupted run leaves nothing behind. Torch files are loaded with
    weights_only=True: nothing in a checkpoint ever runs. The only code ckptavg
    imports on your behalf is what --model and --data name (bn-update, --bn-data).

    \b
    ckptavg swa 'ckpts/*.safetensors' -o swa.safetensors
    ckptavg ema --decay 0.9 'ckpts/*.safetensors' -o ema.safetensors --dry-run
    ckptavg swa 'hf://org/run@step14*' -o swa/
    ckptavg inspect ema.safetensors

    \b
    Environment: HF_TOKEN, HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE as huggingface_hub
    reads them; CKPTAVG_HUB_TIMEOUT, how many seconds a Hub request may wait or
    stall before the run stops (default 60).
    """


@main.command(context_settings=_CONTEXT)
@_averaging_options
@_reports_errors
def swa(**options):
    """Equal-weight average (SWA, uniform soup), as torch's AveragedModel computes it.

    Floating tensors are averaged in float32; integer and bool tensors (such as
    BatchNorm's num_batches_tracked) are copied from the last checkpoint.

    \b
    ckptavg swa 'ckpts/*.safetensors' -o swa.safetensors
    ckptavg swa run/step_*/ -o swa/ --max-shard-size 5GB
    ckptavg swa 'ckpts/*.pth' --key model_ema --strip-prefix module. -o swa.pt
    """
    from .schedules import swa as schedule

    _average([schedule()], **options)


@main.command(context_settings=_CONTEXT)
@click.option(
    "--decay",
    type=float,
    help="Weight kept by the running average per checkpoint (per step with --per-step).",
)
@click.option(
    "--per-step",
    is_flag=True,
    help="The decay is per training step: each checkpoint weighs the steps since the one before.",
)
@click.option(
    "--half-life", type=float, metavar="STEPS", help="Instead of --decay: the half-life in training steps."
)
@click.option(
    "--bias-correction",
    is_flag=True,
    help="Start from zeros and divide by 1 - decay^N (as Adam and optax), not from the first checkpoint.",
)
@click.option(
    "--sigma-rel",
    type=float,
    multiple=True,
    metavar="X",
    help="Post-hoc power EMA of this relative width, e.g. 0.05 (repeatable: several outputs, one "
    "read; put {sigma_rel} in -o).",
)
@click.option("--gamma", type=float, multiple=True, metavar="G", help="Post-hoc power EMA by its exponent.")
@_averaging_options
@_reports_errors
def ema(decay, per_step, half_life, bias_correction, sigma_rel, gamma, **options):
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
    from . import schedules

    power = [schedules.power_ema(sigma_rel=x) for x in sigma_rel] + [
        schedules.power_ema(gamma=g) for g in gamma
    ]
    if power and (decay is not None or half_life is not None):
        raise click.UsageError("give either --decay/--half-life or --sigma-rel/--gamma")
    if power:
        _average(power, **options)
    elif decay is None and half_life is None:
        raise click.UsageError("give --decay (or --half-life, --sigma-rel, --gamma)")
    else:
        _average(
            [schedules.ema(decay, half_life=half_life, per_step=per_step, bias_correction=bias_correction)],
            **options,
        )


@main.command(context_settings=_CONTEXT)
@click.option(
    "--weights",
    required=True,
    metavar="W1,W2,...",
    help="One weight per checkpoint, in averaging order; normalized to sum to 1.",
)
@_averaging_options
@_reports_errors
def avg(weights, **options):
    """Weighted average with explicit weights, normalized to sum to 1.

    The weights follow the averaging order (natural order unless --keep-order),
    which the plan prints next to each weight.

    \b
    ckptavg avg --weights 0.2,0.3,0.5 a.safetensors b.safetensors c.safetensors -o mix.safetensors
    ckptavg avg --weights 1,3 --keep-order best.safetensors last.safetensors -o mix.safetensors
    """
    from .schedules import weighted

    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{weights!r} is not a comma-separated list of numbers", param_hint="--weights"
        ) from None
    _average([weighted(values)], **options)


def _average(
    schedules,
    *,
    inputs,
    output,
    key,
    strip_prefix,
    keep_order,
    dtype,
    accum_dtype,
    device,
    max_shard_size,
    wrap_key,
    nonfinite,
    force,
    dry_run,
    quiet,
    token,
    cache_dir,
    offline,
    steps,
    last,
    every,
    from_step,
    to_step,
    best,
    metric,
    mode,
    metrics,
    **bn_options,
):
    from .api import open_checkpoints
    from .inputs.selection import Selection
    from .plan.plan import build_plan
    from .run.executor import execute

    bn = _bn_pass(bn_options, device)
    if output is None and not dry_run:
        raise click.UsageError("give an output with -o PATH (or check the inputs with --dry-run)")
    outputs = _outputs(output, schedules)
    if bn is not None and len(schedules) > 1:
        raise click.UsageError("--bn-data works with one output at a time; give one --sigma-rel")
    selection = Selection(
        last=last,
        every=every,
        from_step=from_step,
        to_step=to_step,
        best=best,
        metric=metric,
        mode=mode,
        metrics=metrics,
    )
    progress = not quiet and sys.stderr.isatty()
    hub = _hub(token, cache_dir, offline, progress)
    with open_checkpoints(
        inputs, keep_order=keep_order, key=key, strip_prefix=strip_prefix, hub=hub, fetch=not dry_run
    ) as checkpoints:
        plans = [
            build_plan(
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
            for schedule, out in zip(schedules, outputs, strict=True)
        ]
        if not quiet or dry_run:
            for i, plan in enumerate(plans):
                _say(*([""] if i else []), *plan.describe())
            if bn is not None:
                from .bn.statistics import describe_pass

                _say(describe_pass(bn))
        warnings = plans[0].warnings
        for warning in warnings:
            _say(f"warning: {warning}", err=True)
        if dry_run:
            _say("dry run: nothing written")
            return
        shown = len(warnings)
        if bn is None:
            plans = execute(plans, device=device, progress=progress)
        else:
            from .bn.statistics import average_then_recompute_statistics

            plans = [average_then_recompute_statistics(plans[0], bn, device=device, progress=progress)]
            if not quiet:
                _report_pass(plans[0])
        for warning in plans[0].warnings[shown:]:  # found while averaging (non-finite values)
            _say(f"warning: {warning}", err=True)
    if not quiet:
        from .units import format_bytes

        for plan in plans:
            _say(
                f"wrote {plan.output}{'/' if plan.folder else ''} ({format_bytes(plan.output_nbytes)}, "
                f"{len(plan.tensors)} tensors)"
            )


def _outputs(output: str | None, schedules) -> list[str | None]:
    """One output per schedule: `-o` as given, or formatted with each schedule's parameters."""
    if output is None or len(schedules) == 1:
        return [output] * len(schedules)
    try:
        outputs = [output.format(**schedule.params()) for schedule in schedules]
    except (KeyError, IndexError, ValueError):
        outputs = [output] * len(schedules)
    if len(set(outputs)) < len(outputs):
        raise click.UsageError(
            "several --sigma-rel/--gamma write several outputs: put {sigma_rel} (or {gamma}) "
            "in -o, e.g. -o 'ema_{sigma_rel}.safetensors'"
        )
    return outputs


@main.command("bn-update", context_settings=_CONTEXT)
@click.argument("checkpoint_spec", metavar="CHECKPOINT")
@click.option(
    "-o",
    "--output",
    "output",
    metavar="PATH",
    help="Output file (.safetensors, .pt/.pth/.bin) or folder ending in '/'.",
)
@click.option("--key", metavar="NAME", help="Torch files: the dict holding the weights.")
@click.option(
    "--strip-prefix",
    multiple=True,
    metavar="PREFIX",
    help="Remove this prefix from tensor names, e.g. module. (repeatable).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    metavar="auto|cpu|cuda|cuda:N",
    help="Where the model runs; auto picks CUDA when available.",
)
@click.option("--max-shard-size", metavar="SIZE", help="Largest output file, e.g. 5GB (folder outputs).")
@click.option("--wrap-key", metavar="NAME", help="Torch output: save {NAME: state_dict}.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option(
    "--dry-run", is_flag=True, help="Build the model, check the weights fit, open the data; no pass."
)
@click.option("-q", "--quiet", is_flag=True, help="Print only warnings and errors.")
@_bn_options("--data", required=True)
@_hub_option_decorators
@_reports_errors
def bn_update(
    checkpoint_spec,
    output,
    key,
    strip_prefix,
    device,
    max_shard_size,
    wrap_key,
    force,
    dry_run,
    quiet,
    token,
    cache_dir,
    offline,
    **bn_options,
):
    """Recompute the BatchNorm statistics of a checkpoint with one pass over data.

    Averaged weights do not match the running statistics averaged with them;
    this runs torch.optim.swa_utils.update_bn with the checkpoint's weights in
    the model given by --model, then writes every tensor unchanged except the
    BatchNorm running_mean, running_var and num_batches_tracked. The output's
    metadata keeps the checkpoint's (e.g. the averaging's) and records the pass.

    --model and --data callables are imported and run: they are the only code
    ckptavg ever imports on your behalf; checkpoints are never executed.

    \b
    ckptavg bn-update swa.safetensors --model torchvision:resnet50 \\
        --data imagenet/train --samples 10000 -o swa_bn.safetensors
    ckptavg bn-update swa.pt --model mypkg.nets:build --model-kwargs '{"width": 2}' \\
        --data batches.npy -o swa_bn.pt
    ckptavg swa 'ckpts/*.pt' --bn-data imagenet/train --model timm:resnet50 -o swa_bn.safetensors
    """
    from .api import open_checkpoints
    from .bn.statistics import check_pass, write_with_new_statistics

    bn = _bn_pass(bn_options, device)
    if output is None and not dry_run:
        raise click.UsageError("give an output with -o PATH (or check with --dry-run)")
    progress = not quiet and sys.stderr.isatty()
    hub = _hub(token, cache_dir, offline, progress)
    with open_checkpoints(
        [checkpoint_spec], key=key, strip_prefix=strip_prefix, hub=hub, fetch=not dry_run
    ) as checkpoints:
        if len(checkpoints) > 1:
            raise click.UsageError(f"{checkpoint_spec} holds {len(checkpoints)} checkpoints; give one")
        (checkpoint,) = checkpoints
        if dry_run:
            _say(f"bn-update of {checkpoint.label}", *check_pass(checkpoint, bn))
            _say("dry run: nothing written")
            return
        plan, _ = write_with_new_statistics(
            checkpoint,
            bn,
            output=output,
            provenance=checkpoint.metadata,
            force=force,
            max_shard_size=max_shard_size,
            wrap_key=wrap_key,
            progress=progress,
        )
    if not quiet:
        _report_pass(plan)
        _say(f"wrote {plan.output}{'/' if plan.folder else ''}")


@main.command(context_settings=_CONTEXT)
@click.argument("path", metavar="CHECKPOINT")
@click.option("--key", metavar="NAME", help="Torch files: the dict holding the weights.")
@click.option("--json", "as_json", is_flag=True, help="Print tensors and metadata as JSON.")
@click.option("--no-tensors", is_flag=True, help="Print totals and metadata only.")
@_hub_option_decorators
@_reports_errors
def inspect(path, key, as_json, no_tensors, token, cache_dir, offline):
    """Show a checkpoint's tensors (name, dtype, shape), totals and metadata.

    Reads headers only (torch files are mapped lazily; Hub safetensors files are read
    with range requests, not downloaded), so it is quick on any size. For a ckptavg
    output the metadata says the method, its parameters and each input with its weight.

    \b
    ckptavg inspect ema.safetensors
    ckptavg inspect swa/ --no-tensors
    ckptavg inspect hf://org/run@step1000
    """
    from .api import open_checkpoints
    from .units import format_bytes

    hub = _hub(token, cache_dir, offline, progress=sys.stderr.isatty())
    with open_checkpoints([path], key=key, hub=hub, fetch=False) as checkpoints:
        if len(checkpoints) > 1:
            raise click.UsageError(f"{path} holds {len(checkpoints)} checkpoints; inspect one of them")
        (ck,) = checkpoints
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "path": ck.origin,
                        "tensors": {
                            n: {"dtype": i.dtype, "shape": list(i.shape)} for n, i in ck.tensors.items()
                        },
                        "metadata": ck.metadata,
                    },
                    indent=2,
                )
            )
            return
        _say(ck.label + (f"  ({'; '.join(ck.notes)})" if ck.notes else ""))
        if not no_tensors:
            names = {name: printable(name) for name in ck.tensors}
            width = max((len(n) for n in names.values()), default=4)
            for name, info in ck.tensors.items():
                _say(f"  {names[name]:<{width}}  {info.dtype:<7}  {list(info.shape)}")
        numel = sum(i.numel for i in ck.tensors.values())
        counts: dict[str, int] = {}
        for info in ck.tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
        _say(
            f"tensors: {len(ck.tensors)}, parameters: {numel:,}, size: {format_bytes(ck.nbytes)}, "
            f"dtypes: {', '.join(f'{n} {d}' for d, n in counts.items())}"
        )
        if ck.metadata:
            _say("metadata:")
            for key, value in sorted(ck.metadata.items()):
                first, *rows = _pretty_metadata(key, value)
                _say(f"  {key}:{first}", *rows)


def _pretty_metadata(key: str, value: str) -> list[str]:
    """The ckptavg inputs list as one row per input; everything else as stored.

    Returns what follows `key:` on its line, then any rows below it.
    """
    if key != "ckptavg.inputs":
        return [f" {value}"]
    try:
        inputs = json.loads(value)
        rows = [f"      {item['weight']:8.4f}  {item['path']}" for item in inputs]
    except (ValueError, TypeError, KeyError):
        return [f" {value}"]
    return ["", *rows]
