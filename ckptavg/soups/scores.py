"""Ingredient scores measured before: a `--scores` JSON file, matched to the ingredients by name."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ..errors import InputError
from ..formats.readers import Checkpoint


def read_scores(path: str | Path, checkpoints: Sequence[Checkpoint]) -> dict[int, float]:
    """Checkpoint index -> score, for the ingredients the file names (by path, label or file name).

    The file holds `{name: score}`, or rows `[{"ingredient": name, "score": score}, ...]` as a
    soup's metadata records them.

    Raises:
        InputError: the file cannot be read, is not such JSON, or a score is not a number.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read the scores file ({e.strerror or e})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: the scores file is not JSON ({e})") from e
    if isinstance(content, list) and all(isinstance(row, dict) and "ingredient" in row for row in content):
        content = {row["ingredient"]: row.get("score") for row in content}
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object {{name: score}} or a soup's recorded rows")
    found = {}
    for i, ck in enumerate(checkpoints):
        names = (ck.origin, ck.label, PurePosixPath(ck.label).name, PurePosixPath(ck.label).stem)
        key = next((name for name in names if name in content), None)
        if key is None:
            continue
        value = content[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
            raise InputError(f"{path}: the score of '{key}' is not a finite number: {value!r}")
        found[i] = float(value)
    return found
