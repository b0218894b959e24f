"""Which tensors of a checkpoint are averaged: `include` and `exclude` rules on their names.

Names are matched as averaged (after `strip_prefix`), with `fnmatch` patterns
(`*`, `?`, `[...]`; case matters). With `include` rules, only the tensors one of
them matches are kept; `exclude` rules then remove the tensors they match. Each
checkpoint records what every rule matched, so that the plan can say it, and
warn of a rule that matches nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..errors import InputError, name_list, plural


@dataclass(frozen=True)
class RuleCount:
    """One rule, and how many tensors of one checkpoint it matched."""

    kind: str  # "include" or "exclude"
    pattern: str
    matched: int  # include: among all the names; exclude: among those the include rules kept

    @property
    def mention(self) -> str:
        return f"`{self.kind}={self.pattern}`"


@dataclass(frozen=True)
class Filtered:
    """What the rules did to one checkpoint."""

    total: int  # its tensors before the rules
    included: int  # those the include rules kept (all of them without include rules)
    rules: tuple[RuleCount, ...]


def filter_names(
    names: Sequence[str], include: Sequence[str], exclude: Sequence[str], label: str
) -> tuple[list[str], Filtered]:
    """The names the rules keep, in their order, and what each rule matched.

    Raises:
        InputError: the rules leave none of the names.
    """
    kept = list(names)
    rules = []
    if include:
        rules += [RuleCount("include", p, sum(fnmatchcase(n, p) for n in names)) for p in include]
        kept = [n for n in names if any(fnmatchcase(n, p) for p in include)]
    included = len(kept)
    rules += [RuleCount("exclude", p, sum(fnmatchcase(n, p) for n in kept)) for p in exclude]
    kept = [n for n in kept if not any(fnmatchcase(n, p) for p in exclude)]
    if names and not kept:
        raise InputError(
            f"{label}: {', '.join(rule.mention for rule in rules)} leave none of its "
            f"{plural(len(names), 'tensor')} ({name_list(names)}); names are matched after `strip_prefix`"
        )
    return kept, Filtered(len(names), included, tuple(rules))


def describe_rules(filtered: Sequence[Filtered]) -> list[str]:
    """What the rules removed over the checkpoints (a range where they differ): one line for the
    include rules together, one per exclude rule."""
    if not filtered or not filtered[0].rules:
        return []
    first = filtered[0].rules
    lines = []
    includes = [i for i, rule in enumerate(first) if rule.kind == "include"]
    if includes:
        kept = ", ".join(
            f"{first[i].mention} keeps {_span([f.rules[i].matched for f in filtered])}" for i in includes
        )
        lines.append(f"{kept}: {_removed([f.total - f.included for f in filtered])}")
    lines += [
        f"{rule.mention}: {_removed([f.rules[i].matched for f in filtered])}"
        for i, rule in enumerate(first)
        if rule.kind == "exclude"
    ]
    return lines


def unmatched_rules(filtered: Sequence[Filtered]) -> list[str]:
    """A warning for each rule that matches no tensor in any checkpoint."""
    if not filtered:
        return []
    first = filtered[0].rules
    with_include = any(rule.kind == "include" for rule in first)
    return [
        f"{rule.mention} matches no tensor"
        + (" that `include` keeps" if rule.kind == "exclude" and with_include else "")
        + " in any checkpoint (names are matched after `strip_prefix`)"
        for i, rule in enumerate(first)
        if all(f.rules[i].matched == 0 for f in filtered)
    ]


def _removed(counts: Sequence[int]) -> str:
    return f"{_span(counts)} {'tensor' if max(counts) == 1 else 'tensors'} removed"


def _span(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low} to {high}"
