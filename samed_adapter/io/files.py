"""Writing files so that a crash or a full disk never leaves a partial one behind."""

from __future__ import annotations

import os
import secrets
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock (see held_lock)
    fcntl = None  # type: ignore[assignment]

_UMASK_LOCK = threading.Lock()
#: the random part of an `atomic_path` temporary's name: 12 hexadecimal digits.
_TOKEN_HEX = 6


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; move it over `path` when the block succeeds.

    The temporary keeps `path`'s suffixes because writers such as nibabel pick compression from
    them. On any error it is removed and an existing `path` is left untouched. The file gets the
    mode a plain `open()` would give it: an existing `path`'s, else 0o666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = _split(path)
    tmp = path.with_name(f".{stem}.{secrets.token_hex(_TOKEN_HEX)}.tmp{suffix}")
    try:
        yield tmp
        # Writers that make private temporaries (safetensors writes 0600) would otherwise leave
        # the final file unreadable to the group and others.
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The permission bits `open(path, "w")` leaves `path` with."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:  # no such file yet (or none we may stat)
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:  # Linux 4.7+: no window in which other threads create files under a different umask
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # os.umask only sets it: set a placeholder and put it straight back. The lock keeps two
    # readers from taking each other's placeholder for the umask.
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _split(path: Path) -> tuple[str, str]:
    suffix = "".join(path.suffixes[-2:])
    return (path.name[: len(path.name) - len(suffix)] if suffix else path.name), suffix


def remove_stale_temporaries(path: Union[str, os.PathLike]) -> list[Path]:
    """Delete what a killed process left of writing `path` (its `atomic_path` temporaries).

    Only a SIGKILL or a power cut leaves them; they never hold a complete file. Call this only
    where no other process or thread is writing `path` at the same time (under its `held_lock`).
    The pattern is exact (12 hex digits), so ``ct.nii.gz``'s never takes ``ct.v2.nii.gz``'s.
    """
    path = Path(path)
    stem, suffix = _split(path)
    if not path.parent.is_dir():
        return []
    token = "[0-9a-f]" * (2 * _TOKEN_HEX)
    stale = [p for p in path.parent.glob(f".{glob_escape(stem)}.{token}.tmp{glob_escape(suffix)}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def glob_escape(text: str) -> str:
    """`text` with glob's special characters taken literally."""
    import glob

    return glob.escape(text)


@contextmanager
def held_lock(path: Union[str, os.PathLike], *, timeout: float, poll: float = 0.01) -> Iterator[None]:
    """Hold the exclusive lock named `path` for the block: an flock on that file, made if missing.

    flock excludes other processes and other threads of this one alike (each open() is its own
    holder), on local disks and NFSv4. The holder removes the file before it lets go, so nothing
    stays behind; a waiter that then finds its file unlinked opens the path again. A process
    killed while holding it releases it with its descriptors (a leftover file is taken and removed
    by the next holder). Without flock (Windows) the block runs unlocked.

    Raises:
        TimeoutError: another holder kept it for `timeout` seconds.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    fd = _acquire(path, time.monotonic() + timeout, poll)
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # still holding it: no one else can have it yet
        finally:
            os.close(fd)


def _acquire(path: Path, deadline: float, poll: float) -> int:
    """A descriptor of `path` holding its flock (TimeoutError at `deadline`)."""
    wait = poll
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{path} is held by another process") from None
            time.sleep(wait)
            wait = min(2 * wait, 0.25)
            continue
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us unlinked this inode as it let go: it locks nothing any more
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
