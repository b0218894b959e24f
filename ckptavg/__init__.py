"""ckptavg: average model checkpoints (EMA, SWA, weighted) by streaming them.

    import ckptavg
    ckptavg.average(paths, ckptavg.ema(decay=0.9), out="ema.safetensors")

Heavy modules (torch) load on first use, so `ckptavg --help` starts fast.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .errors import CkptavgError, InputError, MismatchError, OptionsError, OutputError, ScheduleError
from .inputs.selection import Selection
from .schedules import anneal, ema, power_ema, swa, weighted

if TYPE_CHECKING:  # what `__getattr__` loads on first use, visible to editors and type checkers
    from .adapters.options import LoraOptions
    from .api import average, average_many, bn_update, inspect, open_checkpoints
    from .bn.data import DataOptions
    from .bn.statistics import BatchNormPass
    from .formats.readers import open_checkpoint
    from .inputs.hub_options import HubOptions
    from .options import OutputOptions, ReadOptions
    from .plan.plan import build_plan
    from .recipes import post_hoc_ema, soup
    from .run.executor import run_plan, run_plans
    from .soups.options import SoupOptions

__all__ = [
    "BatchNormPass",
    "CkptavgError",
    "DataOptions",
    "HubOptions",
    "InputError",
    "LoraOptions",
    "MismatchError",
    "OptionsError",
    "OutputError",
    "OutputOptions",
    "ReadOptions",
    "ScheduleError",
    "Selection",
    "SoupOptions",
    "__version__",
    "anneal",
    "average",
    "average_many",
    "bn_update",
    "build_plan",
    "ema",
    "inspect",
    "open_checkpoint",
    "open_checkpoints",
    "post_hoc_ema",
    "power_ema",
    "run_plan",
    "run_plans",
    "soup",
    "swa",
    "weighted",
]

_LAZY = {
    "average": "api",
    "average_many": "api",
    "bn_update": "api",
    "inspect": "api",
    "OutputOptions": "options",
    "ReadOptions": "options",
    "open_checkpoints": "api",
    "post_hoc_ema": "recipes",
    "soup": "recipes",
    "SoupOptions": "soups.options",
    "run_plan": "run.executor",
    "run_plans": "run.executor",
    "build_plan": "plan.plan",
    "BatchNormPass": "bn.statistics",
    "DataOptions": "bn.data",
    "HubOptions": "inputs.hub_options",
    "LoraOptions": "adapters.options",
    "open_checkpoint": "formats.readers",
}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")
