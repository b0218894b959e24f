"""The plan: everything decided before the first tensor byte is read.

`build_plan` checks the inputs against each other (same names, same shapes,
same kind of dtype) using headers only, so a mistake in a 20 GB run is reported
in a second; computes the weights; decides each output tensor's dtype and
whether it is averaged or copied; lays out the output files; and checks that
the output may be written. A plan is never changed once built: leaving a
checkpoint out makes a new one (`without`). `describe()` is the dry-run report.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import __version__
from ..errors import InputError, MismatchError, OutputError, name_list, plural
from ..formats import dtypes
from ..formats.name_filter import unmatched_rules
from ..formats.readers import Checkpoint
from ..formats.safetensors_header import layout_order
from ..inputs.duplicates import duplicate_warnings
from ..inputs.remote import is_url
from ..inputs.selection import Selection, choose
from ..memory import (
    BUFFERS_IN_FLIGHT,
    CHUNK_ELEMENTS,
    REMOTE_BLOCK_BYTES,
    ROUNDING_BYTES,
    STAGING_BUFFERS,
    STAGING_BYTES,
    upload_part_bytes,
)
from ..options import OutputOptions
from ..schedules import Schedule
from .layout import COPIED_KEY, VERSION_KEY, Layout, lay_out
from .like_last import plan_like_last
from .remote_layout import remote_layout
from .report import describe
from .tensors import OutputFile, TensorPlan

NONFINITE_POLICIES = ("error", "warn", "skip-checkpoint")


@dataclass(frozen=True)
class Plan:
    """What a run will do. `layout` is None for a plan without an output (planning only)."""

    checkpoints: list[Checkpoint]
    schedule: Schedule
    weights: list[float]
    tensors: list[TensorPlan]
    accum_dtype: str
    layout: Layout | None = None
    force: bool = False
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, str] | None = None  # kept instead of the averaging's record (bn-update)
    nonfinite: str = "error"
    dropped: list[dict] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)
    step_sources: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)

    @property
    def output(self) -> Path | None:
        return self.layout.output if self.layout else None

    @property
    def folder(self) -> bool:
        return bool(self.layout and self.layout.folder)

    @property
    def files(self) -> list[OutputFile]:
        return list(self.layout.files) if self.layout else []

    @property
    def torch_output(self) -> bool:
        return bool(self.layout and self.layout.torch_output)

    @property
    def wrap_key(self) -> str | None:
        return self.layout.wrap_key if self.layout else None

    @property
    def extra_files(self) -> list[Path]:
        return list(self.layout.extra_files) if self.layout else []

    @property
    def extra_root(self) -> Path | None:
        return self.layout.extra_root if self.layout else None

    @property
    def kept(self) -> list[str]:
        return list(self.layout.kept) if self.layout else []

    @property
    def shard_size(self) -> int | None:
        return self.layout.shard_size if self.layout else None

    @property
    def last(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def computed(self) -> list[TensorPlan]:
        """The tensors the engine computes (tied copies excluded), in write order."""
        return [t for t in self.tensors if t.same_as is None]

    def targets(self, tensor: TensorPlan) -> list[str]:
        """Every output name a computed tensor is written under: its own and its tied copies'."""
        return [tensor.name, *(t.name for t in self.tensors if t.same_as == tensor.name)]

    @property
    def output_nbytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)

    @property
    def bytes_to_read(self) -> int:
        """Input bytes the engine reads: averaged tensors from every checkpoint, copies from the last."""
        total = 0
        for tensor in self.computed:
            sources = self.checkpoints if tensor.averaged else [self.last]
            total += sum(ck.tensors[tensor.name].nbytes for ck in sources)
        return total

    def accumulator(self, name: str, output_dtype: str) -> str:
        """`F64` or `F32`: what a tensor is summed in. Float64 sums give correctly rounded outputs;
        `auto` uses them where they cost nothing measurable, for float32 and float64 outputs."""
        if self.accum_dtype == "F64" or any(ck.tensors[name].dtype == "F64" for ck in self.checkpoints):
            return "F64"
        return "F64" if self.accum_dtype == "auto" and output_dtype in ("F32", "F64") else "F32"

    @property
    def accumulators(self) -> dict[str, str]:
        """Each averaged tensor's accumulator, by name."""
        return {t.name: self.accumulator(t.name, t.dtype) for t in self.tensors if t.averaged}

    @property
    def working_bytes(self) -> int:
        """Most the buffers can take: accumulators, a cast scratch, output chunks per dtype, the
        writer's staging for writes past the page cache (or a URL output's parts being uploaded),
        the chunks inputs decode (compressed DCP chunks, read one at a time), and the bytes
        fetched ahead from remote inputs."""
        averaged = [t for t in self.tensors if t.averaged]
        elements = min(max((t.numel for t in averaged), default=0), CHUNK_ELEMENTS)
        used = self.accumulators
        accum = "F64" if "F64" in used.values() else "F32"
        accumulators = (BUFFERS_IN_FLIGHT + 1) * dtypes.itemsize(accum)
        outputs = BUFFERS_IN_FLIGHT * sum(dtypes.itemsize(d) for d in {t.dtype for t in averaged})
        largest_file = max((file.nbytes for file in self.files), default=0)
        if self.layout is not None and self.layout.remote is not None:  # a URL output: its upload's parts
            staging = 2 * upload_part_bytes(largest_file)
        else:
            staging = min(STAGING_BUFFERS, -(-largest_file // STAGING_BYTES)) * STAGING_BYTES
        decoded = sum(ck.decoded_bytes for ck in self.checkpoints)
        remote = [ck for ck in self.checkpoints if getattr(ck, "read_ahead", 0)]
        fetched = max((ck.read_ahead for ck in remote), default=0) + len(remote) * REMOTE_BLOCK_BYTES
        narrowed = any(used[t.name] == "F64" and dtypes.itemsize(t.dtype) < 4 for t in averaged)
        rounding = ROUNDING_BYTES if narrowed else 0  # through float32, rounded to odd (`run.engine`)
        return elements * (accumulators + outputs + rounding) + staging + decoded + fetched

    def metadata(self) -> dict[str, str]:
        """Provenance stored in the output's `__metadata__` (all values are strings).

        A plan that only copies a checkpoint with some tensors replaced (bn-update)
        sets `provenance` to keep the averaging's record instead.
        """
        copied = {COPIED_KEY: json.dumps([p.name for p in self.extra_files])} if self.extra_files else {}
        if self.provenance is not None:
            return {**self.provenance, VERSION_KEY: __version__, **copied}
        return {
            **copied,
            "format": self.checkpoints[0].metadata.get("format", "pt"),
            VERSION_KEY: __version__,
            "ckptavg.method": self.schedule.method,
            "ckptavg.params": json.dumps(self.schedule.params()),
            "ckptavg.accum_dtype": "auto"
            if self.accum_dtype == "auto"
            else dtypes.user_name(self.accum_dtype),
            "ckptavg.inputs": json.dumps(
                [
                    {"path": ck.origin, "weight": w, **({"step": step} if step is not None else {})}
                    for ck, w, step in zip(
                        self.checkpoints, self.weights, self.steps or [None] * len(self.weights), strict=True
                    )
                ]
            ),
            **({"ckptavg.dropped": json.dumps(self.dropped)} if self.dropped else {}),
        }

    def without(self, index: int, reason: str) -> Plan:
        """The plan with checkpoint `index` left out (it holds NaN or Inf), the others reweighed by
        the schedule."""
        checkpoint = self.checkpoints[index]
        checkpoints = [ck for i, ck in enumerate(self.checkpoints) if i != index]
        steps = [s for i, s in enumerate(self.steps) if i != index]
        layout = self.layout
        if layout is not None and layout.like_last is not None and index == len(self.checkpoints) - 1:
            # written like the last input, which is now another one
            like = plan_like_last(checkpoints[-1], self.tensors, layout.output, layout.like_last.implied_by)
            layout = replace(layout, like_last=like)
        return replace(
            self,
            checkpoints=checkpoints,
            layout=layout,
            steps=steps,
            step_sources=[s for i, s in enumerate(self.step_sources) if i != index],
            weights=self.schedule.weights(len(checkpoints), steps or None),
            dropped=[*self.dropped, {"path": checkpoint.origin, "reason": reason}],
            warnings=[
                *self.warnings,
                f"dropped {checkpoint.label}: {reason}; averaged the other "
                f"{plural(len(checkpoints), 'checkpoint')} with the weights the schedule gives them",
            ],
        )

    def index(self) -> dict | None:
        """The Hugging Face shard index, when the output has more than one file."""
        if len(self.files) < 2:
            return None
        return {
            "metadata": {"total_size": self.output_nbytes, **self.metadata()},
            "weight_map": dict(sorted((t.name, f.name) for f in self.files for t in f.tensors)),
        }

    def describe(self) -> list[str]:
        """The dry-run report, one line each (see `report`)."""
        return describe(self)


def build_plan(
    checkpoints: Sequence[Checkpoint],
    schedule: Schedule,
    options: OutputOptions | None = None,
    *,
    selection: Selection | None = None,
    storage_options: dict | None = None,
    **settings,
) -> Plan:
    """Validate the inputs and decide everything a run will do, reading headers only.

    Args:
        checkpoints: opened inputs, in averaging order (oldest first).
        schedule: the method, e.g. `schedules.ema(0.99)`.
        options: the output and how it is computed (`OutputOptions`: output, dtype,
            accum_dtype, max_shard_size, format, force, wrap_key, like_last, nonfinite, steps); `device` is
            the executor's. No output: a plan to report, not to carry out.
        selection: which checkpoints to keep, e.g. `Selection(last=5)`.
        storage_options: for an output URL (`s3://...`), passed to its fsspec file system.
        settings: `OutputOptions` fields given one by one instead, or over `options`
            (`build_plan(cks, swa(), output="swa/", max_shard_size="5GB")`).

    Raises:
        MismatchError: the checkpoints do not hold the same tensors with the same shapes.
        InputError: a checkpoint holds no weights (its floating tensors are empty, or it has none).
        OutputError: the output exists (without `force`), is an input, or cannot be laid out.
        ScheduleError: the schedule does not fit the number of checkpoints.
    """
    options = replace(options or OutputOptions(), **settings)
    output, force, wrap_key, nonfinite = options.output, options.force, options.wrap_key, options.nonfinite
    checkpoints = list(checkpoints)
    if nonfinite not in NONFINITE_POLICIES:
        raise OutputError(f"`nonfinite` must be one of {', '.join(NONFINITE_POLICIES)}, got {nonfinite}")
    chosen = choose(checkpoints, options.steps, selection)
    checkpoints = [checkpoints[i] for i in chosen.kept]
    found, sources, selected = chosen.steps, chosen.sources, chosen.notes
    weights = schedule.weights(len(checkpoints), found)
    _check_holds_weights(checkpoints)
    _check_same_model(checkpoints)
    accum = "auto" if options.accum_dtype == "auto" else _dtype_name(options.accum_dtype, "`accum_dtype`")
    if accum not in ("auto", "F32", "F64"):
        raise OutputError(f"`accum_dtype` must be auto, float32 or float64, got {options.accum_dtype}")
    tensors = _output_tensors(checkpoints, _dtype_name(options.dtype, "`dtype`") if options.dtype else None)
    warnings = [
        *schedule.warnings(len(checkpoints)),
        *duplicate_warnings(checkpoints),
        *unmatched_rules([ck.filtered for ck in checkpoints if ck.filtered is not None]),
    ]
    if len(checkpoints) == 1:
        warnings.append(f"only one checkpoint ({checkpoints[0].label}): the output is a copy of it")
    layout = None
    if output is not None:
        lay = dict(force=force, max_shard_size=options.max_shard_size, wrap_key=wrap_key)
        lay.update(like_last=options.like_last, format=options.format)
        if is_url(str(output)):
            layout = remote_layout(checkpoints, tensors, str(output), storage_options=storage_options, **lay)
        else:
            layout = lay_out(checkpoints, tensors, output, **lay)
        warnings.extend(layout.warnings)
    elif wrap_key is not None or options.like_last:
        raise OutputError(
            f"`{'wrap_key' if wrap_key else 'like_last'}` needs a torch output (`output=out.pt`)"
        )
    return Plan(
        checkpoints,
        schedule,
        weights,
        tensors,
        accum,
        layout=layout,
        force=force,
        warnings=warnings,
        nonfinite=nonfinite,
        steps=found,
        step_sources=sources,
        selected=selected,
    )


def _output_tensors(checkpoints: Sequence[Checkpoint], out_dtype: str | None) -> list[TensorPlan]:
    """Every output tensor, in the order safetensors lays them out: floating ones averaged (in
    `out_dtype` if given), integer and bool ones copied from the last checkpoint."""
    first, last = checkpoints[0], checkpoints[-1]
    averaging = len(checkpoints) > 1
    same_as = _tied_in_every_input(checkpoints)
    tensors = [
        TensorPlan(name, info.shape, out_dtype or info.dtype, averaged=averaging, same_as=same_as.get(name))
        if info.is_floating
        else TensorPlan(name, info.shape, last.tensors[name].dtype, averaged=False, same_as=same_as.get(name))
        for name, info in first.tensors.items()
    ]
    order = {entry.name: i for i, entry in enumerate(layout_order(t.entry for t in tensors))}
    return sorted(tensors, key=lambda t: order[t.name])


def _tied_in_every_input(checkpoints: Sequence[Checkpoint]) -> dict[str, str]:
    """Tied name -> the name it repeats, for ties that hold in every checkpoint."""
    common = None
    for ck in checkpoints:
        groups = {tuple(group) for group in ck.tied}
        common = groups if common is None else common & groups
    return {name: group[0] for group in sorted(common or ()) for name in group[1:]}


def _check_holds_weights(checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse a hollow average: an input whose floating tensors are all empty beside inputs that hold
    weights (a placeholder saved without its values), or inputs whose floating tensors hold no value."""
    holding = [ck for ck in checkpoints if _parameters(ck)]
    for ck in checkpoints:
        floating = [name for name, info in ck.tensors.items() if info.is_floating]
        if _parameters(ck) or (holding and not floating):  # no floating tensor: not the same model
            continue
        selected = " left by `include`/`exclude`" if ck.filtered is not None else ""
        if floating:
            are = "is" if len(floating) == 1 else "are"
            count = plural(len(floating), "floating tensor")
            what = f"its {count}{selected} {are} empty ({name_list(floating)})"
        else:
            others = plural(len(ck.tensors), "integer or bool tensor")
            what = f"it has no floating tensor{selected}, only {others}"
        if holding:
            beside = f", while {holding[0].label} holds {_parameters(holding[0]):,} parameters"
            fix = "it may be a placeholder saved without its values; average the files that hold the weights"
        else:
            beside, fix = "", "there is nothing to average"
        raise InputError(f"{ck.label}: holds no weights: {what}{beside}; {fix}")


def _parameters(checkpoint: Checkpoint) -> int:
    """The values its floating tensors hold."""
    return sum(info.numel for info in checkpoint.tensors.values() if info.is_floating)


def _check_same_model(checkpoints: Sequence[Checkpoint]) -> None:
    reference = checkpoints[0]
    ref_names = reference.tensors.keys()
    for ck in checkpoints[1:]:
        missing = sorted(ref_names - ck.tensors.keys())
        extra = sorted(ck.tensors.keys() - ref_names)
        if missing or extra:
            parts = []
            if missing:
                parts.append(
                    f"lacks {plural(len(missing), 'tensor')} of {reference.label} ({name_list(missing)})"
                )
            if extra:
                parts.append(
                    f"has {plural(len(extra), 'tensor')} that {reference.label} lacks ({name_list(extra)})"
                )
            raise MismatchError(
                f"{ck.label}: {' and '.join(parts)}; average only checkpoints of the same model"
            )
        for name, info in reference.tensors.items():
            other = ck.tensors[name]
            if other.shape != info.shape:
                raise MismatchError(
                    f"{ck.label}: tensor '{name}' has shape {_shape(other.shape)}, expected "
                    f"{_shape(info.shape)} as in {reference.label}; "
                    "average only checkpoints of the same model"
                )
            if other.is_floating != info.is_floating:
                raise MismatchError(
                    f"{ck.label}: tensor '{name}' is {other.dtype} but {info.dtype} in {reference.label}; "
                    "a floating tensor cannot be averaged with an integer one"
                )


def _dtype_name(name: str, option: str) -> str:
    if name in dtypes.USER_DTYPE_NAMES:
        return dtypes.USER_DTYPE_NAMES[name]
    choices = ", ".join(dtypes.USER_DTYPE_NAMES)
    raise OutputError(f"{option} must be one of {choices}; got {name}")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"
