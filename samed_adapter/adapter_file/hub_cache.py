"""Hub ids to local files: the standard Hugging Face cache, below `Adapter` (which uses it).

`Adapter.load("org/name")` resolves here; pushing (`samed_adapter.hub`) sits above `Adapter`.
`huggingface_hub` is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlsplit

ADAPTER_FILENAME = "adapter.safetensors"
LIBRARY_NAME = "samed-adapter"
_TRUE = {"1", "ON", "YES", "TRUE"}
# A 40-hex commit, or a branch or tag name by git's ref rules (`git check-ref-format`): no
# control character, space or any of ~^:?*[\\; no `..`, `@{`, `//`; no part starting with `.` or
# ending in `.lock`; not starting or ending with `/`, not ending with `.`, not `@`.
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
# How long `pull` waits for the Hub's host to answer before it says the Hub cannot be reached
# (huggingface_hub itself retries a refused connection for about 26 s).
PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class AdapterNotFoundError(FileNotFoundError):
    """A Hub adapter could not be found: not cached while offline, no such repo, revision or file."""


class HubCacheError(OSError):
    """The Hugging Face cache folder exists but cannot be read (not a folder, no permission)."""


class HubUnreachableError(ConnectionError):
    """The Hub (HF_ENDPOINT) could not be reached while pushing."""


def check_revision(revision: str) -> str:
    """`revision` if it is a 40-hex commit or a branch or tag name by git's ref rules, else ValueError.

    Checked before any lookup: huggingface_hub reads the cache file `refs/<revision>` for a
    name, so `../../x` would read a file outside the cache (and show it in its error).
    """
    if not isinstance(revision, str) or not revision:
        raise ValueError(f"a Hub revision must be a non-empty branch, tag or commit name, got {revision!r}")
    if _COMMIT.fullmatch(revision):
        return revision
    why = None
    if _REF_FORBIDDEN.search(revision):
        why = "control characters, spaces, ~ ^ : ? * [ \\, '..', '@{' and '//' are not allowed"
    elif revision.startswith("/") or revision.endswith(("/", ".")) or revision == "@":
        why = "it may not start with '/' nor end with '/' or '.'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        why = "no part of it may start with '.' or end with '.lock'"
    elif len(revision) > 255:
        why = "it is longer than 255 characters"
    if why is not None:
        raise ValueError(
            f"{revision!r} is not a branch, tag or commit name ({why}); give e.g. main, v1 or a 40-hex commit hash"
        )
    return revision


def parse_repo_id(spec: str, revision: Optional[str] = None) -> tuple[str, Optional[str]]:
    """Split `"org/name@revision"` into `("org/name", "revision")`; check the id is valid.

    Args:
        spec: `"org/name"` or `"org/name@revision"`.
        revision: a revision given separately; it must agree with one in `spec`.

    Raises:
        ValueError: not a valid Hub id, or two different revisions.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, in_spec = str(spec).partition("@")
    if in_spec and revision is not None and in_spec != revision:
        raise ValueError(f"{spec!r} names revision {in_spec!r} but revision={revision!r} was also given; give one")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{spec!r} is not a Hub id of the form 'org/name' or 'org/name@revision': {err}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"{spec!r} is not a Hub id of the form 'org/name' or 'org/name@revision'")
    revision = in_spec or revision
    return repo_id, (None if revision is None else check_revision(revision))


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in _TRUE


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now (huggingface_hub reads it once, at import), without a trailing `/`."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def unreachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """Why the host of `endpoint` cannot be reached (a TCP connection within `timeout` s), or None.

    One connection attempt, so that a machine without network is told so in seconds instead of
    after huggingface_hub's retries. Behind a proxy (HTTPS_PROXY, ...) only the proxy could
    tell, so None (not known to be unreachable) is returned without trying.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    url = urlsplit(endpoint)
    if not url.hostname:
        return f"HF_ENDPOINT {endpoint!r} is not a URL"
    port = url.port or (443 if url.scheme == "https" else 80)
    outcome: list[Optional[str]] = []

    def attempt() -> None:  # in a thread: the name lookup has no timeout of its own
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or str(err) or type(err).__name__)

    thread = threading.Thread(target=attempt, name="samed-adapter-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def unreadable_cache(cache: Union[str, os.PathLike], repo: str) -> Optional[str]:
    """Why the Hugging Face cache `cache` (or `repo`'s folder in it) cannot be read, or None.

    A cache that does not exist yet is fine (it is created on the first download); one that is
    a file, or a folder that cannot be listed, must not be reported as "not in the cache".
    """
    folder = Path(cache) / f"models--{repo.replace('/', '--')}"
    for path in (Path(cache), folder):
        if not os.path.lexists(path):
            return None
        if not path.is_dir():
            return f"{path} is not a folder"
        try:
            os.listdir(path)
        except OSError as err:
            return f"{path}: {err.strerror or err}"
    for sub in ("refs", "snapshots"):
        path = folder / sub
        if os.path.lexists(path):
            try:
                os.listdir(path)
            except OSError as err:
                return f"{path}: {err.strerror or err}"
    return None


def hf_hub_adapter_path(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    local_files_only: bool = False,
    token: Union[str, bool, None] = None,
) -> Path:
    """The local path of a Hub repository's `adapter.safetensors`, downloaded into the cache if needed.

    Args:
        repo_id: `"org/name"` or `"org/name@revision"`.
        revision: branch, tag or commit hash (default: `main`).
        cache_dir: the Hugging Face cache to use (default: `HF_HUB_CACHE`).
        local_files_only: use the cache only, as `HF_HUB_OFFLINE=1` does.
        token: a Hub token for private or gated repositories (default: the saved login).

    Without offline mode, the Hub's host is tried once first (`PROBE_TIMEOUT_S`): when it does
    not answer, the cached file is used if there is one, and otherwise the error comes in
    seconds rather than after huggingface_hub's retries (about 26 s).

    Raises:
        AdapterNotFoundError: not cached while offline or while the Hub cannot be reached, or no
            such repository, revision or file; the message says how to get the file.
        HubCacheError: the cache folder exists but cannot be read.
        ValueError: `repo_id` is not a valid Hub id, or the revision not a branch, tag or commit name.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from ..version import __version__

    repo, revision = parse_repo_id(repo_id, revision)  # the revision is checked before any lookup
    spec = repo if revision is None else f"{repo}@{revision}"
    where = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    problem = unreadable_cache(where, repo)
    if problem is not None:
        raise HubCacheError(
            f"the Hugging Face cache cannot be read ({problem}): make it a readable folder, point HF_HUB_CACHE "
            "at another, or pass the adapter's local path"
        )
    offline = bool(local_files_only) or _offline_mode()
    endpoint = hub_endpoint()
    no_network = None if offline else unreachable(endpoint)
    try:
        path = hf_hub_download(
            repo, ADAPTER_FILENAME, revision=revision, cache_dir=cache_dir,
            local_files_only=offline or no_network is not None, token=token, endpoint=endpoint,
            library_name=LIBRARY_NAME, library_version=__version__,
        )
    except LocalEntryNotFoundError:
        local = f"or download {ADAPTER_FILENAME} from the repository and pass its local path instead"
        if offline:
            how = "HF_HUB_OFFLINE=1" if _offline_mode() else "local_files_only=True"
            raise AdapterNotFoundError(
                f"adapter {spec} is not in the Hugging Face cache ({where}) and offline mode is on ({how}): "
                f"fill the cache once with network (`samed-adapter pull {spec}` with HF_HUB_OFFLINE unset), copy "
                f"a cache that holds it to {where}, {local}"
            ) from None
        why = no_network or "it did not answer"
        raise AdapterNotFoundError(
            f"adapter {spec} is not in the Hugging Face cache ({where}) and the Hub at {endpoint} cannot be "
            f"reached ({why}): connect to the network, set HF_ENDPOINT to a reachable Hub mirror, copy a cache "
            f"that holds it to {where} (then HF_HUB_OFFLINE=1 uses it), {local}"
        ) from None
    except GatedRepoError:
        raise AdapterNotFoundError(
            f"{repo} is a gated repository: accept its conditions on huggingface.co and log in "
            "(`hf auth login`) or pass token=... (--token)"
        ) from None
    except RepositoryNotFoundError:
        raise AdapterNotFoundError(
            f"no Hub repository {repo}: check the spelling; if it is private, log in (`hf auth login`) or pass "
            f"token=... (--token). A local file needs an existing path (e.g. ./{repo.split('/')[1]}.safetensors)."
        ) from None
    except RevisionNotFoundError:
        raise AdapterNotFoundError(
            f"{repo} has no revision {revision!r}; give an existing branch, tag or commit hash"
        ) from None
    except EntryNotFoundError:
        raise AdapterNotFoundError(
            f"{spec} has no {ADAPTER_FILENAME}: is it a samed-adapter repository? Adapters are pushed with "
            "`samed-adapter push` or samed_adapter.push_to_hub."
        ) from None
    return Path(path)
