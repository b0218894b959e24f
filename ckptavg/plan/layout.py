"""The output's layout: one file, a torch file (or the last input's own archive, `like_last`), a
Hugging Face folder of shards, or a DCP folder; and whether the target may be written at all (never
an input, never a folder ckptavg did not write, replaced only with force, keeping the files a user
added to an old folder output)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..formats.dcp import METADATA_NAME, DcpCheckpoint
from ..formats.dcp_metadata import read_metadata
from ..formats.readers import Checkpoint
from ..inputs.folders import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHT_NAMES, model_name
from ..inputs.side_files import allowed_root, find_side_files
from ..units import parse_size
from .like_last import LIKE_LAST_SUFFIXES, LikeLast, plan_like_last
from .tensors import OutputFile, TensorPlan

INDEX_NAME = "model.safetensors.index.json"
# A folder output's weights keep the name the last input's library gave them, so its own loader finds
# them (diffusers looks for diffusion_pytorch_model.safetensors, accelerate for model_1.safetensors).
_KEPT_MODEL_NAMES = re.compile(r"^(model|diffusion_pytorch_model|model_\d+)$")
_INDEX_SUFFIX = ".safetensors.index.json"
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
TORCH_OUTPUT_SUFFIXES = (".pt", ".pth", ".bin")
_LIKE_LAST_NAMES = (*TORCH_OUTPUT_SUFFIXES, *LIKE_LAST_SUFFIXES)
DEFAULT_FOLDER_SHARD_SIZE = "50GB"
VERSION_KEY = "ckptavg.version"
COPIED_KEY = "ckptavg.copied"  # the side files a folder output holds, so a later --force knows them
DCP_DATA_NAME = "__0_0.distcp"  # a DCP output's one data file, named as DCP names rank 0's
DCP_PROVENANCE_KEY = "ckptavg"  # a DCP output's bytes item holding the provenance
_SHARD_PATTERN = re.compile(r"^[\w.]+-\d{5}-of-\d{5}\.safetensors$")


def weights_name(checkpoint: Checkpoint) -> str:
    """What a folder output calls its weights: the last input's model name where a library chose it
    (`diffusion_pytorch_model`, accelerate's `model_1`), else `model` (transformers' name)."""
    if checkpoint.path is None:
        return "model"
    name = model_name(checkpoint.path.name)
    return name if _KEPT_MODEL_NAMES.match(name) else "model"


def index_name(base: str) -> str:
    return base + _INDEX_SUFFIX


def kept_files(folder: Path, replaced: set[str]) -> list[str]:
    """The files of an old ckptavg folder output that ckptavg did not write, and the new one does not
    replace: what a user added (evaluation results, notes). Kept by `force`."""
    if not folder.is_dir():
        return []
    ours = _files_written_by_ckptavg(folder)
    return sorted(p.name for p in folder.iterdir() if p.name not in ours and p.name not in replaced)


def _files_written_by_ckptavg(folder: Path) -> set[str]:
    """The weights, index and copied side files of a ckptavg folder output, as its metadata lists them."""
    found = _written_weights(folder)
    ours = {ADAPTER_CONFIG_NAME, *ADAPTER_WEIGHT_NAMES, METADATA_NAME, DCP_DATA_NAME}
    if found is not None:
        ours.add(found.name)
    ours.update(p.name for p in folder.iterdir() if _SHARD_PATTERN.match(p.name))
    with contextlib.suppress(ValueError, TypeError):
        ours.update(copied_files(_output_metadata(folder) or {}))
    if found is not None and found.name.endswith(_INDEX_SUFFIX):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            index = json.loads(found.read_text(encoding="utf-8"))
            ours.update(v for v in index.get("weight_map", {}).values() if isinstance(v, str))
    return ours


def copied_files(metadata: dict) -> set[str]:
    """The side files an output's metadata records as copied beside its weights.

    Raises:
        ValueError: the record is not JSON.
    """
    return {name for name in json.loads(metadata.get(COPIED_KEY, "[]")) if isinstance(name, str)}


def _written_weights(folder: Path) -> Path | None:
    """The index or single weights file of a folder output (whatever its model's name), if any."""
    names = sorted(p.name for p in folder.iterdir())
    for name in names:
        if name.endswith(_INDEX_SUFFIX):
            return folder / name
    for name in names:
        if name.endswith(".safetensors") and not _SHARD_PATTERN.match(name):
            return folder / name
    return None


def check_target(target: Path, *, folder: bool, force: bool) -> None:
    """Refuse an output that would replace something without `force`, or that is not ours to replace.

    Raises:
        OutputError: with what to do instead.
    """
    if _URL_LIKE.match(str(target)):  # a path made from s3://... keeps one slash: s3:/...
        raise OutputError(
            f"{str(target).replace(':/', '://', 1)}: this output is written to local paths only "
            "(URLs take .safetensors files and folders of averages); write it here, then upload it"
        )
    if not target.exists() and not target.is_symlink():
        return
    if folder:
        if not target.is_dir():
            raise OutputError(f"{target}: exists and is not a folder; choose another output folder")
        contents = list(target.iterdir())
        if not contents:
            return
        if not _written_by_ckptavg(target) or any(not p.is_file() for p in contents):
            raise OutputError(
                f"{target}: holds files that ckptavg did not write; write to a new or empty folder"
            )
        if not force:
            raise OutputError(f"{target}: already holds a checkpoint; pass `force` to replace it")
        return
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; for a folder output end the path with '/'")
    if not force:
        raise OutputError(f"{target}: already exists; pass `force` to replace it")


def _written_by_ckptavg(folder: Path) -> bool:
    """Whether a folder holds a checkpoint whose metadata says ckptavg wrote it."""
    return VERSION_KEY in (_output_metadata(folder) or {})


def _output_metadata(folder: Path) -> dict | None:
    """The metadata of the checkpoint in a folder output (its index's, or its single file's)."""
    try:
        if (folder / METADATA_NAME).is_file():  # a DCP output: its provenance is a bytes item
            written = DCP_PROVENANCE_KEY in read_metadata(folder / METADATA_NAME).others
            return {VERSION_KEY: "dcp"} if written else None
        found = _written_weights(folder)  # a model's (whatever its name), or an averaged adapter's
        if found is None or not found.is_file():
            return None
        if found.name.endswith(_INDEX_SUFFIX):
            metadata = json.loads(found.read_text(encoding="utf-8")).get("metadata", {})
            return metadata if isinstance(metadata, dict) else None
        from safetensors import safe_open

        with safe_open(found, framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # unreadable: not ours to replace
        return None


@dataclass(frozen=True)
class Layout:
    """Where and how the output is written."""

    output: Path
    folder: bool = False
    torch_output: bool = False
    wrap_key: str | None = None
    like_last: LikeLast | None = None  # the last input's torch archive with the averages put in place
    dcp: bool = False  # a torch.distributed.checkpoint folder
    dcp_key: str | None = None  # the nested state dict its tensors go under (the last input's)
    files: tuple[OutputFile, ...] = ()
    index_name: str = INDEX_NAME  # the shard index of a folder output, named after its weights
    shard_size: int | None = None
    extra_files: tuple[Path, ...] = ()  # the last input's config and tokenizer files, for a folder
    extra_root: Path | None = None  # where they may really live (see inputs.side_files)
    kept: tuple[str, ...] = ()  # files of a replaced folder output that stay
    stale: tuple[str, ...] = ()  # objects of a replaced URL folder output that the new one lacks
    warnings: tuple[str, ...] = ()  # side files left out
    remote: Any = None  # a URL output's `remote_layout.RemoteTarget`


def lay_out(
    checkpoints: Sequence[Checkpoint],
    tensors: Sequence[TensorPlan],
    output: str | os.PathLike,
    *,
    force: bool,
    max_shard_size: int | str | None,
    wrap_key: str | None,
    like_last: bool = False,
    format: str | None = None,
) -> Layout:
    """The layout of an output of `tensors` at `output`, once the target is seen to be writable.

    `format="dcp"` (or a folder holding a DCP output ckptavg wrote) writes a DCP folder.

    Raises:
        OutputError: the name does not say a format, the target is an input, or it may not be replaced.
    """
    text = os.fspath(output)
    target = Path(text)
    if format not in (None, "safetensors", "dcp"):
        raise OutputError(f"`format` must be safetensors or dcp, got {format}")
    if format == "dcp" or (format is None and _written_as_dcp(target)):
        return _dcp_layout(checkpoints, tensors, target, force, max_shard_size, wrap_key, like_last)
    folder = text.endswith(("/", os.sep)) or target.is_dir()
    implied = None if like_last else next((s for s in LIKE_LAST_SUFFIXES if text.endswith(s)), None)
    like = like_last or implied is not None
    torch_output = not folder and not like and target.suffix in TORCH_OUTPUT_SUFFIXES
    if not folder and max_shard_size is not None:
        raise OutputError(
            f"{target}: `max_shard_size` writes shards into a folder; give `output={target.with_suffix('')}/`"
        )
    if like and (folder or not target.name.endswith(_LIKE_LAST_NAMES)):
        raise OutputError(
            f"{target}: `like_last` writes a torch file: give a file ending in {', '.join(_LIKE_LAST_NAMES)}"
        )
    if like and wrap_key is not None:
        raise OutputError(
            f"{target}: `wrap_key` contradicts `like_last`{f' (implied by {implied})' if implied else ''}, "
            "which keeps the last input's own layout: leave out `wrap_key`, or write a .pt file"
        )
    if not folder and not torch_output and not like and target.suffix != ".safetensors":
        raise OutputError(
            f"{target}: give a file ending in .safetensors, {', '.join(_LIKE_LAST_NAMES)}, "
            "or a folder ending in '/'"
        )
    if wrap_key is not None and not torch_output:
        raise OutputError(
            f"{target}: `wrap_key` applies to torch outputs ({', '.join(TORCH_OUTPUT_SUFFIXES)})"
        )
    _refuse_input_as_output(checkpoints, target, folder)
    check_target(target, folder=folder, force=force)
    if not folder:
        files = (OutputFile(target.name, tuple(tensors)),)
        planned = plan_like_last(checkpoints[-1], tensors, target, implied) if like else None
        return Layout(target, torch_output=torch_output, wrap_key=wrap_key, like_last=planned, files=files)
    last = checkpoints[-1]
    root = allowed_root(last.folder, last.label) if last.folder is not None else None
    extra_files, skipped = find_side_files(last.folder, root) if root is not None else ([], [])
    limit = parse_size(max_shard_size if max_shard_size is not None else DEFAULT_FOLDER_SHARD_SIZE)
    base = weights_name(last)
    files = _shards(tensors, limit, base)
    written = {f.name for f in files} | {p.name for p in extra_files} | {index_name(base)}
    return Layout(
        target,
        folder=True,
        files=files,
        index_name=index_name(base),
        shard_size=limit,
        extra_files=tuple(extra_files),
        extra_root=root,
        kept=tuple(kept_files(target, written)) if target.is_dir() else (),
        warnings=tuple(skipped),
    )


def _written_as_dcp(target: Path) -> bool:
    return target.is_dir() and (target / METADATA_NAME).is_file() and _written_by_ckptavg(target)


def _dcp_layout(
    checkpoints, tensors, target: Path, force: bool, max_shard_size, wrap_key, like_last
) -> Layout:
    """A DCP folder: one data file, the tensors under the last input's nested state dict, if any."""
    given = next(
        (name for name, value in (("max_shard_size", max_shard_size), ("wrap_key", wrap_key)) if value), None
    )
    if given or like_last:
        raise OutputError(f"{target}: `format=dcp` writes a DCP folder; leave out `{given or 'like_last'}`")
    _refuse_input_as_output(checkpoints, target, True)
    check_target(target, folder=True, force=force)
    last = checkpoints[-1]
    file = last.file_of(next(iter(last.tensors)))[0] if last.tensors else None
    return Layout(
        target,
        folder=True,
        dcp=True,
        dcp_key=file.key if isinstance(file, DcpCheckpoint) else None,
        files=(OutputFile(DCP_DATA_NAME, tuple(tensors)),),
        kept=tuple(kept_files(target, {DCP_DATA_NAME, METADATA_NAME})) if target.is_dir() else (),
    )


def _shards(tensors: Sequence[TensorPlan], limit: int, base: str) -> tuple[OutputFile, ...]:
    """Tensors in order, cut into files of at most `limit` bytes (a larger tensor gets a file alone)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = tensor.entry.nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    if len(shards) == 1:
        return (OutputFile(f"{base}.safetensors", tuple(shards[0])),)
    count = len(shards)
    return tuple(
        OutputFile(f"{base}-{i:05d}-of-{count:05d}.safetensors", tuple(s)) for i, s in enumerate(shards, 1)
    )


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
