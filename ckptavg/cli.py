"""The `ckptavg` command line: parse options, call the library, report in one line.

Only this module imports click. Heavy imports (torch) happen inside commands,
so `ckptavg --help` and `--version` answer at once.
"""

from __future__ import annotations

import functools
import json
import signal
import sys

import click

from . import __version__
from .errors import CkptavgError

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `with` block cleans up."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _reports_errors(command):
    """One line on stderr and a non-zero exit instead of a traceback (unless --debug)."""

    @functools.wraps(command)
    def wrapper(*args, debug: bool, **kwargs):
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise  # usage errors: click prints them with the command's usage line
        except CkptavgError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt as e:
            if debug:
                raise
            what = "terminated" if isinstance(e, _Terminated) else "interrupted"
            click.echo(f"{what}: nothing was written", err=True)
            sys.exit(EXIT_TERMINATED if isinstance(e, _Terminated) else EXIT_INTERRUPTED)
        except Exception as e:
            if debug:
                raise
            click.echo(
                f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                err=True,
            )
            sys.exit(EXIT_ERROR)
        finally:
            signal.signal(signal.SIGTERM, previous)

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


def _hub_option_decorators(command):
    for option in reversed(_hub_options):
        command = option(command)
    return command


def _hub(token, cache_dir, offline, progress):
    from .hub import HubOptions

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
        click.option("--force", is_flag=True, help="Replace an existing output."),
        click.option("--dry-run", is_flag=True, help="Check the inputs and print the plan; write nothing."),
        click.option("-q", "--quiet", is_flag=True, help="Print only warnings and errors."),
    ]
    for option in reversed(options):
        command = option(command)
    return _hub_option_decorators(command)


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
    a failed or interrupted run leaves nothing behind.

    \b
    ckptavg swa 'ckpts/*.safetensors' -o swa.safetensors
    ckptavg ema --decay 0.9 'ckpts/*.safetensors' -o ema.safetensors --dry-run
    ckptavg swa 'hf://org/run@step14*' -o swa/
    ckptavg inspect ema.safetensors
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

    _average(schedule(), **options)


@main.command(context_settings=_CONTEXT)
@click.option(
    "--decay",
    type=float,
    required=True,
    help="Weight kept by the running average at each checkpoint, in [0, 1].",
)
@_averaging_options
@_reports_errors
def ema(decay, **options):
    """Exponential moving average with torch's semantics.

    The first checkpoint is the starting value, then each later one applies
    avg = decay * avg + (1 - decay) * x, as torchvision's reference EMA does.
    The decay applies once per checkpoint, not per training step: --decay 0.999
    over 10 checkpoints leaves 99.1% of the weight on the first one, and the
    plan warns about such weights.

    \b
    ckptavg ema --decay 0.9 'ckpts/*.safetensors' -o ema.safetensors
    ckptavg ema --decay 0.9 'ckpts/*.safetensors' --dry-run
    """
    from .schedules import ema as schedule

    _average(schedule(decay), **options)


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
    _average(weighted(values), **options)


def _average(
    schedule,
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
    force,
    dry_run,
    quiet,
    token,
    cache_dir,
    offline,
):
    from .api import open_checkpoints, run_plan
    from .plan import build_plan

    if output is None and not dry_run:
        raise click.UsageError("give an output with -o PATH (or check the inputs with --dry-run)")
    progress = not quiet and sys.stderr.isatty()
    hub = _hub(token, cache_dir, offline, progress)
    with open_checkpoints(
        inputs, keep_order=keep_order, key=key, strip_prefix=strip_prefix, hub=hub, fetch=not dry_run
    ) as checkpoints:
        plan = build_plan(
            checkpoints,
            schedule,
            output=output,
            dtype=dtype,
            accum_dtype=accum_dtype,
            max_shard_size=max_shard_size,
            force=force,
            wrap_key=wrap_key,
        )
        if not quiet or dry_run:
            click.echo("\n".join(plan.describe()))
        for warning in plan.warnings:
            click.echo(f"warning: {warning}", err=True)
        if dry_run:
            click.echo("dry run: nothing written")
            return
        path = run_plan(plan, device=device, progress=progress)
    if not quiet:
        from .units import format_bytes

        click.echo(
            f"wrote {path}{'/' if plan.folder else ''} ({format_bytes(plan.output_nbytes)}, "
            f"{len(plan.tensors)} tensors)"
        )


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
        click.echo(ck.label + (f"  ({'; '.join(ck.notes)})" if ck.notes else ""))
        if not no_tensors:
            width = max((len(n) for n in ck.tensors), default=4)
            for name, info in ck.tensors.items():
                click.echo(f"  {name:<{width}}  {info.dtype:<7}  {list(info.shape)}")
        numel = sum(i.numel for i in ck.tensors.values())
        counts: dict[str, int] = {}
        for info in ck.tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
        click.echo(
            f"tensors: {len(ck.tensors)}, parameters: {numel:,}, size: {format_bytes(ck.nbytes)}, "
            f"dtypes: {', '.join(f'{n} {d}' for d, n in counts.items())}"
        )
        if ck.metadata:
            click.echo("metadata:")
            for key, value in sorted(ck.metadata.items()):
                click.echo(f"  {key}:{_pretty_metadata(key, value)}")


def _pretty_metadata(key: str, value: str) -> str:
    """The ckptavg inputs list as one row per input; everything else as stored."""
    if key != "ckptavg.inputs":
        return f" {value}"
    try:
        inputs = json.loads(value)
        rows = [f"\n      {item['weight']:8.4f}  {item['path']}" for item in inputs]
    except (ValueError, TypeError, KeyError):
        return f" {value}"
    return "".join(rows)
