"""Hub ids to local files: the standard Hugging Face cache, below `Adapter` (which uses it).

`Adapter.load("org/name")` resolves here; pushing (`samed_adapter.hub`) sits above `Adapter`.
`huggingface_hub` is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

ADAPTER_FILENAME = "adapter.safetensors"
LIBRARY_NAME = "samed-adapter"
# "org/name" or "org/name@revision"; each name part as the Hub allows (letters, digits, - _ .).
_REPO_ID = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(\S+))?")
# A name ending like a file is a local path that is missing, not a Hub repository.
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pkl")
_TRUE = {"1", "ON", "YES", "TRUE"}


class AdapterNotFoundError(FileNotFoundError):
    """A Hub adapter could not be found: not cached while offline, no such repo, revision or file."""


def looks_like_repo_id(text: Union[str, os.PathLike]) -> bool:
    """Whether `text` has the form of a Hub id, `"org/name"` or `"org/name@revision"`.

    Only strings qualify (a `pathlib.Path` is always a local path), and names that end like a
    file (`.safetensors`, `.pth`, ...) or start with `.`, `/` or `~` are taken as local paths.
    """
    if not isinstance(text, str):
        return False
    match = _REPO_ID.fullmatch(text)
    return bool(match) and not match.group(1).lower().endswith(_FILE_SUFFIXES)


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
    return repo_id, (in_spec or revision)


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in _TRUE


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

    Raises:
        AdapterNotFoundError: not cached while offline (or the Hub unreachable), or no such
            repository, revision or file; the message says how to get the file.
        ValueError: `repo_id` is not a valid Hub id.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .version import __version__

    repo, revision = parse_repo_id(repo_id, revision)
    spec = repo if revision is None else f"{repo}@{revision}"
    offline = bool(local_files_only) or _offline_mode()
    try:
        path = hf_hub_download(
            repo, ADAPTER_FILENAME, revision=revision, cache_dir=cache_dir, local_files_only=offline,
            token=token, library_name=LIBRARY_NAME, library_version=__version__,
        )
    except LocalEntryNotFoundError:
        where = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
        why = ("offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
               else "the Hugging Face Hub could not be reached")
        raise AdapterNotFoundError(
            f"adapter {spec} is not in the Hugging Face cache ({where}) and {why}. To get it, run once "
            f"online (e.g. `samed-adapter pull {spec}`, which fills the cache), or download "
            f"{ADAPTER_FILENAME} from the repository and pass its local path instead."
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
