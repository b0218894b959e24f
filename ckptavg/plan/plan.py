"""The plan: everything decided before the first tensor byte is read.

`build_plan` checks the inputs against each other (same names, same shapes,
same kind of dtype) using headers only, so a mistake in a 20 GB run is reported
in a second; computes the weights; decides each output tensor's dtype and
whether it is averaged or copied; lays out the output files; and checks that
the output may be written. `--dry-run` prints the plan and stops.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from .. import __version__
from ..errors import MismatchError, OutputError, name_list
from ..formats import dtypes
from ..formats.readers import Checkpoint
from ..inputs.selection import Selection, select
from ..inputs.side_files import allowed_root, find_side_files
from ..inputs.steps import resolve_steps
from ..run.direct import STAGING_BUFFERS, STAGING_BYTES
from ..run.writer import (
    COPIED_KEY,
    INDEX_NAME,
    SHARD_NAME,
    SINGLE_FILE_NAME,
    TORCH_OUTPUT_SUFFIXES,
    VERSION_KEY,
    Entry,
    check_target,
    kept_files,
    layout_order,
)
from ..schedules import Schedule, effective_count, implied_sigma_rel
from ..units import format_bytes, parse_size

# Elements per chunk of a large tensor: working memory is a few chunks, whatever the model size.
CHUNK_ELEMENTS = 2**20  # 4 MB of fp32: the accumulator and its scratch stay in the CPU's cache
# Buffers of each kind that may be in flight between the engine and the writer thread.
BUFFERS_IN_FLIGHT = 3
DEFAULT_FOLDER_SHARD_SIZE = "50GB"
_STEP_SOURCE_KINDS = {
    "name": "file names",
    "stored": "values stored in the checkpoints",
    "--steps": "--steps",
}
_SAMPLE = 64 * 1024  # bytes read at three places of each file to recognize copies
NONFINITE_POLICIES = ("error", "warn", "skip-checkpoint")


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: averaged over every checkpoint, or copied from the last.

    A tensor tied to another in every input (`same_as`) is not computed again:
    the other's result is written under its name too.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    averaged: bool
    same_as: str | None = None

    @property
    def entry(self) -> Entry:
        return Entry(self.name, self.dtype, self.shape)

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class Run:
    """Averaged tensors stored back to back, with one dtype, in every input and in the output.

    The engine sums a run as one flat tensor, chunk by chunk as any other: a
    model's thousands of small tensors cost a few operations instead of a few
    each. safetensors stores tensors by dtype, then name, so most of a model is
    one run.
    """

    tensors: tuple[TensorPlan, ...]
    averaged = True

    @property
    def name(self) -> str:
        return self.tensors[0].name

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def dtype(self) -> str:
        return self.tensors[0].dtype

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def member_at(self, element: int) -> TensorPlan:
        """The tensor holding flat element `element` of the run."""
        for tensor in self.tensors:
            if element < tensor.numel:
                return tensor
            element -= tensor.numel
        return self.tensors[-1]


@dataclass(frozen=True)
class OutputFile:
    """One file of the output: a single `.safetensors`, or one shard of a folder."""

    name: str
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)


@dataclass
class Plan:
    """What a run will do; `describe()` is the `--dry-run` report."""

    checkpoints: list[Checkpoint]
    schedule: Schedule
    weights: list[float]
    tensors: list[TensorPlan]
    accum_dtype: str
    output: Path | None = None
    folder: bool = False
    files: list[OutputFile] = field(default_factory=list)
    force: bool = False
    torch_output: bool = False
    wrap_key: str | None = None
    extra_files: list[Path] = field(default_factory=list)
    extra_root: Path | None = None  # where the extra files may really live (see side_files)
    kept: list[str] = field(default_factory=list)  # files of a replaced folder output that stay
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, str] | None = None
    shard_size: int | None = None
    nonfinite: str = "error"
    dropped: list[dict] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)
    step_sources: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)

    @property
    def last(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def computed(self) -> list[TensorPlan]:
        """The tensors the engine computes (tied copies excluded), in write order."""
        return [t for t in self.tensors if t.same_as is None]

    def work(self) -> list[TensorPlan | Run]:
        """What the engine computes, in write order: tensors, and runs of tensors stored back to back."""
        file_of = {t.name: i for i, f in enumerate(self.files) for t in f.tensors}
        tied = {t.same_as for t in self.tensors if t.same_as is not None}
        items: list[TensorPlan | Run] = []
        current: list[TensorPlan] = []
        for tensor in self.tensors:
            if tensor.same_as is not None:
                continue
            joinable = tensor.averaged and tensor.name not in tied
            if current and joinable and self._adjacent(current[-1], tensor, file_of):
                current.append(tensor)
                continue
            items.extend(_as_item(current))
            current = [tensor] if joinable else []
            if not joinable:
                items.append(tensor)
        items.extend(_as_item(current))
        return items

    def _adjacent(self, previous: TensorPlan, tensor: TensorPlan, file_of: dict[str, int]) -> bool:
        if previous.dtype != tensor.dtype or file_of.get(previous.name) != file_of.get(tensor.name):
            return False
        for checkpoint in self.checkpoints:
            before, after = checkpoint.byte_range(previous.name), checkpoint.byte_range(tensor.name)
            if before is None or after is None or before[0] != after[0] or before[2] != after[1]:
                return False
            if checkpoint.tensors[previous.name].dtype != checkpoint.tensors[tensor.name].dtype:
                return False
        return True

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

    @property
    def summed_in_float64(self) -> list[str]:
        """Averaged tensors stored in float64 somewhere: summed in float64 whatever `accum_dtype` says."""
        return [
            t.name
            for t in self.tensors
            if t.averaged and any(ck.tensors[t.name].dtype == "F64" for ck in self.checkpoints)
        ]

    @property
    def working_bytes(self) -> int:
        """Most the buffers can take: accumulators, a cast scratch, output chunks per dtype, and the
        writer's staging for writes past the page cache."""
        averaged = [t for t in self.tensors if t.averaged]
        elements = min(max((t.numel for t in averaged), default=0), CHUNK_ELEMENTS)
        accum = "F64" if self.summed_in_float64 else self.accum_dtype
        accumulators = (BUFFERS_IN_FLIGHT + 1) * dtypes.itemsize(accum)
        outputs = BUFFERS_IN_FLIGHT * sum(dtypes.itemsize(d) for d in {t.dtype for t in averaged})
        largest_file = max((file.nbytes for file in self.files), default=0)
        staging = min(STAGING_BUFFERS, -(-largest_file // STAGING_BYTES)) * STAGING_BYTES
        return elements * (accumulators + outputs) + staging

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
            "ckptavg.accum_dtype": _user_dtype(self.accum_dtype),
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

    def _describe_steps(self) -> str:
        known = [source for source in self.step_sources if source != "unknown"]
        if not known:
            return "steps:      unknown (name files like step_1000, or give --steps) — the column shows ?"
        kinds = sorted({_STEP_SOURCE_KINDS.get(source.split(" ")[0], source) for source in known})
        unknown = len(self.step_sources) - len(known)
        return f"steps:      from {' and '.join(kinds)}" + (f"; {unknown} unknown" if unknown else "")

    def _implied_sigma_rel(self) -> str:
        if not self.steps or any(s is None for s in self.steps) or max(self.steps) <= 0:
            return ""
        return f"; implied sigma_rel {implied_sigma_rel(self.weights, self.steps):.3f}"

    def drop(self, index: int, reason: str) -> None:
        """Leave checkpoint `index` out (it holds NaN or Inf) and reweigh the others with the schedule."""
        checkpoint = self.checkpoints.pop(index)
        if self.steps:
            self.steps.pop(index)
            self.step_sources.pop(index)
        self.weights = self.schedule.weights(len(self.checkpoints), self.steps or None)
        self.dropped.append({"path": checkpoint.origin, "reason": reason})
        self.warnings.append(
            f"dropped {checkpoint.label}: {reason}; averaged the other "
            f"{_plural(len(self.checkpoints), 'checkpoint')} with the weights the schedule gives them"
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
        """Human-readable lines: the weight of every checkpoint, sizes, layout and memory."""
        params = ", ".join(
            f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.schedule.params().items()
        )
        lines = [
            f"{self.schedule.method}{f' ({params})' if params else ''} over "
            f"{_plural(len(self.checkpoints), 'checkpoint')}, oldest first:"
        ]
        heaviest = max(self.weights)
        steps = self.steps or [None] * len(self.checkpoints)
        for i, (ck, w, step) in enumerate(zip(self.checkpoints, self.weights, steps, strict=True), 1):
            bar = "█" * max(1 if w > 0 else 0, round(20 * w / heaviest)) if heaviest > 0 else ""
            notes = f"  ({'; '.join(ck.notes)})" if ck.notes else ""
            at = f"{step:>9}" if step is not None else f"{'?':>9}"
            lines.append(f"  {i:>3}  {w:8.4f}  {bar:<20} {at}  {ck.label}{notes}")
        lines.extend(f"selected:   {note}" for note in self.selected)
        lines.append(self._describe_steps())
        lines.append(
            f"effective:  {effective_count(self.weights):.2f} checkpoints (1 / sum of squared weights)"
            + self._implied_sigma_rel()
        )
        averaged = [t for t in self.tensors if t.averaged]
        copied = len(self.tensors) - len(averaged)
        numel = sum(ck_info.numel for ck_info in self.checkpoints[0].tensors.values())
        if len(self.checkpoints) == 1:
            kinds = "all copied: there is one checkpoint"
        else:
            kinds = f"{len(averaged)} averaged in {_user_dtype(self.accum_dtype)}"
            wide = len(self.summed_in_float64) if self.accum_dtype != "F64" else 0
            kinds += f", {wide} of them (stored in float64) in float64" if wide else ""
            kinds += f", {copied} integer/bool copied from the last checkpoint" if copied else ""
        lines.append(f"tensors:    {len(self.tensors)} ({kinds})")
        for tensor in self.tensors:
            if tensor.same_as is not None:
                lines.append(
                    f"tied:       '{tensor.name}' = '{tensor.same_as}' (averaged once, written under both)"
                )
        lines.append(f"parameters: {numel:,}")
        lines.append(
            f"input:      {format_bytes(sum(ck.nbytes for ck in self.checkpoints))} in "
            f"{_plural(len(self.checkpoints), 'checkpoint')}, {format_bytes(self.bytes_to_read)} to read"
        )
        out_dtypes = _count_dtypes(self.tensors)
        lines.append(f"output:     {format_bytes(self.output_nbytes)}, {out_dtypes}")
        if self.output is not None:
            if self.folder:
                what = ", ".join(f.name for f in self.files[:3]) + (", ..." if len(self.files) > 3 else "")
                index = f" + {INDEX_NAME}" if len(self.files) > 1 else ""
                lines.append(
                    f"writes:     {self.output}{os.sep} ({_plural(len(self.files), 'file')}: {what}{index})"
                )
            elif self.torch_output:
                wrapped = f"{{'{self.wrap_key}': state_dict}}" if self.wrap_key else "a plain state dict"
                lines.append(f"writes:     {self.output} (torch.save of {wrapped})")
            else:
                lines.append(f"writes:     {self.output}")
            if self.extra_files:
                names = ", ".join(p.name for p in self.extra_files)
                lines.append(f"copies:     {names} from {self.extra_files[0].parent}")
            if self.kept:
                lines.append(f"keeps:      {', '.join(self.kept)} (not written by ckptavg) in {self.output}")
        lines.append(
            f"memory:     ~{format_bytes(self.working_bytes)} of buffers "
            f"(chunks of {CHUNK_ELEMENTS // 2**20}M elements, whatever the model size)"
        )
        return lines


def build_plan(
    checkpoints: Sequence[Checkpoint],
    schedule: Schedule,
    *,
    output: str | os.PathLike | None = None,
    dtype: str | None = None,
    accum_dtype: str = "float32",
    max_shard_size: int | str | None = None,
    force: bool = False,
    wrap_key: str | None = None,
    nonfinite: str = "error",
    steps: Sequence[int] | None = None,
    selection: Selection | None = None,
) -> Plan:
    """Validate the inputs and decide everything a run will do, reading headers only.

    Args:
        checkpoints: opened inputs, in averaging order (oldest first).
        schedule: the method, e.g. `schedules.ema(0.99)`.
        output: a `.safetensors` file, a torch file (`.pt`, `.pth`, `.bin`), or a folder
            (ending in `/`, or existing) for Hugging Face shards.
        dtype: output dtype of averaged tensors (`float32`, `bfloat16`, `float16`);
            default: each tensor's dtype in the first checkpoint.
        accum_dtype: `float32`, or `float64` for extra precision.
        max_shard_size: largest output file, e.g. `"5GB"`; implies a folder output.
        force: replace an existing output.
        wrap_key: for a torch output, save `{wrap_key: state_dict}` instead of the state dict.
        nonfinite: what a NaN or Inf in an input does: `error`, `warn`, or `skip-checkpoint`
            (drop that checkpoint and average the others, with the schedule's weights for them).

    Raises:
        MismatchError: the checkpoints do not hold the same tensors with the same shapes.
        OutputError: the output exists (without `force`), is an input, or cannot be laid out.
        ScheduleError: the schedule does not fit the number of checkpoints.
    """
    checkpoints = list(checkpoints)
    if nonfinite not in NONFINITE_POLICIES:
        raise OutputError(f"--nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {nonfinite}")
    found, sources = resolve_steps(
        [ck.label for ck in checkpoints], [ck.scalars for ck in checkpoints], steps
    )
    selected = []
    if selection is not None and selection.active:
        kept, selected = select(
            [ck.label for ck in checkpoints], found, [ck.scalars for ck in checkpoints], selection
        )
        checkpoints = [checkpoints[i] for i in kept]
        found, sources = [found[i] for i in kept], [sources[i] for i in kept]
    weights = schedule.weights(len(checkpoints), found)
    _check_same_model(checkpoints)
    out_dtype = _dtype_name(dtype, "--dtype") if dtype else None
    accum = _dtype_name(accum_dtype, "--accum-dtype")
    if accum not in ("F32", "F64"):
        raise OutputError(f"--accum-dtype must be float32 or float64, got {accum_dtype}")
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
    tensors.sort(key=lambda t: order[t.name])
    plan = Plan(
        list(checkpoints),
        schedule,
        weights,
        tensors,
        accum,
        force=force,
        nonfinite=nonfinite,
        steps=found,
        step_sources=sources,
        selected=selected,
    )
    plan.warnings.extend(schedule.warnings(len(checkpoints)))
    plan.warnings.extend(_duplicate_warnings(checkpoints))
    if len(checkpoints) == 1:
        plan.warnings.append(f"only one checkpoint ({first.label}): the output is a copy of it")
    if output is not None:
        _lay_out(plan, output, max_shard_size, wrap_key)
    elif wrap_key is not None:
        raise OutputError("--wrap-key needs a torch output (-o out.pt)")
    return plan


def _as_item(tensors: list[TensorPlan]) -> list[TensorPlan | Run]:
    if len(tensors) > 1:
        return [Run(tuple(tensors))]
    return list(tensors)


def _tied_in_every_input(checkpoints: Sequence[Checkpoint]) -> dict[str, str]:
    """Tied name -> the name it repeats, for ties that hold in every checkpoint."""
    common = None
    for ck in checkpoints:
        groups = {tuple(group) for group in ck.tied}
        common = groups if common is None else common & groups
    return {name: group[0] for group in sorted(common or ()) for name in group[1:]}


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
                    f"lacks {_plural(len(missing), 'tensor')} of {reference.label} ({name_list(missing)})"
                )
            if extra:
                parts.append(
                    f"has {_plural(len(extra), 'tensor')} that {reference.label} lacks ({name_list(extra)})"
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


def _lay_out(
    plan: Plan, output: str | os.PathLike, max_shard_size: int | str | None, wrap_key: str | None
) -> None:
    text = os.fspath(output)
    target = Path(text)
    folder = text.endswith(("/", os.sep)) or target.is_dir()
    torch_output = not folder and target.suffix in TORCH_OUTPUT_SUFFIXES
    if not folder and max_shard_size is not None:
        raise OutputError(
            f"{target}: --max-shard-size writes shards into a folder; give -o {target.with_suffix('')}/"
        )
    if not folder and not torch_output and target.suffix != ".safetensors":
        raise OutputError(
            f"{target}: give a file ending in .safetensors, {', '.join(TORCH_OUTPUT_SUFFIXES)}, "
            "or a folder ending in '/'"
        )
    if wrap_key is not None and not torch_output:
        raise OutputError(
            f"{target}: --wrap-key applies to torch outputs ({', '.join(TORCH_OUTPUT_SUFFIXES)})"
        )
    _refuse_input_as_output(plan.checkpoints, target, folder)
    check_target(target, folder=folder, force=plan.force)
    plan.output, plan.folder, plan.torch_output, plan.wrap_key = target, folder, torch_output, wrap_key
    if not folder:
        plan.files = [OutputFile(target.name, tuple(plan.tensors))]
        return
    plan.extra_root = allowed_root(plan.last.folder, plan.last.label)
    plan.extra_files, skipped = find_side_files(plan.last.folder, plan.extra_root)
    plan.warnings.extend(skipped)
    limit = plan.shard_size = parse_size(
        max_shard_size if max_shard_size is not None else DEFAULT_FOLDER_SHARD_SIZE
    )
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in plan.tensors:
        nbytes = tensor.entry.nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    if len(shards) == 1:
        plan.files = [OutputFile(SINGLE_FILE_NAME, tuple(shards[0]))]
    else:
        count = len(shards)
        plan.files = [
            OutputFile(SHARD_NAME.format(index=i, count=count), tuple(s)) for i, s in enumerate(shards, 1)
        ]
    written = {f.name for f in plan.files} | {p.name for p in plan.extra_files} | {INDEX_NAME}
    plan.kept = kept_files(target, written) if target.is_dir() else []


def _refuse_input_as_output(checkpoints: Sequence[Checkpoint], target: Path, folder: bool) -> None:
    """The output must not be an input under another name: a symbolic or a hard link to one."""
    resolved = target.resolve()
    replaced = _identities([*target.iterdir()] if folder and target.is_dir() else [target])
    for ck in checkpoints:
        for source in ck.files:
            source_resolved = source.resolve()
            same_file = _identities([source]) & replaced
            if source_resolved == resolved or (folder and source_resolved.parent == resolved) or same_file:
                raise OutputError(f"{target}: is an input ({ck.label}); write the output elsewhere")


def _identities(paths: Sequence[Path]) -> set[tuple[int, int]]:
    """(device, inode) of each path that exists: equal for two names of one file."""
    found = set()
    for path in paths:
        try:
            info = path.stat()
        except OSError:
            continue
        found.add((info.st_dev, info.st_ino))
    return found


def _duplicate_warnings(checkpoints: Sequence[Checkpoint]) -> list[str]:
    """The same checkpoint given twice silently doubles its weight: the same file (a Hub file
    under two revisions resolves to one cached blob), or files with the same content."""
    by_path: dict[Path, str] = {}
    by_content: dict[tuple, str] = {}
    warnings = []
    for ck in checkpoints:
        real = ck.path.resolve()
        fingerprint = _fingerprint(ck)
        if real in by_path:
            warnings.append(f"{ck.label} is given twice (also as {by_path[real]}): it counts twice")
        elif fingerprint is not None and fingerprint in by_content:
            warnings.append(f"{ck.label} has the same content as {by_content[fingerprint]}: it counts twice")
        by_path.setdefault(real, ck.label)
        if fingerprint is not None:
            by_content.setdefault(fingerprint, ck.label)
    return warnings


def _fingerprint(checkpoint: Checkpoint) -> tuple | None:
    """Size, tensors and sampled bytes (start, middle, end) of each file: equal for copies, cheap to read."""
    parts = []
    for path in checkpoint.files:
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                samples = []
                for offset in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
                    f.seek(offset)
                    samples.append(f.read(_SAMPLE))
        except OSError:
            return None  # not a local file (a Hub checkpoint known by its header)
        parts.append((size, hashlib.sha256(b"".join(samples)).hexdigest()))
    return tuple(parts), tuple(sorted((n, i.dtype, i.shape) for n, i in checkpoint.tensors.items()))


def _dtype_name(name: str, option: str) -> str:
    if name in dtypes.USER_DTYPE_NAMES:
        return dtypes.USER_DTYPE_NAMES[name]
    choices = ", ".join(dtypes.USER_DTYPE_NAMES)
    raise OutputError(f"{option} must be one of {choices}; got {name}")


def _user_dtype(dtype: str) -> str:
    return next((user for user, st in dtypes.USER_DTYPE_NAMES.items() if st == dtype), dtype)


def _count_dtypes(tensors: Sequence[TensorPlan]) -> str:
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return ", ".join(f"{n} {d}" for d, n in counts.items())


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"
