"""ckptavg: average model checkpoints (EMA, SWA, weighted) by streaming them.

    import ckptavg
    ckptavg.average(paths, ckptavg.ema(decay=0.9), out="ema.safetensors")

Heavy modules (torch) load on first use, so `ckptavg --help` starts fast.
"""

__version__ = "0.1.0"

from .errors import CkptavgError, InputError, MismatchError, OutputError, ScheduleError
from .schedules import ema, swa, weighted

__all__ = [
    "CkptavgError",
    "HubOptions",
    "InputError",
    "MismatchError",
    "OutputError",
    "ScheduleError",
    "__version__",
    "average",
    "build_plan",
    "ema",
    "open_checkpoint",
    "open_checkpoints",
    "run_plan",
    "swa",
    "weighted",
]

_LAZY = {
    "average": "api",
    "open_checkpoints": "api",
    "run_plan": "api",
    "build_plan": "plan",
    "HubOptions": "hub",
    "open_checkpoint": "readers",
}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")
