"""The adapters a server may serve, by name: a folder of files, ``name=path`` pairs, Hub ids.

Clients name adapters; they never pass paths or Hub ids, so a request cannot make the server
read a file it was not given. A folder is listed again when a name it did not hold is asked
for, so adapters copied in while the server runs are found on the next request for them.

With a :class:`~samed_adapter.learning.versions.VersionStore`, ``NAME`` is the serving version's
file once versions of it are recorded (the given file until then), and ``NAME@3`` version 3.
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
from ..learning.errors import UnknownVersionError, VersionError
from ..learning.versions import VersionStore, file_changed, parse_ref

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
        versions: the adapters' recorded versions (``--versions``); None: each name is its file.
    """

    def __init__(self, folders: Sequence[Union[str, os.PathLike]] = (),
                 files: Optional[dict[str, Union[str, os.PathLike]]] = None,
                 hub_ids: Optional[dict[str, str]] = None, *, cache_dir: Union[str, os.PathLike, None] = None,
                 local_files_only: bool = False, token: Union[str, bool, None] = None,
                 versions: Optional[VersionStore] = None) -> None:
        self.versions = versions
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
        """The local file of adapter ``name``: ``NAME`` or ``NAME@N`` (see the module docstring).

        Raises:
            UnknownAdapterError: no such name or version (the message lists the served ones).
        """
        return self.version(name)[0]

    def version(self, ref: str) -> tuple[Path, Optional[int]]:
        """``ref``'s file and its version number (None: no version recorded, the given file serves)."""
        try:
            name, number = parse_ref(ref)
        except VersionError as err:
            raise UnknownAdapterError(str(err)) from None
        if self.versions is not None and NAME.fullmatch(name):
            try:
                found = self.versions.get(name, number) if number is not None else self.versions.serving(name)
            except UnknownVersionError as err:
                raise UnknownAdapterError(str(err)) from None
            if found is not None:
                return found.path, found.version
        if number is not None:
            raise UnknownAdapterError(f"adapter {ref!r}: no versions of {name!r} are kept on this server"
                                      f"{'' if self.versions is not None else ' (serve --versions FOLDER keeps them)'}")
        return self._file(name), None

    def find(self, ref: str, fingerprint: str) -> Optional[Path]:
        """The file of the recorded version of ``ref``'s adapter with that fingerprint (None: none).

        A replica asked for a version that no longer serves finds it here, so a request pinned to
        it before a swap is answered by it after the swap.
        """
        if self.versions is None:
            return None
        name = parse_ref(ref)[0]
        return self.versions.find(name, fingerprint) if NAME.fullmatch(name) else None

    def _file(self, name: str) -> Path:
        """The file the server was given for ``name`` (UnknownAdapterError)."""
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
        path, _ = self.version(name)
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
        ViT-B's 19 MiB on 2 cores); it is parsed again only when they changed. Its ``version`` is
        the recorded version's number (None: no versions recorded).

        Raises:
            samed_adapter.learning.errors.VersionFileError: a recorded version's file no longer holds the
                adapter recorded (not served).
        """
        path, number = self.version(name)
        stamp = Stamp.of(path)  # before the reads: a change during them makes the cached stamp stale, not wrong
        digest = _sha256(path)
        with self._lock:
            cached = self._pinned.get(name)
        if cached is not None and cached[0] == digest:
            entry = cached[1]
        else:
            entry = _entry(name, Adapter.load(path))
            if _sha256(path) != digest:  # changed while parsed: right for this request, not to be cached by digest
                return self._checked({**entry, "version": number})
        entry = self._checked({**entry, "version": number})
        with self._lock:
            self._pinned[name] = (digest, entry)
            self._described[name] = (stamp, entry)
        return entry

    def _checked(self, entry: dict[str, Any]) -> dict[str, Any]:
        """``entry``, if its version's file holds the adapter recorded for it (VersionFileError)."""
        if entry["version"] is None or self.versions is None:
            return entry
        name = parse_ref(entry["name"])[0]
        recorded = self.versions.get(name, entry["version"])
        if recorded.fingerprint != entry["fingerprint"]:
            raise file_changed(recorded, entry["fingerprint"])
        return entry

def catalog_for(settings: Any) -> AdapterCatalog:
    """The catalog a server's ``settings`` (:class:`~.settings.ServeSettings`) name, with its versions
    (``settings.versions``) when it keeps them: the front and every replica build the same one."""
    versions = VersionStore(settings.versions) if getattr(settings, "versions", None) else None
    return AdapterCatalog(settings.adapters, settings.adapter_files, settings.hub_adapters,
                          local_files_only=settings.local_files_only, versions=versions)


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
        "version": None,
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
