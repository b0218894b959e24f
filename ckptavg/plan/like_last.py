"""Outputs in the last input's own shape (`like_last`): its torch zip archive, every record copied as
it is (the pickle, the optimizer's moments, the version records) except the averaged tensors'
storages, which get the averaged bytes under the same record name, in the same dtype and size.

Planned from the last input's archive, unpickled onto meta storages (no tensor byte is read): where
each averaged tensor's bytes lie in the file, whether its record can be rewritten alone, and what
the checkpoint holds besides the weights (for the report). A record is refused when it is shared
with an entry outside the weights (that entry would change too), holds a strided view, or holds
views that overlap without being the same tensor. `run.torch_like` writes the output.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import OutputError, printable
from ..formats.files import TorchFile
from ..formats.readers import INDEX_SUFFIX, Checkpoint
from ..formats.torch_archive import is_zip_archive
from ..formats.torch_format import find_state_dict, read_torch_archive
from ..formats.zip_records import crc_fields
from .tensors import TensorPlan

LIKE_LAST_SUFFIXES = (".ckpt", ".pth.tar")  # Lightning's and timm's: outputs like the last input


@dataclass(frozen=True)
class Region:
    """Where an averaged tensor's bytes go in the output file."""

    name: str  # the computed output tensor (a tied copy shares its region)
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Rewritten:
    """A record whose bytes change: its place, the averaged regions in it (in file order), and where
    the file stores its CRC-32."""

    record: str
    start: int
    size: int
    regions: tuple[Region, ...]
    crc_offsets: tuple[int, ...]


@dataclass(frozen=True)
class LikeLast:
    """The last input's archive, and what of it the output replaces and carries over."""

    source: Path
    label: str
    key: str | None  # where the averaged weights are (None: the top level)
    size: int  # of the source file, and so of the output
    records: tuple[Rewritten, ...]
    averaged: int
    kept: int  # weights copied as they are (integer, bool, or all of them with one checkpoint)
    carried: tuple[str, ...]  # the checkpoint's other top-level entries, described
    implied_by: str | None  # the output's suffix, when it asked for this

    def describe(self, output: Path) -> list[str]:
        """The report's lines: what is averaged, in place, and what is carried over unchanged."""
        how = f"as {self.implied_by} implies" if self.implied_by else "`like_last`"
        where = f"'{printable(self.key)}'" if self.key else "the top level"
        kept = f", {self.kept} kept as {'it is' if self.kept == 1 else 'they are'}" if self.kept else ""
        carried = ", ".join(self.carried) if self.carried else "nothing else (it holds only the weights)"
        return [
            f"writes:     {output} like the last input ({how}): its torch archive, record by record",
            f"averaged:   {self.averaged} tensors of {where} put in place{kept}",
            f"carried:    over unchanged from {self.label}: {carried}",
        ]


def wants_like_last(output: str | None, like_last: bool) -> bool:
    """Whether an output is written like the last input: asked for, or implied by its name."""
    return like_last or (output is not None and output.endswith(LIKE_LAST_SUFFIXES))


def plan_like_last(
    last: Checkpoint,
    tensors: Sequence[TensorPlan],
    target: Path,
    implied_by: str | None,
    rewritten: Collection[str] = (),
) -> LikeLast:
    """Where each averaged tensor goes in a copy of the last input's archive, checked to be writable alone.

    `rewritten` names tensors written though not averaged (new BatchNorm statistics, and the
    average itself when a BatchNorm pass writes it from a scratch copy).

    Raises:
        OutputError: the last input is not one torch zip archive, or a tensor cannot be rewritten
            alone (its dtype changes, it is strided, or its storage holds something else it overlaps).
    """
    averaged = sum(1 for t in tensors if t.averaged)
    tensors = [replace(t, averaged=True) if t.name in rewritten else t for t in tensors]  # written
    path, key, stored = _archive_of(last, tensors, target, implied_by)
    archive = read_torch_archive(path)
    weights, _, _ = find_state_dict(archive.content, path, key)
    label = last.label
    inside: dict[str, set[int]] = {}  # record -> the weights (tensor objects) saved on it
    claimed: dict[str, list[tuple[int, int, TensorPlan]]] = {}  # record -> (begin, end, tensor)
    for tensor in tensors:
        value = weights[stored[tensor.name]]
        if tensor.dtype != last.tensors[tensor.name].dtype:
            raise OutputError(
                f"{label}: tensor '{printable(tensor.name)}' is {last.tensors[tensor.name].dtype} there but "
                f"would be written as {tensor.dtype}; `like_last` keeps the last input's dtypes: leave out "
                "`dtype`, or average checkpoints saved in one dtype"
            )
        record, _ = archive.place(value)
        inside.setdefault(record, set()).add(id(value))
        if value.numel() == 0:
            continue
        if tensor.averaged and not value.is_contiguous():
            raise OutputError(
                f"{label}: tensor '{printable(tensor.name)}' is a strided view of its storage; `like_last` "
                "rewrites contiguous tensors only: save them with .contiguous(), or write without `like_last`"
            )
        begin = value.storage_offset() * value.element_size()
        last_element = sum(
            (size - 1) * stride for size, stride in zip(value.shape, value.stride(), strict=True)
        )
        claimed.setdefault(record, []).append(
            (begin, begin + (last_element + 1) * value.element_size(), tensor)
        )
    records = archive.records
    crcs = crc_fields(path)
    rewritten = []
    for record, spans in claimed.items():
        regions = _regions(label, record, spans)
        if not regions:
            continue
        if archive.references(record) > len(inside[record]):
            raise OutputError(
                f"{label}: tensor '{printable(regions[0].name)}' shares its storage (record '{record}') "
                f"with an entry outside {_where(key)}, which `like_last` would change too: write without "
                "`like_last`"
            )
        place = records[record]
        absolute = tuple(Region(r.name, place.start + r.offset, r.nbytes) for r in regions)
        rewritten.append(Rewritten(record, place.start, place.size, absolute, crcs[record].offsets))
    return LikeLast(
        source=path,
        label=label,
        key=key,
        size=path.stat().st_size,
        records=tuple(sorted(rewritten, key=lambda r: r.start)),
        averaged=averaged,
        kept=sum(1 for t in tensors if not t.averaged),
        carried=_carried(archive.content, key),
        implied_by=implied_by,
    )


