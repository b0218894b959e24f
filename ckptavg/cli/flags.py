"""The command line's flags, made from the library's option dataclasses (see `ckptavg.options`),
`--help` grouped under headings, and the one-line error and interrupt reports every command shares."""

from __future__ import annotations

import functools
import json
import os
import re
import sys

import click

from ..bn.data import DataOptions
from ..bn.statistics import BatchNormPass
from ..errors import CkptavgError, OptionsError, printable
from ..options import GROUPS, described
from ..run import distributed, interrupts

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def say(*lines: str, err: bool = False) -> None:
    """Print lines with whatever a name could smuggle in (newlines, escape sequences) escaped,
    and the library's mentions of its parameters in this command's flags. Under torchrun only
    rank 0 speaks (another rank's failure reaches it)."""
    if not distributed.speaks():
        return
    click.echo("\n".join(printable(in_flags(line)) for line in lines), err=err)


# How the library names a parameter in its messages: `decay`, or with a value, `decay=0.9`.
_MENTION = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")
# Parameters of the library with no field of their own on the command line.
_SPELLED = {"bn": "--bn-data"}


def in_flags(text: str) -> str:
    """`decay=0.9` -> `--decay 0.9`, `output=PATH` -> `-o PATH`, `dry_run=True` -> `--dry-run`:
    the library's words for its parameters, as the running command spells them."""
    ctx = click.get_current_context(silent=True)
    spelled = dict(_SPELLED)
    for param in ctx.command.params if ctx is not None else ():
        if isinstance(param, click.Option):
            short = [o for o in param.opts if not o.startswith("--")]
            spelled[getattr(param, "field", None) or param.name] = (short or param.opts)[0]

    def flag(match: re.Match) -> str:
        name, value = match.groups()
        if name not in spelled:
            return match.group(0)
        return spelled[name] if value in (None, "True") else f"{spelled[name]} {value}"

    return _MENTION.sub(flag, text)


class GroupedOption(click.Option):
    """An option that knows the heading `--help` lists it under, and the library parameter it sets."""

    def __init__(self, *args, group: str = "Run", field: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self.field = field


class GroupedCommand(click.Command):
    """`--help` with the options under headings (Method, Inputs, Selection, ...), not one flat list."""

    def format_options(self, ctx, formatter):
        groups: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = None if isinstance(param, click.Argument) else param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(param, "group", "Run"), []).append(record)
        for group in (*GROUPS, *(g for g in groups if g not in GROUPS)):
            if group in groups:
                with formatter.section(group):
                    formatter.write_dl(groups[group])


def parser(kind: str | None):
    """A click callback for the option kinds the dataclasses declare ("floats", "ints", "json")."""

    def split(cast, what):
        def parse(ctx, param, value):
            if value is None:
                return None
            try:
                return tuple(cast(v) for v in value.split(","))
            except ValueError:
                raise click.BadParameter(f"{value!r} is not a comma-separated list of {what}") from None

        return parse

    def json_object(ctx, param, value):
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise click.BadParameter(f"{value!r} is not JSON ({e})") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter(f"{value!r} is not a JSON object such as '{{\"num_classes\": 10}}'")
        return parsed

    return {"floats": split(float, "numbers"), "ints": split(int, "whole numbers"), "json": json_object}.get(
        kind
    )


