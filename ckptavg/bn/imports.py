"""`package.module:callable` specs: the only code ckptavg imports on a user's behalf.

`--model` and `--data` of bn-update name a model factory or a batch source this
way; nothing else a user gives (checkpoints included) is ever imported or run.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from ..errors import CkptavgError

# Shorthands: `torchvision:resnet50`, `timm:resnet50`.
_SHORTHANDS = {"torchvision": "torchvision.models"}


class ImportSpecError(CkptavgError):
    """An import spec names a module or attribute that cannot be loaded."""


def resolve_callable(spec: str, option: str) -> Callable:
    """The callable named by `package.module:name` (dots after the colon reach attributes).

    Raises:
        ImportSpecError: the module does not import, or has no such callable.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ImportSpecError(
            f"`{option}={spec}`: write it as package.module:callable, e.g. torchvision.models:resnet50"
        )
    module_name = _SHORTHANDS.get(module_name, module_name)
    try:
        target = _import_here(module_name)
    except ImportError as e:
        raise ImportSpecError(
            f"`{option}={spec}`: cannot import {module_name} ({e}); is it installed?"
        ) from e
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ImportSpecError(f"`{option}={spec}`: {module_name} has no '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise ImportSpecError(f"`{option}={spec}`: '{attribute}' is not callable")
    return target


def _import_here(module_name: str):
    """Import a module, also from the current folder (as `python -m` would)."""
    if os.getcwd() in sys.path or "" in sys.path:
        return importlib.import_module(module_name)
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(os.getcwd())


def build_model(spec: str, kwargs: dict):
    """A model with random weights from `--model`: never downloads pretrained weights.

    `timm:NAME` goes through `timm.create_model(NAME, pretrained=False)`; anything
    else is called with `kwargs`.
    """
    if spec.startswith("timm:"):
        create = resolve_callable("timm:create_model", "model")
        factory = lambda **kw: create(spec.split(":", 1)[1], pretrained=False, **kw)  # noqa: E731
    else:
        factory = resolve_callable(spec, "model")
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise ImportSpecError(f"`model={spec}`: building it failed: {type(e).__name__}: {e}") from e
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ImportSpecError(f"`model={spec}`: returned a {type(model).__name__}, not a torch.nn.Module")
    return model