def _archive_of(
    last: Checkpoint, tensors: Sequence[TensorPlan], target: Path, implied_by: str | None
) -> tuple[Path, str | None, dict[str, str]]:
    """The last input's one torch zip archive, the key of its weights, and each tensor's stored name."""
    files = list({id(file): file for file, _ in map(last.file_of, (t.name for t in tensors))}.values())
    file = files[0] if len(files) == 1 else None
    what = None
    if last.path is None:
        what = "known by its headers only"
    elif file is None or last.path.name.endswith(INDEX_SUFFIX):
        what = "sharded"
    elif not isinstance(file, TorchFile):
        what = "not a torch file"
    elif not is_zip_archive(file.path):
        what = "a legacy (pre-1.6) torch file"
    if what is not None:
        asked = f"as {implied_by} implies" if implied_by else "`like_last`"
        raise OutputError(
            f"{target}: written like the last input ({asked}), which must be one torch zip archive, but "
            f"{last.label} is {what}; write a .safetensors or .pt output (the weights alone) instead"
        )
    return file.path, file.key, {t.name: last.file_of(t.name)[1] for t in tensors}


def _regions(label: str, record: str, spans: list[tuple[int, int, TensorPlan]]) -> list[Region]:
    """The averaged regions of one record in file order, once none overlaps another tensor of it.

    Names on one region (tied weights) are written once, if the plan ties them (else their
    averages would differ); tensors that are only copied may overlap each other.
    """
    groups: dict[tuple[int, int], list[TensorPlan]] = {}
    for begin, end, tensor in spans:
        groups.setdefault((begin, end), []).append(tensor)
    regions: list[Region] = []
    reach, reached_by = 0, None  # the furthest byte of the groups so far, and its group's tensor
    for (begin, end), group in sorted(groups.items()):
        averaged = [t for t in group if t.averaged]
        if averaged and (len(averaged) < len(group) or len({_computed(t) for t in averaged}) > 1):
            _refuse_overlap(label, record, group[0], group[-1])
        if begin < reach and (averaged or reached_by.averaged):
            _refuse_overlap(label, record, reached_by, group[0])
        if averaged:
            regions.append(Region(_computed(averaged[0]), begin, end - begin))
        if end > reach:
            reach, reached_by = end, group[0]
    return regions


def _refuse_overlap(label: str, record: str, tensor: TensorPlan, other: TensorPlan) -> None:
    raise OutputError(
        f"{label}: tensors '{printable(tensor.name)}' and '{printable(other.name)}' share bytes of their "
        f"storage (record '{record}') but are not one tensor in every input; `like_last` cannot write "
        "both: write without `like_last`"
    )


def _computed(tensor: TensorPlan) -> str:
    return tensor.same_as or tensor.name


def _where(key: str | None) -> str:
    return f"'{printable(key)}'" if key else "the weights"


def _carried(content: object, key: str | None) -> tuple[str, ...]:
    """The checkpoint's top-level entries besides the weights, with the size of long lists."""
    import torch

    if not isinstance(content, Mapping):
        return ()
    top = key.split(".")[0] if key else None
    carried = []
    for name, value in content.items():
        if name == top or (key is None and isinstance(value, torch.Tensor)):
            continue
        text = printable(str(name))
        if isinstance(value, (list, tuple)) and len(value) != 1:
            text += f" ({len(value)} entries)" if value else " (empty)"
        carried.append(text)
    return tuple(carried)
