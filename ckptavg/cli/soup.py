"""`soup`: the uniform or greedy soup of fine-tuned ingredients, its table printed as it is decided."""

from __future__ import annotations

import sys

import click

from ..bn.data import DataOptions
from ..bn.statistics import BatchNormPass
from ..errors import plural
from ..inputs.hub_options import HubOptions
from ..options import OutputOptions, ReadOptions
from ..soups.options import SoupOptions
from .flags import CONTEXT, GroupedCommand, apply, flags, report_pass, reports_errors, run_flags, say, take

_MODEL_HELP = (
    "The architecture the candidates are loaded into for --eval: package.module:callable, "
    "torchvision:NAME or timm:NAME, built with random weights (imported and run: only give code you trust)."
)
_BN_DATA_HELP = (
    "Data to recompute BatchNorm statistics over before each evaluation and for the final soup: an image "
    "folder, a tensor file (.safetensors, .pt, .npy) or package.module:callable returning batches."
)


def _soup_flags(command):
    return apply(
        [
            click.argument("inputs", nargs=-1, required=True, metavar="INGREDIENTS..."),
            *flags(SoupOptions),
            *flags(BatchNormPass, only=("model", "model_kwargs"), help={"model": _MODEL_HELP}),
            *flags(ReadOptions),
            *flags(OutputOptions),
            *flags(DataOptions, rename={"data": "bn_data"}, help={"data": _BN_DATA_HELP}),
            *flags(HubOptions),
            *run_flags("Check the ingredients, build the model and print the plan; evaluate nothing."),
        ],
        command,
    )


@click.command(cls=GroupedCommand, context_settings=CONTEXT)
@_soup_flags
@reports_errors
def soup(inputs, dry_run, quiet, model, model_kwargs, **values):
    """Model soups (Wortsman et al. 2022): the uniform or the greedy soup of fine-tuned models.

    \b
    Uniform (the default): the equal-weight average of every ingredient, as swa;
    with --eval, the ingredients and the soup are scored too. Greedy (--greedy):
    each ingredient is scored by --eval (or read from --scores), then, best first,
    added to the soup only if the soup's score does not get worse (ties keep it),
    so the soup scores at least as well as its best ingredient on that data. The
    table (ingredient, its score, the soup's score with it, kept or not) is
    printed as it goes and recorded in the output's metadata.

    \b
    Each candidate is the running sum of the kept ingredients plus one more: one
    read of one ingredient. The model and two float64 sums of its weights are in
    memory (the plan says how much); the soup is written through the atomic writer.
    --bn-data recomputes BatchNorm statistics before each evaluation.

    --model, --eval and --bn-data callables are imported and run: they are the only
    code ckptavg runs on your behalf; checkpoints are never executed.

    \b
    ckptavg soup --greedy 'finetunes/*.safetensors' --model timm:vit_small_patch16_224 \\
        --eval mypkg.evals:val_accuracy -o soup.safetensors
    ckptavg soup --greedy 'finetunes/*' --model mypkg.nets:build --eval mypkg.evals:val_loss \\
        --mode min --scores scores.json -o soup.safetensors
    """
    from ..recipes import soup as make_soup

    progress = not quiet and sys.stderr.isatty()
    output = take(OutputOptions, values)
    data = take(DataOptions, values, rename={"data": "bn_data"})
    options = take(SoupOptions, values)

    def report(plan, lines) -> None:
        if not quiet or dry_run:
            say(*plan.describe(), *lines)
        for warning in plan.warnings:
            say(f"warning: {warning}", err=True)
        if options.eval is not None and not dry_run and not quiet:
            say("", f"  {'':<8}  {'score':>10}  {'soup':>10}  ingredient (best first)")

    def row(row) -> None:
        if not quiet:
            soup_score = f"{row.soup_score:>10.6g}" if row.soup_score is not None else f"{'':>10}"
            given = " (score given)" if row.given else ""
            decision = "kept" if row.kept else "left out"
            say(f"  {decision:<8}  {row.score:>10.6g}  {soup_score}  {row.ingredient}{given}")

    plan = make_soup(
        inputs,
        options,
        model=model,
        model_kwargs=model_kwargs,
        bn_data=data if data.data is not None else None,
        read=take(ReadOptions, values),
        output=output,
        hub=take(HubOptions, values, progress=progress),
        dry_run=dry_run,
        progress=progress,
        on_plan=report,
        on_row=row,
    )
    if dry_run:
        say("dry run: nothing written")
        return
    if not quiet:
        if data.data is not None:
            report_pass(plan)
        kept = plural(len(plan.checkpoints), "ingredient")
        say(f"wrote {plan.output}{'/' if plan.folder else ''} (the soup of {kept})")
