"""How a soup is made: uniform or greedy, the score that gates it, and scores already measured."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..options import option
from ..schedules import Swa


@dataclass(frozen=True)
class SoupOptions:
    """The soup's method; `eval` is `package.module:callable` (or, from Python, a callable) taking the
    model with the candidate weights loaded and returning a float."""

    greedy: bool = option(
        False,
        group="Method",
        help="Greedy soup: add each ingredient, best first, only if the --eval score does not get worse "
        "[default: the uniform soup of every ingredient].",
    )
    eval: str | Callable | None = option(
        None,
        group="Method",
        metavar="SPEC",
        help="package.module:callable taking the model (built by --model, the candidate weights loaded) "
        "and returning a float (imported and run: only give code you trust).",
    )
    mode: str = option(
        "max",
        group="Method",
        choices=("max", "min"),
        show_default=True,
        help="Whether a larger (accuracy) or a smaller (loss) --eval score is better.",
    )
    scores: str | Path | None = option(
        None,
        group="Method",
        metavar="FILE",
        help="JSON of ingredient scores already measured ({name: score}, or a soup's recorded table); "
        "the others are measured.",
    )

    @property
    def eval_name(self) -> str | None:
        if self.eval is None or isinstance(self.eval, str):
            return self.eval
        return getattr(self.eval, "__qualname__", type(self.eval).__name__)


@dataclass(frozen=True)
class SoupSchedule(Swa):
    """Equal weights over the ingredients the soup kept."""

    greedy: bool = False
    mode: str = "max"
    eval: str | None = None
    ingredients: int = 0
    method = "soup"

    def params(self) -> dict:
        params: dict = {"greedy": self.greedy, "ingredients": self.ingredients}
        if self.eval is not None:
            params.update(eval=self.eval, mode=self.mode)
        return params
