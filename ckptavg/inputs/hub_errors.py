"""huggingface_hub's failures, and the Hub's misbehaviour, as one line that names the spec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import InputError
from .folders import HUB_PREFIX
from .hub_guard import HubMisbehaved
from .hub_options import HubOptions, HubSpec

# The HTTP clients huggingface_hub has used; their errors mean the Hub could not be reached.
_HTTP_LIBRARIES = {"httpx", "httpx2", "httpcore", "requests", "urllib3"}


@contextmanager
def hub_errors(spec: str, options: HubOptions, checkpoint=None) -> Iterator[None]:
    """huggingface_hub's typed failures as one line that names the spec and says what to do.

    `checkpoint` (with a `label`) names the checkpoint whose file failed, where there is one.
    """
    from huggingface_hub import errors

    hub = HubSpec.parse(spec) if spec.startswith(HUB_PREFIX) else None
    repo = hub.repo_id if hub else spec
    try:
        yield
    except InputError:
        raise
    except HubMisbehaved as e:
        raise InputError(f"{spec}: {e}") from e
    except json.JSONDecodeError as e:
        raise InputError(
            f"{spec}: the Hub at {options.endpoint} answered with something that is not valid JSON "
            f"({first_line(e)}); check HF_ENDPOINT, or try again later"
        ) from e
    except (errors.SafetensorsParsingError, errors.NotASafetensorsRepoError) as e:
        what = checkpoint.label if checkpoint else spec
        raise InputError(
            f"{spec}: {what} does not start with a safetensors header ckptavg can read ({first_line(e)}); "
            "the file is damaged or not safetensors"
        ) from e
    except errors.GatedRepoError as e:
        raise InputError(
            f"{spec}: {repo} is gated; request access on its page on the Hub, then pass "
            "`token` or set HF_TOKEN"
        ) from e
    except errors.RepositoryNotFoundError as e:
        raise InputError(
            f"{spec}: repository {repo} not found on {options.endpoint} (if it is private, "
            "pass `token` or set HF_TOKEN)"
        ) from e
    except errors.RevisionNotFoundError as e:
        raise InputError(f"{spec}: {repo} has no revision '{hub.revision if hub else '?'}'") from e
    except (errors.LocalEntryNotFoundError, errors.RevisionResolutionError, errors.OfflineModeIsEnabled) as e:
        if options.is_offline:
            raise InputError(
                f"{spec}: not in the cache {options.cache} (offline); run once without `offline` to fetch it"
            ) from e
        raise InputError(
            f"{spec}: cannot reach the Hub at {options.endpoint} and it is not in the cache; "
            "check the connection (or HF_ENDPOINT)"
        ) from e
    except errors.EntryNotFoundError as e:
        what = checkpoint.label if checkpoint else spec
        raise InputError(f"{spec}: a file of {what} is missing on the Hub ({first_line(e)})") from e
    except Exception as e:
        if not is_transport_error(e):
            raise
        raise InputError(
            f"{spec}: cannot read it from the Hub at {options.endpoint} ({first_line(e)}); "
            "check the connection, or pass `offline` to use the cache"
        ) from e


def is_transport_error(error: Exception) -> bool:
    """A failure to talk to the Hub, from huggingface_hub or the HTTP library under it."""
    from huggingface_hub import errors

    http_library = type(error).__module__.split(".")[0] in _HTTP_LIBRARIES
    return http_library or isinstance(error, (errors.HfHubHTTPError, ConnectionError, TimeoutError, OSError))


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
