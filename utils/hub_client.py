"""How a Hub call fails: within a bounded wait, and as one line that names the repo and what to do.

huggingface_hub's HTTP client waits forever for an answer (``timeout=None``), so a Hub that
accepts a connection and never answers would hang a push, and with it a cluster job. Every script
bounds the wait (``bound_hub_waits``, called by ``run_cli``); a push or download that fails
(an HTTP error after the library's own retries, a dropped connection, a time-out) becomes a
``HubError`` through ``hub_errors``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from .errors import UsageError

HUB_TIMEOUT_ENV = "LANGUAGE_TICKETS_HUB_TIMEOUT"  # seconds without an answer before a Hub call fails
DEFAULT_HUB_TIMEOUT = 120.0


class HubError(UsageError):
    """A Hub operation failed; the message names the repo and what to do."""


def invalid_repo_id(repo_id: str) -> Optional[str]:
    """Why ``repo_id`` breaks huggingface_hub's rules for repo ids, or None when it keeps them."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return str(err)
    return None


def hub_timeout() -> float:
    """Seconds a Hub call may wait for its answer: ``$LANGUAGE_TICKETS_HUB_TIMEOUT``, or 120."""
    value = os.environ.get(HUB_TIMEOUT_ENV, "")
    if not value:
        return DEFAULT_HUB_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UsageError(f"{HUB_TIMEOUT_ENV}={value!r} is not a number of seconds: expected a positive number such as 120")
    return seconds


def bound_hub_waits() -> None:
    """Make huggingface_hub's shared HTTP client give up after ``hub_timeout()`` seconds without an
    answer (calls that pass their own time-out, such as downloads, keep it)."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    seconds = hub_timeout()
    library_default = _http.default_client_factory  # keeps the library's hooks (offline mode, request ids)

    def bounded_client():
        client = library_default()
        client.timeout = seconds
        return client

    set_client_factory(bounded_client)


def explain_hub_error(err: Exception, repo_id: str, action: str) -> HubError:
    """The one-line error for a failed Hub call: what failed, on which repo, and what to do."""
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    retry = "then re-run: finished steps are skipped and a push that landed is not made twice"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, LocalEntryNotFoundError):  # huggingface_hub's answer to a look-up that could not reach the Hub
        return HubError(f"cannot {action} {repo_id}: the Hub could not be reached and no copy is cached "
                        f"({str(err).splitlines()[0]}); check your network and HF_ENDPOINT, {retry}")
    if isinstance(err, httpx2.TimeoutException):
        return HubError(f"cannot {action} {repo_id}: the Hub did not answer within {hub_timeout():g} s ({type(err).__name__}); "
                        f"check your network and HF_ENDPOINT (or raise {HUB_TIMEOUT_ENV}), {retry}")
    if isinstance(err, httpx2.TransportError):
        return HubError(f"cannot {action} {repo_id}: the connection to the Hub failed ({type(err).__name__}: {err}); "
                        f"check your network and HF_ENDPOINT, {retry}")
    if isinstance(err, RepositoryNotFoundError) or status == 404:
        hint = "check the repo id, and that your token can see it"
    elif status in (401, 403):
        hint = "log in with `hf auth login` or set HF_TOKEN to a token with write access"
    else:
        hint = f"check your network and HF_ENDPOINT, {retry}"
    return HubError(f"cannot {action} {repo_id} (HTTP {status or '?'}: {type(err).__name__}): {hint}")


@contextlib.contextmanager
def hub_errors(repo_id: str, action: str) -> Iterator[None]:
    """Turn the Hub's failures inside the block (HTTP errors, missing repos, dropped connections,
    time-outs) into one ``HubError``. A file the Hub says it lacks (``RemoteEntryNotFoundError``)
    is left for the caller to explain; one that could not be looked up and is not cached
    (``LocalEntryNotFoundError``: huggingface_hub's answer to a failed connection) is a Hub failure,
    never "no such file". Anything else is a bug and keeps its traceback."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError

    try:
        yield
    except RemoteEntryNotFoundError:
        raise
    except (HfHubHTTPError, RepositoryNotFoundError, LocalEntryNotFoundError, httpx2.TransportError) as err:
        raise explain_hub_error(err, repo_id, action) from err


def check_repo_id(repo_id: str, flag: str) -> str:
    """A repo id to push to, checked by huggingface_hub's rules before any work: one line otherwise."""
    if why := invalid_repo_id(repo_id):
        raise UsageError(f"{flag} {repo_id!r} is not a valid repo id ({why}): expected ORG/NAME or NAME")
    return repo_id


def checkpoint_file(source: str, revision: str, filename: str) -> Optional[Path]:
    """A file of a model: in its local folder, or downloaded (and cached) from its Hub repo; None
    when the folder or repo has no such file."""
    if os.path.isdir(source):
        path = Path(source) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, filename, revision=revision))
    except EntryNotFoundError:  # remote 404, or (offline) not in the cache
        return None


def resolved_commit(source: str, revision: str) -> Optional[str]:
    """The commit a Hub model's revision resolves to (the snapshot holding its cached config.json),
    recorded with a ticket; None for a local folder."""
    if os.path.isdir(source):
        return None
    config = checkpoint_file(source, revision, "config.json")
    return config.parent.name if config else None
