"""Writing files so that a crash or a full disk never leaves a partial one behind."""

from __future__ import annotations

import os
import secrets
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

_UMASK_LOCK = threading.Lock()


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
    tmp = path.with_name(f".{stem}.{secrets.token_hex(6)}.tmp{suffix}")
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
    where no other process is writing `path` at the same time.
    """
    path = Path(path)
    stem, suffix = _split(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.glob(f".{glob_escape(stem)}.*.tmp{glob_escape(suffix)}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def glob_escape(text: str) -> str:
    """`text` with glob's special characters taken literally."""
    import glob

    return glob.escape(text)
