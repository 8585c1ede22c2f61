"""Push an output folder to the Hugging Face Hub: a separate step after export, never inside the loop.

The token is whatever huggingface_hub finds (the argument, else HF_TOKEN, else the saved
login); sdtune only hands it to ``HfApi`` and never logs, prints or writes it.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import OfflineModeIsEnabled

from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

DEFAULT_IGNORE_PATTERNS = ("checkpoint-*", ".*", "logs/*")
BACKOFF_SECONDS = 2.0  # first wait; doubles on each retry
TRANSIENT_STATUS = (429, 500, 502, 503, 504)
T = TypeVar("T")


class HubError(SdtuneError):
    """The Hub refused the upload or could not be reached."""


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection/timeout errors of whichever HTTP client this huggingface_hub version uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


NETWORK_ERRORS = _network_errors()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)  # a seam: tests replace it


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, OfflineModeIsEnabled):  # a ConnectionError, but no retry will help
        return False
    if isinstance(err, HfHubHTTPError):
        return _status(err) in TRANSIENT_STATUS
    return isinstance(err, NETWORK_ERRORS)


def _with_retries(call: Callable[[], T], max_retries: int) -> T:
    """``call()``, retried with exponential backoff on connection errors, HTTP 429 and 5xx."""
    for attempt in range(max_retries + 1):
        try:
            return call()
        except Exception as err:
            if attempt == max_retries or not _is_transient(err):
                raise
            delay = BACKOFF_SECONDS * 2**attempt
            # Only the status or class name: an error's text may quote request details.
            reason = f"HTTP {_status(err)}" if _status(err) else type(err).__name__
            logger.warning("the Hub failed (%s); retry %d/%d in %.0f s", reason, attempt + 1, max_retries, delay)
            _sleep(delay)
    raise AssertionError("unreachable")


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload with sdtune",
    max_retries: int = 3,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = DEFAULT_IGNORE_PATTERNS,
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` if needed (and the branch ``revision``), then upload ``folder`` in one commit.

    Re-running is safe: an existing repo or branch is reused, and unchanged files are skipped.
    The local folder is only read.

    Args:
        folder: The output folder to upload (exports, model card, config).
        repo_id: ``user/name`` or ``org/name`` of a model repository.
        private: Create the repository private (an existing repository keeps its visibility).
        revision: Branch to commit to, created from main if missing (default: main).
        token: A Hub token with write access; default: HF_TOKEN, else the saved ``hf auth login``.
        commit_message: The commit's title.
        max_retries: Retries on connection errors, HTTP 429 and 5xx, waiting 2 s, 4 s, 8 s, ...
        allow_patterns: Upload only files matching these glob patterns (relative to ``folder``).
        ignore_patterns: Skip files matching these (default: checkpoints, hidden files, logs).
        endpoint: The Hub URL (default: HF_ENDPOINT, else https://huggingface.co).

    Returns:
        The URL of the commit on the Hub.

    Raises:
        HubError: If the folder is missing, the Hub refuses the token or the repository,
            or it stays unreachable after ``max_retries`` retries.
    """
    folder = Path(folder)
    retry = f"`{_push_command(folder, repo_id, private, revision, commit_message)}`"
    if not folder.is_dir():
        raise HubError(f"nothing to push: {folder} is not a folder; pass the output_dir of a finished run")
    api = HfApi(endpoint=endpoint, token=token)

    def attempt() -> tuple[str, str]:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision, commit_message=commit_message,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
        )
        return str(repo_url), info.commit_url

    try:
        repo_url, commit_url = _with_retries(attempt, max_retries)
    except OfflineModeIsEnabled as err:
        raise HubError(f"HF_HUB_OFFLINE is set, so nothing was uploaded: unset it and run {retry}") from err
    except HfHubHTTPError as err:
        raise HubError(_http_message(_status(err), err, repo_id, retry, max_retries, token)) from err
    except NETWORK_ERRORS as err:
        raise HubError(
            f"the Hub was unreachable ({type(err).__name__}) after {max_retries} retries; your files are untouched: "
            f"check the connection and run {retry}"
        ) from err
    logger.info("pushed %s to %s (commit %s)", folder, repo_url, commit_url)
    return commit_url


def _push_command(folder: Path, repo_id: str, private: bool, revision: str | None, commit_message: str) -> str:
    """The `sdtune push` command that repeats this upload, every option included (dropping --private
    would make a copied retry create a public repository); never the token."""
    parts = ["sdtune", "push", str(folder), "--repo_id", repo_id]
    if private:
        parts.append("--private")
    if revision:
        parts += ["--revision", revision]
    if commit_message != "Upload with sdtune":
        parts += ["--commit_message", commit_message]
    return shlex.join(parts)


def _http_message(
    status: int | None, err: HfHubHTTPError, repo_id: str, retry: str, max_retries: int, token: str | None
) -> str:
    if status == 401:
        return (
            f"the Hub refused the token (401): run `hf auth login` or set HF_TOKEN to a token with write access, "
            f"then run {retry}"
        )
    if status == 403:
        return f"the token may not write to {repo_id} (403): use a token with write access there and run {retry}"
    if status == 404:
        return f"the Hub found no repository or branch {repo_id} (404): check --repo_id and --revision, then run {retry}"
    if status in TRANSIENT_STATUS:
        return f"the Hub kept failing (HTTP {status}) after {max_retries} retries; files are untouched: run {retry} later"
    detail = (getattr(err, "server_message", None) or "").strip()
    if token:
        detail = detail.replace(token, "***")
    return f"the Hub rejected the upload (HTTP {status}{': ' + detail if detail else ''}): fix that and run {retry}"
