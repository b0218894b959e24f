"""`hf://` inputs: checkpoints on the Hugging Face Hub, through `huggingface_hub` and its cache.

Spec syntax, as `huggingface_hub`'s own paths: `hf://ORG/REPO[@REVISION][/PATH]`.
The revision is a branch, tag, commit or `refs/pr/N`, and may be a glob over the
repo's branches and tags (`@step14*`); PATH is a folder or weights file at that
revision, and may be a glob over them (`checkpoint-*`). Without PATH the
checkpoint at the repo root is used. Folders are read as local ones are (see
`folders.checkpoints_in_folder`).

Resolution happens in two steps, so the disk-space check sees everything first:
`_locate` resolves each revision to its commit and lists the files to fetch
(only the weights, their index, and the model folder's config files; never
optimizer or trainer state), then `_download` fetches them with
`snapshot_download` into the standard cache, concurrently, and reuses whatever
is cached. With `stream`, safetensors checkpoints are instead read where they are,
by range requests through huggingface_hub's own file system (`HfFileSystem`), at
the resolved commit: nothing is written to the cache. Offline (`--offline` or
`HF_HUB_OFFLINE=1`), revisions and listings come from the cache alone. What is
trusted of the Hub's answers, and the deadlines of its requests, are
`hub_guard`'s; its failures as one line, `hub_errors`'.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path, PurePosixPath

from ..disk import free_space
from ..errors import InputError
from ..formats import dtypes
from ..formats.dtypes import TensorInfo
from ..formats.readers import INDEX_SUFFIX
from ..formats.remote_files import RemoteObject
from ..units import format_bytes
from .folders import (
    GLOB_CHARS,
    HF_CONFIG_NAME,
    HUB_PREFIX,
    Source,
    checkpoints_in_folder,
    is_model_side_file,
    natural_key,
)
from .hub_errors import first_line, hub_errors
from .hub_guard import COMMIT_ID, unsafe_reason, watched_hub_session
from .hub_options import HubOptions, HubSpec

_SAFETENSORS_WEIGHTS = (".safetensors", ".safetensors" + INDEX_SUFFIX)


@dataclass
class _Checkpoint:
    """One checkpoint found on the Hub, before its files are fetched."""

    repo_id: str
    revision: object  # a huggingface_hub ResolvedRevision: the name asked for and its commit
    weights: str  # the weights file or index, relative to the repo root
    files: dict[str, int | None] = field(default_factory=dict)  # what to fetch -> size

    @property
    def label(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}@{self.revision}/{self.weights}"

    @property
    def origin(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}@{self.revision.resolved}/{self.weights}"


def resolve_hub_specs(
    specs: Sequence[str], options: HubOptions, *, fetch: bool = True, weights_name: str | None = None
) -> list[list[Source]]:
    """The checkpoints of each `hf://` spec, fetched into the cache: one list of sources per spec.

    With `fetch=False`, safetensors checkpoints not yet in the cache are described by
    their headers instead (read with range requests), to plan without downloading.
    With `options.stream`, every checkpoint is a remote object read by ranges.

    Raises:
        InputError: one line naming the spec for every failure of the Hub or the cache.
    """
    if options.stream and options.is_offline:
        raise InputError(
            f"{specs[0]}: `stream` reads from the Hub, which `offline` forbids; leave out one of them"
        )
    with watched_hub_session():
        located = []
        for spec in specs:
            with hub_errors(spec, options):
                located.append(_locate(HubSpec.parse(spec), spec, options, weights_name))
        if options.stream:
            return [
                [_streamed(ck, spec, options) for ck in found]
                for spec, found in zip(specs, located, strict=True)
            ]
        _check_free_space([ck for found in located for ck in found], options)
        return [
            [
                _download(ck, spec, options)
                if fetch or not _plannable(ck, options)
                else _headers(ck, spec, options)
                for ck in found
            ]
            for spec, found in zip(specs, located, strict=True)
        ]


def _api(options: HubOptions):
    from huggingface_hub import HfApi

    return HfApi(endpoint=options.endpoint, token=options.token)


def _locate(hub: HubSpec, spec: str, options: HubOptions, weights_name: str | None) -> list[_Checkpoint]:
    api = _api(options)
    found = []
    for revision in _revisions(api, hub, spec, options):
        resolved = api.resolve_revision(
            hub.repo_id,
            revision=revision,
            cache_dir=options.cache,
            local_files_only=options.is_offline,
            token=options.token,
        )
        if not COMMIT_ID.fullmatch(resolved.resolved):
            raise InputError(
                f"{spec}: {_source(options)} resolved {revision or 'main'} to {resolved.resolved!r}, "
                "which is not a commit id (40 lowercase hex digits); refusing it"
            )
        sizes = _files_at(api, hub.repo_id, resolved, spec, options)
        for weights in _checkpoints_at(hub, sizes, spec, revision, weights_name):
            checkpoint = _Checkpoint(hub.repo_id, resolved, weights)
            checkpoint.files = _files_to_fetch(checkpoint, sizes, spec, options)
            found.append(checkpoint)
    return found


def _revisions(api, hub: HubSpec, spec: str, options: HubOptions) -> list[str | None]:
    if hub.revision is None or not GLOB_CHARS.search(hub.revision):
        return [hub.revision]
    if options.is_offline:
        named = [("ref", name) for name in _cached_refs(options.cache, hub.repo_id)]
    else:
        refs = api.list_repo_refs(hub.repo_id, include_pull_requests=True)
        named = [
            *(("branch", r.name) for r in refs.branches),
            *(("tag", r.name) for r in refs.tags),
            *(("pull request", r.ref) for r in refs.pull_requests or ()),
        ]
    names = [_require_safe(name, spec, f"{_source(options)} listed a {kind} named") for kind, name in named]
    matches = sorted({n for n in names if fnmatchcase(n, hub.revision)}, key=natural_key)
    if not matches:
        where = "in the cache" if options.is_offline else "on the Hub"
        known = ", ".join(sorted(names, key=natural_key)[:8]) or "none"
        raise InputError(
            f"{spec}: no branch or tag of {hub.repo_id} {where} matches '{hub.revision}' (there: {known})"
        )
    return matches


def _cached_refs(cache: Path, repo_id: str) -> list[str]:
    refs = cache / f"models--{repo_id.replace('/', '--')}" / "refs"
    return [str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()] if refs.is_dir() else []


def _files_at(api, repo_id: str, revision, spec: str, options: HubOptions) -> dict[str, int]:
    """Every file of the repo at the revision's commit, with its size (from the cache when offline)."""
    from huggingface_hub import RepoFile, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    if not options.is_offline:
        entries = api.list_repo_tree(repo_id, recursive=True, revision=revision.resolved)
        return _checked_sizes({e.path: e.size for e in entries if isinstance(e, RepoFile)}, spec, options)
    try:
        entries = get_cached_repo_tree(repo_id, revision=revision.resolved, cache_dir=options.cache)
    except CachedRepoTreeNotFoundError:
        snapshot = options.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision.resolved
        if not snapshot.is_dir():
            raise InputError(
                f"{HUB_PREFIX}{repo_id}@{revision}: not in the cache {options.cache} (offline); "
                "run once without `offline` to fetch it"
            ) from None
        files = {
            p.relative_to(snapshot).as_posix(): p.stat().st_size for p in snapshot.rglob("*") if p.is_file()
        }
        return _checked_sizes(files, spec, options)
    return _checked_sizes({e.path: e.size for e in entries}, spec, options)


