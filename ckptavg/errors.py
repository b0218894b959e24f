"""Error types. Every failure a user can cause is a `CkptavgError` whose message
is one complete line: the file, the tensor, the cause and what to do."""

import unicodedata

SHOWN_NAMES = 5  # how many names an error lists before "and N more"
# Unicode categories that do not print as themselves: controls, format (bidi overrides), line breaks.
_UNPRINTABLE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def printable(text: str) -> str:
    """`text` with every character that would move the cursor, end a line or recolour the terminal
    escaped (`\\n`, `\\x1b`, `\\u202e`), so a tensor or file name cannot forge a line of output."""
    if text.isprintable():
        return text
    return "".join(
        char if unicodedata.category(char) not in _UNPRINTABLE else ascii(char)[1:-1] for char in text
    )


def name_list(names) -> str:
    """`'a', 'b' and 3 more`: the first few names, quoted, for a one-line message."""
    names = list(names)
    shown = ", ".join(f"'{n}'" for n in names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def plural(count: int, noun: str) -> str:
    """`1 checkpoint`, `3 checkpoints`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class CkptavgError(Exception):
    """Base class: the CLI prints the message as one line and exits non-zero."""


class OptionsError(CkptavgError):
    """The options given contradict each other, or one a run needs is missing."""


class InputError(CkptavgError):
    """An input is missing, unreadable or not a checkpoint ckptavg can read."""


class MismatchError(CkptavgError):
    """The inputs are not checkpoints of the same model (names, shapes or kinds differ)."""


class OutputError(CkptavgError):
    """The output cannot be written where or how it was asked for."""


class RankError(CkptavgError):
    """Another rank of a run under torchrun failed, or stopped answering; `rank` is which (-1: unknown)."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


class ScheduleError(CkptavgError):
    """A weight schedule got parameters it cannot work with."""


class NonFiniteError(InputError):
    """An input tensor holds NaN or Inf; `index` is its checkpoint's position in the plan."""

    def __init__(self, message: str, index: int, reason: str):
        super().__init__(message)
        self.index = index
        self.reason = reason
