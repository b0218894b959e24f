"""How to reach the Hub (token, cache, offline, endpoint) and what an `hf://` spec says."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..options import option

_SPEC = re.compile(
    r"^hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>refs/(?:pr|convert)/[^/]+|[^/]+))?(?:/(?P<path>.*))?$"
)


_TRUE = ("1", "true", "yes", "on")


_DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubOptions:
    """How to reach the Hub; anything left None follows huggingface_hub's environment.

    Attributes:
        token: access token; default: `HF_TOKEN` or the token saved by `hf auth login`.
        cache_dir: the cache folder; default: `HF_HUB_CACHE`, else `HF_HOME/hub`.
        offline: use the cache only; default: `HF_HUB_OFFLINE`.
        stream: read safetensors checkpoints by range requests, writing nothing to the cache
            (which the next run could reuse) and needing no disk for them.
        progress: show download progress bars.
    """

    token: str | None = option(
        None,
        group="Hugging Face Hub",
        metavar="TOKEN",
        help="Hub access token [default: HF_TOKEN, or hf auth login's].",
    )
    cache_dir: str | os.PathLike | None = option(
        None,
        group="Hugging Face Hub",
        metavar="DIR",
        help="Hub cache folder [default: HF_HUB_CACHE, or HF_HOME/hub].",
    )
    offline: bool | None = option(
        None, group="Hugging Face Hub", help="Use only the Hub cache, no network (also HF_HUB_OFFLINE=1)."
    )
    stream: bool = option(
        False,
        group="Hugging Face Hub",
        help="Read Hub safetensors by range requests while averaging: nothing is downloaded to the cache.",
    )
    progress: bool = False

    @property
    def is_offline(self) -> bool:
        if self.offline is not None:
            return self.offline
        return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE

    @property
    def cache(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        if os.environ.get("HF_HUB_CACHE"):
            return Path(os.environ["HF_HUB_CACHE"]).expanduser()
        home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
        return Path(home).expanduser() / "hub"

    @property
    def endpoint(self) -> str:
        # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is first imported.
        return os.environ.get("HF_ENDPOINT", _DEFAULT_ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: str | None
    path: str

    @classmethod
    def parse(cls, spec: str) -> HubSpec:
        match = _SPEC.match(spec.replace("%2F", "/"))
        if not match:
            raise InputError(f"{spec}: not a Hub path; write hf://ORG/REPO[@REVISION][/PATH]")
        return cls(match["repo"], match["revision"], (match["path"] or "").strip("/"))