def _checked_sizes(sizes: dict, spec: str, options: HubOptions) -> dict[str, int]:
    """The listing, if every path is a safe relative name and every size a byte count."""
    for path, size in sizes.items():
        _require_safe(path, spec, f"{_source(options)} listed a file named")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InputError(
                f"{spec}: {_source(options)} listed {path!r} with size {size!r}, which is not a byte count; "
                "refusing it"
            )
    return sizes


def _source(options: HubOptions) -> str:
    """Who told ckptavg a name: the Hub, or the cache when offline."""
    return f"the cache {options.cache}" if options.is_offline else "the Hub"


def _require_safe(name, spec: str, told: str) -> str:
    """The name, if it can be used as a path inside the cache; else one line that says what is wrong."""
    reason = unsafe_reason(name)
    if reason:
        raise InputError(f"{spec}: {told} {name!r}, which is not a safe name ({reason}); refusing it")
    return name


def _checkpoints_at(
    hub: HubSpec, sizes: dict[str, int], spec: str, revision, weights_name: str | None
) -> list[str]:
    """The weights files (or indexes) the spec's PATH names at one revision."""
    folders = {str(parent) for path in sizes for parent in PurePosixPath(path).parents if str(parent) != "."}
    listing = _listing(sizes, folders)
    at = f"{HUB_PREFIX}{hub.repo_id}@{revision or 'main'}"
    if not GLOB_CHARS.search(hub.path):
        targets = [hub.path]
        if hub.path and hub.path not in sizes and hub.path not in folders:
            raise InputError(f"{spec}: {at} has no file or folder '{hub.path}'")
    else:
        depth = hub.path.count("/")
        targets = sorted(
            (p for p in (*sizes, *folders) if p.count("/") == depth and fnmatchcase(p, hub.path)),
            key=natural_key,
        )
        if not targets:
            raise InputError(f"{spec}: nothing at {at} matches '{hub.path}'")
    found = []
    for target in targets:
        if target in sizes:
            found.append(target)
        else:
            label = f"{at}/{target}".rstrip("/")
            found.extend(checkpoints_in_folder(target, listing, label, weights_name))
    return found


