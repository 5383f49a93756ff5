"""LoRAs a user names by Hub id (`--allow-hub-loras`): checked, listed, then fetched once.

The user gives a model repository, `owner/name` (`hub_repo`), and the file's path in it
(`hub_file`) when it holds more than one `.safetensors` file. Both are checked against
strict patterns before anything is asked of the Hub, and neither ever becomes a local path.

1. `find_hub_lora` lists the repository once (`model_info`, with file sizes), at the commit
   its main branch points to now, and picks the one `.safetensors` file; its size is checked
   against the cap there, before any byte of it is downloaded.
2. `download_hub_lora` fetches exactly that file at that commit into a scratch folder that
   is deleted once its bytes are read. `pipelines.loras` then checks and stores the bytes as
   an upload of the session: same checks, owner, lifetime and byte budget.

No token is ever sent, so only public repositories can be fetched, whatever the server's
own Hugging Face login could read. huggingface_hub is imported inside the functions (see
`pipelines.hub`), and so the tests can stand in for its two calls.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import HubUnavailableError, InvalidRequestError, LoraRejectedError, megabytes
from .hub import hub_offline
from .lora_catalogue import COMMIT_RE, SHA256_RE, HubSource

log = logging.getLogger(__name__)

REPO_FIELD = "hub_repo"
FILE_FIELD = "hub_file"
LORA_SUFFIX = ".safetensors"
# huggingface_hub's rule for repo ids, narrowed: ASCII only, each part starts and ends with
# a letter or digit, and '--' or '..' anywhere is refused too (see `parse_hub_lora`).
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID_RE = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
# A path inside the repository: up to 8 parts joined by '/', none empty, none starting
# with '.', ASCII only; a backslash, a drive, a leading '/' or a space cannot match.
_FILE_PART = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}"
FILE_RE = re.compile(rf"(?:{_FILE_PART}/){{0,7}}{_FILE_PART}")
MAX_FILE_CHARS = 256
MAX_NAMED_FILES = 10  # a repository's files listed in a message, at most
LISTING_TIMEOUT_S = 10.0

REPO_RULE = (
    "give a Hub model id, owner/name: ASCII letters, digits, '-', '_' and '.', each part"
    " 1 to 96 characters starting and ending with a letter or digit, without '--' or '..'"
)
FILE_RULE = (
    "give the file's path in the repository, ending in .safetensors: ASCII letters, digits,"
    " '-', '_', '.' and '+', folders separated by '/', no '..'; or leave it empty when the"
    " repository holds one .safetensors file"
)
HUB_LORAS_OFF = (
    "LoRAs from the Hub are turned off on this server; the operator can allow them with"
    " --allow-hub-loras (or STENCIL_ALLOW_HUB_LORAS=1)"
)

Answer = TypeVar("Answer")


@dataclass(frozen=True)
class HubLoraRequest:
    """A checked repository id and, when the user named one, a checked file path in it."""

    repo_id: str
    filename: str | None


@dataclass(frozen=True)
class HubLoraFile:
    """The one file to fetch, as the repository's listing described it."""

    repo_id: str
    filename: str
    commit: str  # the listing's commit: the download asks for exactly this one
    size: int
    sha256: str | None  # the Hub's digest of the file, checked against the bytes fetched

    @property
    def label(self) -> str:
        """How messages name it (never joined by '/', which would read as a path)."""
        return f"{Path(self.filename).name} from {self.repo_id}"

    @property
    def source(self) -> HubSource:
        return HubSource(self.repo_id, self.filename, self.commit, sha256=self.sha256)


def parse_hub_lora(repo: Any, file: Any = None) -> HubLoraRequest:
    """The user's repository id and optional file path, checked; nothing is asked of the Hub."""
    repo_id = _text(repo, REPO_FIELD)
    if not REPO_ID_RE.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise InvalidRequestError(REPO_FIELD, repo, REPO_RULE)
    filename = _text(file, FILE_FIELD)
    if filename and not is_lora_file_name(filename):
        raise InvalidRequestError(FILE_FIELD, file, FILE_RULE)
    return HubLoraRequest(repo_id, filename or None)


def is_lora_file_name(name: Any) -> bool:
    """Whether `name` is a path Stencil would fetch: a user's, or one in a Hub listing."""
    return (
        isinstance(name, str)
        and len(name) <= MAX_FILE_CHARS
        and FILE_RE.fullmatch(name) is not None
        and name.endswith(LORA_SUFFIX)
        and ".." not in name
    )


def find_hub_lora(wanted: HubLoraRequest, *, max_bytes: int) -> HubLoraFile:
    """List the repository once and pick its LoRA file, refused here when the listing says
    it is over `max_bytes`: nothing has been downloaded yet."""
    from huggingface_hub import HfApi

    repo_id = wanted.repo_id
    info = _ask_hub(
        repo_id,
        lambda: HfApi().model_info(
            repo_id, files_metadata=True, timeout=LISTING_TIMEOUT_S, token=False
        ),
    )
    commit = getattr(info, "sha", None)
    if not isinstance(commit, str) or not COMMIT_RE.fullmatch(commit):
        raise HubUnavailableError(f"the Hub did not say which commit {repo_id!r} is at; try again")
    if getattr(info, "gated", False) or getattr(info, "private", False):
        raise InvalidRequestError(
            REPO_FIELD, repo_id, "it is gated or private; only public repositories are fetched"
        )
    filename, sibling = _pick_file(wanted, _lora_files(info))
    found = HubLoraFile(repo_id, filename, commit, _listed_size(sibling), _listed_sha256(sibling))
    if found.size < 0:
        raise LoraRejectedError(found.label, "the Hub did not say its size, so it is not fetched")
    if found.size > max_bytes:
        raise LoraRejectedError(
            found.label,
            f"it is {megabytes(found.size)} on the Hub, above the {megabytes(max_bytes)} limit;"
            " it was not downloaded",
        )
    return found


