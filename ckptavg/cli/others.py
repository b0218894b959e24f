"""`bn-update` and `inspect`: one library call each, its result printed."""

from __future__ import annotations

import functools
import json
import sys

import click

from ..bn.data import DataOptions
from ..bn.statistics import BatchNormPass
from ..errors import printable
from ..inputs.hub_options import HubOptions
from ..options import OutputOptions, ReadOptions
from .flags import (
    CONTEXT,
    GroupedCommand,
    apply,
    bn_pass,
    flags,
    report_pass,
    reports_errors,
    run_flags,
    say,
    take,
)

# The output options bn-update takes: it copies a checkpoint, so the averaging ones do not apply.
_BN_UPDATE_OUTPUT = ("output", "max_shard_size", "wrap_key", "like_last", "force", "device")


def _bn_update_flags(command):
    return apply(
        [
            click.argument("checkpoint_spec", metavar="CHECKPOINT"),
            *flags(ReadOptions, only=("key", "strip_prefix")),
            *flags(
                OutputOptions,
                only=_BN_UPDATE_OUTPUT,
                help={"device": "Where the model runs; auto picks CUDA when available."},
            ),
            *flags(BatchNormPass),
            *flags(DataOptions, required=("data",)),
            *flags(HubOptions),
            *run_flags("Build the model, check the weights fit, open the data; no pass."),
        ],
        command,
    )


@click.command("bn-update", cls=GroupedCommand, context_settings=CONTEXT)
@_bn_update_flags
@reports_errors
def bn_update(checkpoint_spec, dry_run, quiet, **values):
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
    from ..api import bn_update as update

    progress = not quiet and sys.stderr.isatty()
    output = take(OutputOptions, values)
    plan = update(
        checkpoint_spec,
        bn_pass(values, output.device, data_flag="data"),
        read=take(ReadOptions, values),
        output=output,
        hub=take(HubOptions, values, progress=progress),
        dry_run=dry_run,
        progress=progress,
        on_check=lambda label, lines: say(f"bn-update of {label}", *lines),
    )
    if dry_run:
        say("dry run: nothing written")
    elif not quiet:
        report_pass(plan)
        say(f"wrote {plan.output}{'/' if plan.folder else ''}")


@click.command(context_settings=CONTEXT)
@click.argument("path", metavar="CHECKPOINT")
@click.option("--key", metavar="NAME", help="Torch files: the dict holding the weights.")
@click.option("--json", "as_json", is_flag=True, help="Print tensors and metadata as JSON.")
@click.option("--no-tensors", is_flag=True, help="Print totals and metadata only.")
@functools.partial(apply, flags(HubOptions))
@reports_errors
def inspect(path, key, as_json, no_tensors, **hub):
    """Show a checkpoint's tensors (name, dtype, shape), totals and metadata.

    Reads headers only (torch files are mapped lazily; Hub safetensors files are read
    with range requests, not downloaded), so it is quick on any size. For a ckptavg
    output the metadata says the method, its parameters and each input with its weight.

    \b
    ckptavg inspect ema.safetensors
    ckptavg inspect swa/ --no-tensors
    ckptavg inspect hf://org/run@step1000
    """
    from ..api import inspect as inspect_checkpoint
    from ..units import format_bytes

    found = inspect_checkpoint(path, key=key, hub=take(HubOptions, hub, progress=sys.stderr.isatty()))
    if as_json:
        tensors = {n: {"dtype": i.dtype, "shape": list(i.shape)} for n, i in found.tensors.items()}
        click.echo(
            json.dumps({"path": found.origin, "tensors": tensors, "metadata": found.metadata}, indent=2)
        )
        return
    say(found.label + (f"  ({'; '.join(found.notes)})" if found.notes else ""))
    if not no_tensors:
        names = {name: printable(name) for name in found.tensors}
        width = max((len(n) for n in names.values()), default=4)
        for name, info in found.tensors.items():
            say(f"  {names[name]:<{width}}  {info.dtype:<7}  {list(info.shape)}")
    say(
        f"tensors: {len(found.tensors)}, parameters: {found.parameters:,}, "
        f"size: {format_bytes(found.nbytes)}, dtypes: {found.dtypes}"
    )
    if found.metadata:
        say("metadata:")
        for key, value in sorted(found.metadata.items()):
            first, *rows = _pretty_metadata(key, value)
            say(f"  {key}:{first}", *rows)


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