def _listing(sizes: dict[str, int], folders: set[str]):
    """A `folders.Listing` over the repo's paths: the names directly inside a folder."""

    def children(paths, folder: str) -> list[str]:
        parent = folder or "."
        return [PurePosixPath(p).name for p in paths if str(PurePosixPath(p).parent) == parent]

    return lambda folder: (children(sizes, folder), children(folders, folder))


def _files_to_fetch(checkpoint: _Checkpoint, sizes: dict[str, int], spec: str, options: HubOptions) -> dict:
    """The weights (all shards of an index) and, for a model folder, its config and tokenizer files."""
    folder = str(PurePosixPath(checkpoint.weights).parent)
    prefix = "" if folder == "." else folder + "/"
    wanted = [checkpoint.weights]
    if checkpoint.weights.endswith(INDEX_SUFFIX):
        wanted += [prefix + shard for shard in sorted(set(_weight_map(checkpoint, spec, options).values()))]
    siblings = [p for p in sizes if str(PurePosixPath(p).parent) == folder]
    if prefix + HF_CONFIG_NAME in sizes:
        wanted += [p for p in siblings if is_model_side_file(p.rsplit("/", 1)[-1])]
    missing = [p for p in wanted if p not in sizes]
    if missing:
        raise InputError(f"{checkpoint.label}: names {missing[0]}, which is not in the repo at that revision")
    return {p: sizes[p] for p in wanted}