def download_hub_lora(found: HubLoraFile, *, max_bytes: int, scratch: Path) -> bytes:
    """The file's bytes, fetched at the listed commit into a folder under `scratch` that is
    gone when this returns; more than `max_bytes`, or other bytes than the Hub's digest
    says, is a refusal."""
    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory(dir=scratch, prefix=".hub-download-") as folder:
        path = _ask_hub(
            found.repo_id,
            lambda: hf_hub_download(
                found.repo_id,
                found.filename,
                revision=found.commit,
                cache_dir=folder,
                token=False,
                etag_timeout=LISTING_TIMEOUT_S,
            ),
        )
        data = _read_at_most(Path(path), max_bytes, found.label)
    listed_digest = found.sha256 or hashlib.sha256(data).hexdigest()
    if len(data) != found.size or hashlib.sha256(data).hexdigest() != listed_digest:
        raise LoraRejectedError(found.label, "the bytes fetched are not those the Hub lists")
    return data


def unreachable_message(repo_id: str) -> str:
    return (
        "the Hugging Face Hub cannot be reached from this server (offline), so"
        f" {repo_id!r} cannot be fetched"
    )


# --------------------------------------------------------------------------------------
# Helpers


def _text(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(field, type(value).__name__, "must be text")
    return value.strip()


def _ask_hub(repo_id: str, call: Callable[[], Answer]) -> Answer:
    """One huggingface_hub call, its failures said as a user can act on them."""
    if hub_offline():
        raise HubUnavailableError(unreachable_message(repo_id))
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return call()
    except GatedRepoError:
        raise InvalidRequestError(
            REPO_FIELD, repo_id, "it is gated; only public repositories are fetched"
        ) from None
    except RepositoryNotFoundError:  # a private repository answers the same, without a token
        raise InvalidRequestError(
            REPO_FIELD, repo_id, "the Hub has no public model repository of that name"
        ) from None
    except RemoteEntryNotFoundError:  # listed a moment ago at this very commit
        raise HubUnavailableError(
            f"the Hub listed the file in {repo_id!r} but does not serve it; try again later"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "an error")
        log.warning("the Hub answered %s for %s: %s", status, repo_id, exc)
        raise HubUnavailableError(
            f"the Hugging Face Hub answered {status} for {repo_id!r}; try again later"
        ) from None
    except (TypeError, AttributeError, NameError, AssertionError):
        raise  # a bug, not the network: the UI's edge logs it as an internal error
    except Exception as exc:
        # No network, no name resolution, a timeout, offline mode: the Hub is not there
        # (hf_hub_download says LocalEntryNotFoundError when it could not connect).
        log.warning("the Hub could not be asked about %s: %r", repo_id, exc)
        raise HubUnavailableError(unreachable_message(repo_id)) from None


def _lora_files(info: Any) -> dict[str, Any]:
    """The listing's files Stencil would fetch, by path; any other file is never named."""
    siblings = getattr(info, "siblings", None) or []
    return {s.rfilename: s for s in siblings if is_lora_file_name(getattr(s, "rfilename", None))}


def _pick_file(wanted: HubLoraRequest, files: dict[str, Any]) -> tuple[str, Any]:
    repo_id = wanted.repo_id
    if wanted.filename is not None:
        if wanted.filename in files:
            return wanted.filename, files[wanted.filename]
        raise InvalidRequestError(
            FILE_FIELD, wanted.filename, f"{repo_id} has no such file; {_listing(files)}"
        )
    if len(files) == 1:
        return next(iter(files.items()))
    if not files:
        raise InvalidRequestError(
            REPO_FIELD, repo_id, "it holds no .safetensors file (only those are fetched)"
        )
    raise InvalidRequestError(
        FILE_FIELD, "", f"{repo_id} holds {len(files)} .safetensors files; {_listing(files)}"
    )


def _listing(files: dict[str, Any]) -> str:
    if not files:
        return "it holds no .safetensors file"
    names = sorted(files)
    shown = ", ".join(names[:MAX_NAMED_FILES])
    more = f" and {len(names) - MAX_NAMED_FILES} more" if len(names) > MAX_NAMED_FILES else ""
    return f"name one of: {shown}{more}"


def _listed_size(sibling: Any) -> int:
    """The file's size as the listing gives it (the LFS object's, when it has one); -1 when
    it gives none."""
    lfs = getattr(sibling, "lfs", None)
    size = lfs.get("size") if isinstance(lfs, dict) else None
    size = size if size is not None else getattr(sibling, "size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else -1


def _listed_sha256(sibling: Any) -> str | None:
    lfs = getattr(sibling, "lfs", None)
    digest = lfs.get("sha256") if isinstance(lfs, dict) else None
    return digest if isinstance(digest, str) and SHA256_RE.fullmatch(digest) else None


def _read_at_most(path: Path, limit: int, label: str) -> bytes:
    # One byte past the limit is enough to know: a file larger than listed is never read.
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise LoraRejectedError(label, f"the file fetched is above the {megabytes(limit)} limit")
    return data
