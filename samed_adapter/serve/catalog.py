"""The adapters a server may serve, by name: a folder of files, ``name=path`` pairs, Hub ids.

Clients name adapters; they never pass paths or Hub ids, so a request cannot make the server
read a file it was not given. A folder is listed again when a name it did not hold is asked
for, so adapters copied in while the server runs are found on the next request for them.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..adapter_file.adapter import Adapter

#: what an adapter's name may be: it travels in URLs, file names and MONAI Label model names.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class UnknownAdapterError(KeyError):
    """No adapter of that name is served here (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Stamp:
    """What a file is now, without reading it: a changed stamp means the file behind a name changed.

    The inode and ctime are in it because ``cp -p`` and ``rsync -t`` keep a replaced file's size
    and mtime: ctime moves on every write and rename and cannot be set back by a user. A request
    does not trust a stamp: :meth:`AdapterCatalog.pin` reads the content each time.
    """

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path) -> "Stamp":
        st = path.stat()
        return cls(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class AdapterCatalog:
    """Adapter names -> local files.

    Args:
        folders: folders of ``.safetensors`` files; a file's stem is its name.
        files: ``{name: path}`` pairs (the command line's ``name=path``).
        hub_ids: ``{name: "org/repo[@revision]"}``, resolved through the Hugging Face cache once,
            when first asked for (``cache_dir``, ``local_files_only``, ``token`` as for
            :meth:`Adapter.load`).
    """

    def __init__(self, folders: Sequence[Union[str, os.PathLike]] = (),
                 files: Optional[dict[str, Union[str, os.PathLike]]] = None,
                 hub_ids: Optional[dict[str, str]] = None, *, cache_dir: Union[str, os.PathLike, None] = None,
                 local_files_only: bool = False, token: Union[str, bool, None] = None) -> None:
        self.folders = [Path(f) for f in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise FileNotFoundError(f"--adapters {folder}: no such folder; give a folder of .safetensors files")
        self.files = {check_name(n): Path(p) for n, p in (files or {}).items()}
        for name, path in self.files.items():
            if not path.is_file():
                raise FileNotFoundError(f"--adapter {name}={path}: no such file")
        self.hub_ids = {check_name(n): r for n, r in (hub_ids or {}).items()}
        self._hub_kwargs = {"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
        self._hub_paths: dict[str, Path] = {}
        self._found: dict[str, Path] = {}  # the folders' files, as last listed
        self._described: dict[str, tuple[Stamp, dict[str, Any]]] = {}
        self._pinned: dict[str, tuple[str, dict[str, Any]]] = {}  # name: (sha256 of the file's bytes, entry)
        self._lock = threading.Lock()
        if not (self.folders or self.files or self.hub_ids):
            raise ValueError("no adapters to serve; give --adapters FOLDER, --adapter NAME=FILE or --hub-adapter "
                             "NAME=ORG/REPO")

    def _folder_files(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for folder in self.folders:
            for path in sorted(folder.glob("*.safetensors")):
                if path.is_file() and NAME.fullmatch(path.stem) and path.stem not in found:
                    found[path.stem] = path
        return found

    def names(self) -> list[str]:
        """Every name served now (folders listed again)."""
        return sorted({*self._folder_files(), *self.files, *self.hub_ids})

    def path(self, name: str) -> Path:
        """The local file of adapter ``name``.

        Raises:
            UnknownAdapterError: no such name (the message lists the served ones).
        """
        if name in self.files:
            return self.files[name]
        if name in self.hub_ids:
            with self._lock:
                if name not in self._hub_paths:
                    from ..adapter_file.hub_cache import hf_hub_adapter_path

                    self._hub_paths[name] = hf_hub_adapter_path(self.hub_ids[name], **self._hub_kwargs)
                return self._hub_paths[name]
        found = None
        if NAME.fullmatch(name or ""):
            # Each batch asks for its adapters: list the folders only for a name not seen there yet,
            # or whose file went away.
            with self._lock:
                found = self._found.get(name)
            if found is None or not found.is_file():
                files = self._folder_files()
                with self._lock:
                    self._found = files
                found = files.get(name)
        if found is None:
            names = self.names()
            listed = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            raise UnknownAdapterError(f"no adapter named {name!r} is served here; served: {listed or '(none)'}")
        return found

    def describe(self, name: str) -> dict[str, Any]:
        """``GET /v1/adapters``' entry for ``name``: its config, without the tensors (cached per
        :class:`Stamp`; a request pins its version with :meth:`pin`, which reads the content)."""
        path = self.path(name)
        stamp = Stamp.of(path)
        with self._lock:
            cached = self._described.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        return self.pin(name)

    def pin(self, name: str) -> dict[str, Any]:
        """The entry of the adapter ``name`` names now, from its file's content.

        Its ``fingerprint`` (:attr:`Adapter.fingerprint`, a sha256 over the config and tensors)
        pins a request to this version: the replicas answer it with that version or not at all.
        No stamp proves a file unchanged, so its bytes are hashed each time (about 25 ms for
        ViT-B's 19 MiB on 2 cores); it is parsed again only when they changed.
        """
        path = self.path(name)
        stamp = Stamp.of(path)  # before the reads: a change during them makes the cached stamp stale, not wrong
        digest = _sha256(path)
        with self._lock:
            cached = self._pinned.get(name)
        if cached is not None and cached[0] == digest:
            entry = cached[1]
        else:
            entry = _entry(name, Adapter.load(path))
            if _sha256(path) != digest:  # changed while parsed: right for this request, not to be cached by digest
                return entry
        with self._lock:
            self._pinned[name] = (digest, entry)
            self._described[name] = (stamp, entry)
        return entry


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry(name: str, adapter: Adapter) -> dict[str, Any]:
    """``GET /v1/adapters``' entry for ``adapter`` served as ``name``."""
    config = adapter.config
    return {
        "name": name,
        "class_names": list(config.class_names or []),
        "num_classes": config.num_classes,
        "backbone": config.backbone,
        "image_size": config.image_size,
        "rank": config.rank,
        "fingerprint": adapter.fingerprint,
        "base_fingerprint": adapter.base_fingerprint,
        "config": config.to_dict(),
    }


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (at most 128), starting "
                         "with a letter or digit")
    return name


def parse_pairs(pairs: Sequence[str], flag: str) -> dict[str, str]:
    """``["liver=a.safetensors", ...]`` -> ``{"liver": "a.safetensors"}`` (ValueError naming ``flag``)."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not value:
            raise ValueError(f"{flag} {pair!r}: give NAME=VALUE, e.g. {flag} liver=liver.safetensors")
        if name in out:
            raise ValueError(f"{flag}: the name {name!r} is given twice")
        out[check_name(name)] = value
    return out
