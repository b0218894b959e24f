"""One description of every option of a run: its Python name, its help, and how the command line shows it.

The library's option dataclasses (`ReadOptions`, `OutputOptions` below,
`inputs.selection.Selection`, `inputs.hub_options.HubOptions`,
`bn.data.DataOptions`, `bn.statistics.BatchNormPass`) declare their fields
with `option(...)`, and `cli.py` makes its flags from those fields: adding an
option is one edit here or there, and the flag, the Python argument and the
help can never disagree. Nothing here imports click.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# The headings `--help` groups the flags under, in this order.
GROUPS = (
    "Method",
    "LoRA adapters",
    "Inputs",
    "Selection",
    "Output",
    "Run",
    "BatchNorm pass",
    "Hugging Face Hub",
)
_NO_CLI_DEFAULT = object()


@dataclass(frozen=True)
class Flag:
    """How an option appears on the command line."""

    help: str
    group: str
    short: str | None = None  # e.g. "-o"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: int | None = None
    repeatable: bool = False
    parse: str | None = None  # "floats", "ints" (comma-separated) or "json" (an object)
    show_default: bool = False
    cli_default: Any = _NO_CLI_DEFAULT  # where the command line's default differs from Python's

    @property
    def has_cli_default(self) -> bool:
        return self.cli_default is not _NO_CLI_DEFAULT


def option(default: Any = dataclasses.MISSING, *, help: str, group: str, factory=None, **flag) -> Any:
    """A dataclass field that is also a command-line option (see `Flag` for the keywords)."""
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r}")
    metadata = {"flag": Flag(help=help, group=group, **flag)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Described:
    """One option of a dataclass: its field name, type annotation, default and flag."""

    name: str
    annotation: str
    default: Any
    flag: Flag

    @property
    def is_flag(self) -> bool:
        """On or off (`bool | None`: off by default, unset unless given)."""
        return self.annotation in ("bool", "bool | None")


def described(cls) -> Iterator[Described]:
    """The command-line options a dataclass declares, in field order."""
    for item in dataclasses.fields(cls):
        flag = item.metadata.get("flag")
        if flag is None:
            continue
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = None
        if flag.has_cli_default:
            default = flag.cli_default
        yield Described(item.name, str(item.type), default, flag)


@dataclass(frozen=True)
class ReadOptions:
    """How the input checkpoints are read."""

    key: str | None = option(
        None,
        group="Inputs",
        metavar="NAME",
        help="Torch files: the dict holding the weights, e.g. state_dict_ema or model_ema "
        "(dotted for nesting) [default: a flat dict, else state_dict, model, ...].",
    )
    strip_prefix: tuple[str, ...] = option(
        (),
        group="Inputs",
        metavar="PREFIX",
        repeatable=True,
        help="Remove this prefix from tensor names, e.g. module. (repeatable).",
    )
    include: tuple[str, ...] = option(
        (),
        group="Inputs",
        metavar="GLOB",
        repeatable=True,
        help="Average only the tensors whose names match, e.g. 'backbone.*' (fnmatch, on the names "
        "after --strip-prefix; repeatable).",
    )
    exclude: tuple[str, ...] = option(
        (),
        group="Inputs",
        metavar="GLOB",
        repeatable=True,
        help="Leave out the tensors whose names match, e.g. 'head.*' (fnmatch, on the names after "
        "--strip-prefix and --include; repeatable).",
    )
    keep_order: bool = option(
        False,
        group="Inputs",
        help="Average in the order given instead of natural order (step_2 before step_10).",
    )
    master_weights: bool = option(
        False,
        group="Inputs",
        help="DeepSpeed ZeRO-1/2 folders: average the fp32 master weights of the optimizer partitions "
        "instead of the module's weights (ZeRO-3 folders always give the master weights).",
    )
    weights_name: str | None = option(
        None,
        group="Inputs",
        metavar="NAME",
        help="Folders holding several models' weights (accelerate's model.safetensors and "
        "model_1.safetensors): the one to average, e.g. model_1.",
    )
    storage_options: dict = option(
        group="Inputs",
        factory=dict,
        metavar="JSON",
        parse="json",
        help="URL inputs (s3://, gs://, az://, https://): options for their fsspec file system, e.g. "
        '\'{"anon": true}\' or \'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\' [default: '
        "credentials from the storage library's usual places].",
    )
    read_ahead: str = option(
        "64MB",
        group="Inputs",
        metavar="SIZE",
        show_default=True,
        help="URL inputs: most bytes fetched ahead of the sums, shared by every input (counted in the "
        "plan's memory).",
    )
    remote_requests: int = option(
        8,
        group="Inputs",
        metavar="N",
        minimum=1,
        show_default=True,
        help="URL inputs: range requests at a time.",
    )


@dataclass(frozen=True)
class OutputOptions:
    """What the average is written as, and what the run does on the way."""

    output: str | None = option(
        None,
        group="Output",
        short="-o",
        metavar="PATH",
        help="Output file (.safetensors, or .pt/.pth/.bin for torch.save; .ckpt/.pth.tar: like the last "
        "input, see --like-last), or a folder ending in '/' for Hugging Face shards.",
    )
    dtype: str | None = option(
        None,
        group="Output",
        choices=("float32", "bfloat16", "float16"),
        help="Output dtype of floating tensors [default: as in the first checkpoint].",
    )
    max_shard_size: str | None = option(
        None,
        group="Output",
        metavar="SIZE",
        help="Largest output file, e.g. 5GB; writes Hugging Face shards into a folder "
        "[default for a folder: 50GB].",
    )
    format: str | None = option(
        None,
        group="Output",
        choices=("safetensors", "dcp"),
        help="dcp: write the output folder as a torch.distributed.checkpoint that dcp.load reads (the "
        "model's tensors under the inputs' keys) [default: from the output's name].",
    )
    wrap_key: str | None = option(
        None,
        group="Output",
        metavar="NAME",
        help="Torch output: save {NAME: state_dict} instead of the plain state dict.",
    )
    like_last: bool = option(
        False,
        group="Output",
        help="Torch output: the last input's checkpoint with the averaged weights put in place, all else "
        "(epoch, optimizer, hyper-parameters, ...) carried over unchanged [default for .ckpt, .pth.tar].",
    )
    force: bool = option(False, group="Output", help="Replace an existing output.")
    accum_dtype: str = option(
        "auto",
        group="Run",
        choices=("auto", "float32", "float64"),
        show_default=True,
        help="Dtype the sums are computed in: float64 gives every output value correctly rounded (the "
        "nearest of its dtype to the exact average), float32 a plain sum a few units in the last place "
        "off; auto: float64 for float32 and float64 outputs, float32 for narrower ones (where float64 "
        "costs time).",
    )
    device: str = option(
        "cpu",
        group="Run",
        metavar="auto|cpu|cuda|cuda:N",
        show_default=True,
        cli_default="auto",
        help="Where the sums are computed; auto picks CUDA when available.",
    )
    nonfinite: str = option(
        "error",
        group="Run",
        choices=("error", "warn", "skip-checkpoint"),
        show_default=True,
        help="A NaN or Inf in an input: stop, warn and keep it, or drop that checkpoint and average "
        "the others (checked during the sum, at no extra pass).",
    )
    steps: tuple[int, ...] | None = option(
        None,
        group="Selection",
        metavar="S1,S2,...",
        parse="ints",
        help="Training step of each checkpoint, in averaging order [default: stored in the checkpoint "
        "(global_step, step, epoch), else read from its name, e.g. step_1000].",
    )
