"""The file operations under a folder datastore: MONAI Label's lock, staged copies, moves that never overwrite.

A file comes in through a private copy in ``FOLDER/.staging`` (a folder MONAI Label never lists:
its images are the root's ``*.nii.gz`` files, its tags ``labels/``'s folders), is checked there,
and is then linked (never over an existing file) or moved (a label saved again) into place.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from .errors import DatastoreBusyError, DatastoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "STAGING_NAME", "file_identity", "folder_lock", "json_info", "keep_aside",
           "link_new", "remove_stale_staging", "stage_copy"]

#: The lock file MONAI Label's LocalDatastore takes (filelock's FileLock) around the JSON.
LOCK_NAME = ".lock"
#: Where files are copied and checked before they go into place.
STAGING_NAME = ".staging"
#: A staged file this old was left by a killed writer (a live one finishes in seconds).
STALE_STAGING_S = 3600.0


@contextmanager
def folder_lock(path: Path, *, timeout: float, poll: float = 0.01) -> Iterator[None]:
    """Hold the flock on ``path`` as filelock's ``FileLock`` (MONAI Label's) takes it.

    The file stays when released: a FileLock waiter may have it open, and would lock a removed
    inode if it went (``io.files.held_lock`` removes its file, so it cannot share MONAI Label's).
    Each call opens its own descriptor, so threads of one process exclude each other too.

    Raises:
        DatastoreBusyError: another holder kept it for ``timeout`` seconds.
    """
    if fcntl is None:  # pragma: no cover - Windows: unlocked, as io.files.held_lock
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        deadline, wait = time.monotonic() + timeout, poll
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DatastoreBusyError(
                        f"{path.parent}: another writer (a MONAI Label server or a samed-adapter job) held "
                        f"{path.name} for {timeout:g} s; try again when it is done") from None
                time.sleep(wait)
                wait = min(2 * wait, 0.25)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def stage_copy(root: Path, src: Path, name: str) -> Path:
    """A private copy of ``src`` in ``root``'s staging folder, on the datastore's disk (for link/replace)."""
    staging = root / STAGING_NAME
    staging.mkdir(exist_ok=True)
    tmp = staging / f".{secrets.token_hex(6)}.{name}"
    try:
        shutil.copyfile(src, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def keep_aside(root: Path, path: Path) -> Path:
    """A second name for ``path``'s current bytes in the staging folder (a hard link, else a copy).

    What a replacement is rolled back to when the JSON that names it cannot be written.
    """
    aside = root / STAGING_NAME / f".{secrets.token_hex(6)}.previous.{path.name}"
    try:
        os.link(path, aside)
    except OSError:
        shutil.copy2(path, aside)
    return aside


def remove_stale_staging(root: Path) -> None:
    """Delete staged copies a killed writer left (older than :data:`STALE_STAGING_S`)."""
    staging = root / STAGING_NAME
    if not staging.is_dir():
        return
    for p in staging.iterdir():
        try:
            if time.time() - p.stat().st_mtime > STALE_STAGING_S:
                p.unlink()
        except OSError:  # taken by another cleaner, or not ours to delete
            pass


def link_new(staged: Path, dest: Path) -> None:
    """Put ``staged`` at ``dest`` unless something is there (FileExistsError): a hard link never overwrites."""
    try:
        os.link(staged, dest)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (some network shares): checked under the lock
        if dest.exists():
            raise FileExistsError(dest) from None
        os.replace(staged, dest)


def file_identity(path: Path) -> tuple[int, int, int]:
    """(inode, mtime, size): what tells a replaced file from the one that was checked; zeros if missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def json_info(info: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """A JSON-safe copy of caller info, or a DatastoreError naming what cannot be stored."""
    info = dict(info or {})
    try:
        return json.loads(json.dumps(info, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise DatastoreError(f"info {info!r} cannot be stored as JSON ({exc}); pass strings, numbers, lists "
                             "and maps only") from exc
