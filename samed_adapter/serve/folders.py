"""Each request's private folder, and the threads that work in it.

A request's upload, labels and zip live in a folder of their own (mode 0700, from
:func:`tempfile.mkdtemp`), removed when the request ends, whatever ended it: its answer, an error,
or a client gone before, during or after the answer. An answer file is opened and its folder
removed before the first byte goes out (:func:`open_answer`): what is still to be sent is read
from the open file, and nothing is left on disk if the client never reads it.

A request that Ray Serve cancels (its client went away) cannot stop a thread already working in
its folder; the folder is removed again when the last such thread ends, so that a thread that
recreated part of it leaves nothing behind either.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO, Callable, Optional, TypeVar

T = TypeVar("T")

#: what every request folder's name starts with
PREFIX = "samed-serve-"
_CHUNK = 1 << 20


class FolderClosedError(RuntimeError):
    """Work asked for in a request folder after its request ended (the work is not done)."""


class RequestFolder:
    """One request's private folder under ``root`` (None: the system's temporary folder).

    ``await folder.run(fn, ...)`` runs ``fn`` on a thread; :meth:`close` removes the folder now,
    or when the last of those threads ends.
    """

    def __init__(self, root: Optional[str] = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
        self._lock = threading.Lock()
        self._working = 0  # threads inside fn now
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a thread (as :func:`asyncio.to_thread`), counted as work in this folder."""
        return await asyncio.to_thread(self._counted, fn, *args)

    def _counted(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._closed:  # the request was cancelled while this waited for a thread
                raise FolderClosedError(f"{self.path.name}: the request ended")
            self._working += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._working -= 1
                last = self._closed and self._working == 0
            if last:
                self._remove()

    def close(self) -> None:
        """Remove the folder, now or once the threads working in it have ended."""
        with self._lock:
            self._closed = True
            busy = self._working > 0
        if not busy:
            self._remove()

    def _remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def open_answer(folder: RequestFolder, path: Path) -> tuple[BinaryIO, int]:
    """Open ``path`` (a file in ``folder``) and close ``folder``: (the open file, its size in bytes).

    On POSIX a removed file stays readable through a handle opened before; its space is freed
    when the handle closes, after the answer was sent or its client went away.
    """
    handle = open(path, "rb")
    size = os.fstat(handle.fileno()).st_size
    folder.close()
    return handle, size


async def stream(handle: BinaryIO) -> AsyncIterator[bytes]:
    """The open file's bytes, a MiB at a time, closing it at the end or when the client goes."""
    try:
        while True:
            chunk = await asyncio.to_thread(handle.read, _CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        handle.close()