def _weight_map(checkpoint: _Checkpoint, spec: str, options: HubOptions) -> dict[str, str]:
    """The shard index's tensor -> file map, if it is one and names only safe relative files."""
    if options.stream:
        index = _file_system(options).cat_file(_streamed_path(checkpoint, checkpoint.weights))
    else:
        index = Path(_fetch_one(checkpoint, checkpoint.weights, options)).read_bytes()
    try:
        weight_map = json.loads(index.decode("utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{spec}: {checkpoint.label} is not a valid shard index ({first_line(e)})") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(
            f"{spec}: the weight_map of {checkpoint.label} is not a mapping of tensor names to file names; "
            "refusing it"
        )
    for shard in set(weight_map.values()):
        _require_safe(shard, spec, f"the shard index {checkpoint.label} lists a file named")
    return weight_map


def _fetch_one(checkpoint: _Checkpoint, filename: str, options: HubOptions) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(
        checkpoint.repo_id,
        filename,
        revision=checkpoint.revision,
        cache_dir=options.cache,
        token=options.token,
        local_files_only=options.is_offline,
        endpoint=options.endpoint,
    )


def _file_system(options: HubOptions):
    """huggingface_hub's fsspec file system for the Hub the options reach (one per endpoint and token)."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem(endpoint=options.endpoint, token=options.token)


def _streamed_path(checkpoint: _Checkpoint, path: str) -> str:
    return f"{checkpoint.repo_id}@{checkpoint.revision.resolved}/{path}"


def _streamed(checkpoint: _Checkpoint, spec: str, options: HubOptions) -> Source:
    """The checkpoint as a remote object at its resolved commit, to be read by ranges."""
    if not checkpoint.weights.endswith(_SAFETENSORS_WEIGHTS):
        raise InputError(
            f"{checkpoint.label}: `stream` reads safetensors checkpoints only; leave out `stream` to "
            "download this one to the cache"
        )
    remote = RemoteObject(
        _file_system(options),
        _streamed_path(checkpoint, checkpoint.weights),
        checkpoint.label,
        immutable=True,
    )
    return Source(None, checkpoint.label, checkpoint.origin, remote=remote)


def _check_free_space(checkpoints: Sequence[_Checkpoint], options: HubOptions) -> None:
    needed = sum(
        size or 0 for ck in checkpoints for path, size in ck.files.items() if not _cached(ck, path, options)
    )
    if needed == 0:
        return
    free = free_space(options.cache)
    if needed > free:
        streamable = all(ck.weights.endswith(_SAFETENSORS_WEIGHTS) for ck in checkpoints)
        raise InputError(
            f"the Hub inputs need {format_bytes(needed)} in the cache {options.cache} but only "
            f"{format_bytes(free)} is free there; "
            + (
                "pass `stream` to read them by range requests with nothing in the cache, or "
                if streamable
                else ""
            )
            + "free some space or choose another cache with `cache_dir`"
        )


def _download(checkpoint: _Checkpoint, spec: str, options: HubOptions) -> Source:
    from huggingface_hub import snapshot_download

    with hub_errors(spec, options, checkpoint):
        if options.is_offline:
            _require_cached(checkpoint, options)
        folder = snapshot_download(
            checkpoint.repo_id,
            revision=checkpoint.revision,
            allow_patterns=list(checkpoint.files),
            cache_dir=options.cache,
            token=options.token,
            local_files_only=options.is_offline,
            endpoint=options.endpoint,
            tqdm_class=None if options.progress else _quiet_tqdm(),
        )
    return Source(Path(folder) / checkpoint.weights, checkpoint.label, checkpoint.origin)


def _plannable(checkpoint: _Checkpoint, options: HubOptions) -> bool:
    """Whether the checkpoint can be planned from headers alone: safetensors, and not all cached."""
    weights = [p for p in checkpoint.files if not is_model_side_file(PurePosixPath(p).name)]
    safetensors = all(p.endswith(_SAFETENSORS_WEIGHTS) for p in weights)
    return (
        safetensors and not options.is_offline and not all(_cached(checkpoint, p, options) for p in weights)
    )


def _headers(checkpoint: _Checkpoint, spec: str, options: HubOptions) -> Source:
    """The checkpoint's safetensors headers, read from the Hub with range requests."""
    api = _api(options)
    headers = {}
    with hub_errors(spec, options, checkpoint):
        for path in checkpoint.files:
            if not path.endswith(".safetensors"):
                continue
            header = api.parse_safetensors_file_metadata(
                checkpoint.repo_id, path, revision=checkpoint.revision.resolved
            )
            tensors = {}
            for name, info in header.tensors.items():
                if not dtypes.is_known(info.dtype):
                    raise InputError(
                        f"{checkpoint.label}: tensor '{name}' has dtype {info.dtype}, "
                        "which ckptavg cannot average"
                    )
                tensors[name] = TensorInfo(info.dtype, tuple(info.shape))
            headers[PurePosixPath(path).name] = (tensors, dict(header.metadata or {}))
        is_index = checkpoint.weights.endswith(INDEX_SUFFIX)
        weight_map = _weight_map(checkpoint, spec, options) if is_index else None
    return Source(None, checkpoint.label, checkpoint.origin, headers=(headers, weight_map))


def _cached(checkpoint: _Checkpoint, path: str, options: HubOptions) -> bool:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(
        checkpoint.repo_id, path, cache_dir=options.cache, revision=checkpoint.revision.resolved
    )
    return isinstance(cached, str)


def _require_cached(checkpoint: _Checkpoint, options: HubOptions) -> None:
    for path in checkpoint.files:
        if not _cached(checkpoint, path, options):
            raise InputError(
                f"{HUB_PREFIX}{checkpoint.repo_id}@{checkpoint.revision}: {path} is not in the cache "
                f"{options.cache} (offline); run once without `offline` to fetch it"
            )


@cache
def _quiet_tqdm():
    """A tqdm class that shows nothing, for downloads with --quiet."""
    from tqdm.auto import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    return Quiet