def flags(cls, *, only=None, rename=None, required=(), help=None):
    """Click options for the fields of an option dataclass (see `options`): one edit adds a flag."""
    rename, help = rename or {}, help or {}
    decorators = []
    for item in described(cls):
        if only is not None and item.name not in only:
            continue
        name = rename.get(item.name, item.name)
        flag = item.flag
        names = [*([flag.short] if flag.short else []), "--" + name.replace("_", "-"), name]
        kwargs: dict = {
            "help": help.get(item.name, flag.help),
            "group": flag.group,
            "metavar": flag.metavar,
            "field": item.name,
        }
        if item.is_flag:
            kwargs.update(is_flag=True, default=item.default)
        elif flag.repeatable:
            kwargs.update(multiple=True)
        else:
            kwargs.update(default=item.default if flag.parse != "json" else json.dumps(item.default))
            kwargs.update(show_default=flag.show_default, required=item.name in required)
            if flag.choices:
                kwargs.update(type=click.Choice(flag.choices), metavar=None)
            elif flag.minimum is not None:
                kwargs.update(type=click.IntRange(min=flag.minimum))
            elif item.annotation.startswith("int"):
                kwargs.update(type=int)
            kwargs.update(callback=parser(flag.parse))
        decorators.append(click.option(*names, cls=GroupedOption, **kwargs))
    return decorators


def take(cls, values: dict, *, rename=None, **extra):
    """An option dataclass from the flags' values (removing them from `values`)."""
    rename = rename or {}
    fields = {
        item.name: values.pop(rename.get(item.name, item.name))
        for item in described(cls)
        if rename.get(item.name, item.name) in values
    }
    return cls(**fields, **extra)


def apply(decorators, command):
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def run_flags(dry_run_help: str):
    return [
        click.option("--dry-run", is_flag=True, cls=GroupedOption, group="Run", help=dry_run_help),
        click.option(
            "-q",
            "--quiet",
            is_flag=True,
            cls=GroupedOption,
            group="Run",
            help="Print only warnings and errors.",
        ),
    ]


def bn_pass(values: dict, device: str, *, data_flag: str):
    """The BatchNormPass the flags describe (removing them from `values`), or None without data."""
    data = take(DataOptions, values, rename={"data": data_flag})
    pass_values = {item.name: values.pop(item.name) for item in described(BatchNormPass)}
    if data.data is None:
        return None
    if pass_values["model"] is None:
        raise click.UsageError(
            "the BatchNorm pass needs the architecture: add --model, e.g. torchvision:resnet50"
        )
    return BatchNormPass(data=data, device=device, **pass_values)


def _exit(code: int) -> None:
    """Exit after an error that was said, or, on a silent rank, once rank 0 could say it."""
    if distributed.speaks():
        sys.exit(code)
    distributed.exit_silently(code)


def reports_errors(command):
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
        except OptionsError as e:
            if not distributed.speaks():  # under torchrun, rank 0 says it
                distributed.exit_silently(click.UsageError.exit_code)
            raise click.UsageError(in_flags(str(e))) from e
        except CkptavgError as e:
            if debug:
                raise
            say(f"error: {e}", err=True)
            _exit(EXIT_ERROR)
        except KeyboardInterrupt as e:
            if debug:
                raise
            report_interrupt(e)
        except BrokenPipeError:  # the reader left (ckptavg inspect | head): stop quietly, as on SIGPIPE
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_ERROR)
        except Exception as e:
            if debug:
                raise
            say(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
            _exit(EXIT_ERROR)

    return click.option(
        "--debug", is_flag=True, cls=GroupedOption, help="Show the full traceback on errors."
    )(wrapper)


def report_interrupt(interrupt: KeyboardInterrupt) -> None:
    """Say what an interrupt left (nothing, or the outputs already in place) and exit 130 or 143."""
    terminated = isinstance(interrupt, interrupts.Terminated)
    what = "terminated" if terminated else "interrupted"
    written = interrupts.committed()
    if written:
        say(f"{what} after writing {', '.join(map(str, written))}", err=True)
    else:
        say(f"{what}: nothing was written", err=True)
    sys.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)


def report_pass(plan) -> None:
    """The pass's counts, from the record kept in the output's metadata; unreadable images as a warning."""
    from ..bn.statistics import BN_KEY

    record = json.loads(plan.provenance[BN_KEY])
    say(f"recomputed BatchNorm statistics over {record['samples']} inputs in {record['batches']} batches")
    if record["skipped"]:
        say(
            f"warning: skipped {record['skipped']} unreadable images, e.g. {record['unreadable'][0]}",
            err=True,
        )
