"""What an average of LoRA adapters will do, as records: the plan (`AdapterPlan`) and each module's
update in it (`AdapterLayer`). `plan.build_adapter_plan` makes them; `report`, `updates` and `run`
read them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..formats.readers import Checkpoint
from ..formats.safetensors_header import Entry, layout_order
from ..inputs.folders import ADAPTER_WEIGHT_NAMES
from ..plan.layout import COPIED_KEY, VERSION_KEY, Layout
from ..schedules import Schedule
from .config import AdapterConfig
from .layers import LayerNames
from .report import describe

ENERGY_KEY = "ckptavg.lora.kept_energy"


def is_adapter(checkpoint: Checkpoint) -> bool:
    """Whether a checkpoint is a PEFT adapter's weights (`adapter_model.safetensors` or `.bin`)."""
    name = checkpoint.path.name if checkpoint.path is not None else checkpoint.label.rsplit("/", 1)[-1]
    return name in ADAPTER_WEIGHT_NAMES


@dataclass(frozen=True)
class AdapterLayer:
    """One module's update in the output: the adapters that hold it, and how it is written."""

    module: str
    parts: tuple[tuple[int, LayerNames], ...]  # (position among the plan's adapters, stored names)
    rank: int  # the output's (concat, svd)
    kept: float | None = None  # svd: the share of the update's energy kept
    transposed: bool = False  # merge: the base weight holds the update transposed


@dataclass(frozen=True)
class AdapterPlan:
    """What an average of adapters will do; `describe()` is its dry-run report."""

    checkpoints: list[Checkpoint]
    configs: list[AdapterConfig]
    schedule: Schedule
    weights: list[float]
    mode: str
    layers: list[AdapterLayer]
    others: list[str]  # the adapters' other tensors, averaged as they are
    output: Path | None
    dtype: str | None = None
    base: Checkpoint | None = None
    layout: Layout | None = None  # merge: the full model's files
    extra_files: tuple[Path, ...] = ()
    extra_root: Path | None = None
    force: bool = False
    warnings: list[str] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)
    step_sources: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)

    @property
    def folder(self) -> bool:
        return self.layout.folder if self.layout is not None else self.output is not None

    def entries(self) -> list[Entry]:
        """The output adapter's tensors (concat, svd), in the order they are written."""
        first = self.checkpoints[0]
        entries = []
        for layer in self.layers:
            index, names = layer.parts[0]
            ck = self.checkpoints[index]
            for name, shape in (
                (names.a, (layer.rank, *ck.tensors[names.a].shape[1:])),
                (names.b, (ck.tensors[names.b].shape[0], layer.rank, *ck.tensors[names.b].shape[2:])),
            ):
                entries.append(Entry(name, self._dtype_of(ck.tensors[name].dtype), shape))
        for name in self.others:
            info = first.tensors[name]
            entries.append(
                Entry(name, self._dtype_of(info.dtype) if info.is_floating else info.dtype, info.shape)
            )
        return layout_order(entries)

    def _dtype_of(self, stored: str) -> str:
        return self.dtype or stored

    @property
    def tensors(self) -> list[str]:
        if self.layout is not None:
            return [t.name for f in self.layout.files for t in f.tensors]
        return [e.name for e in self.entries()]

    @property
    def output_nbytes(self) -> int:
        if self.layout is not None:
            return sum(f.nbytes for f in self.layout.files)
        return sum(e.nbytes for e in self.entries())

    def ranks(self) -> dict[str, int]:
        return {layer.module: layer.rank for layer in self.layers}

    def metadata(self) -> dict[str, str]:
        """Provenance stored in the output's `__metadata__`."""
        extra = self.layout.extra_files if self.layout is not None else self.extra_files
        copied = {COPIED_KEY: json.dumps([p.name for p in extra])} if extra else {}
        energy = {}
        if self.mode == "svd":
            energy = {ENERGY_KEY: json.dumps({layer.module: layer.kept for layer in self.layers})}
        return {
            **copied,
            "format": "pt",
            VERSION_KEY: __version__,
            "ckptavg.method": self.schedule.method,
            "ckptavg.params": json.dumps(self.schedule.params()),
            "ckptavg.lora": self.mode,
            "ckptavg.inputs": json.dumps(
                [
                    {"path": ck.origin, "weight": w, **({"step": step} if step is not None else {})}
                    for ck, w, step in zip(
                        self.checkpoints, self.weights, self.steps or [None] * len(self.weights), strict=True
                    )
                ]
            ),
            **({"ckptavg.base": self.base.origin} if self.base is not None else {}),
            **({"ckptavg.dropped": json.dumps(self.dropped)} if self.dropped else {}),
            **energy,
        }

    def describe(self) -> list[str]:
        return describe(self)
