"""Adapter versions on disk: ``ROOT/NAME/NAME@N.safetensors`` and ``ROOT/NAME/versions.json``.

The JSON names every version of one adapter (its fingerprint, parent, figures, the datastore
items it was trained on and the image ids held out) and which one serves. A version's file is
written and flushed to disk before the JSON names it, and the JSON is replaced atomically, so a
full disk or a kill at any point leaves the serving version and the JSON as they were: a file
the JSON does not name is an orphan of a killed writer, never served, and removed by the next
writer. Writers take the adapter's lock (an flock), so two jobs never number two versions alike.

``NAME@3`` names version 3; ``NAME`` the serving one (or, with no versions recorded, the file the
server was given: :meth:`VersionStore.adopt` copies that in as version 1 the first time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from ..adapter_file.adapter import Adapter, AdapterError
from ..io.files import atomic_path, held_lock
from .errors import UnknownVersionError, VersionError, VersionFileError, VersionFormatError, VersionStoreBusyError

__all__ = ["FORMAT_NAME", "LOCK_TIMEOUT_S", "VERSIONS_FILE", "Version", "VersionStore", "file_changed", "parse_ref"]

PathLike = Union[str, os.PathLike]
VERSIONS_FILE = "versions.json"
FORMAT_NAME = "samed-adapter-versions"
FORMAT_VERSION = 1
#: a writer holds the lock for a copy and a JSON write (well under a second); this is a stuck one
LOCK_TIMEOUT_S = 30.0
_LOCK = ".lock"
#: a JSON replaced this long ago is not replaced again unseen with the same stat (clock ticks are ms)
SETTLED_NS = 2_000_000_000
#: what an adapter's name may be (the catalog's rule: it travels in URLs and file names)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_REF = re.compile(r"(?P<name>[^@]*)@(?P<version>[0-9]{1,9})")


@dataclass(frozen=True)
class Version:
    """One recorded version of adapter ``name`` (``NAME@version``) and its file ``path``."""

    name: str
    version: int
    path: Path
    fingerprint: str
    parent: Optional[int]  # None for version 1
    created: str  # ISO 8601, UTC
    figures: dict[str, Any]  # e.g. {"holdout_dice": {"current": 61.2, "new": 67.0}, "epochs": 5, "seconds": 40.1}
    items: list[dict[str, str]]  # the datastore items it was trained on: {"image": id, "label_checksum": ...}
    holdout: list[str]  # the image ids held out (never trained on)
    serving: bool

    @property
    def ref(self) -> str:
        """``NAME@N``, as a request names this version."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON a client sees (``GET /v1/adapters/{name}/versions``): no server path."""
        return {"name": self.name, "version": self.version, "ref": self.ref, "fingerprint": self.fingerprint,
                "parent": self.parent, "created": self.created, "figures": self.figures,
                "items": len(self.items), "holdout": len(self.holdout), "serving": self.serving}


def parse_ref(ref: str) -> tuple[str, Optional[int]]:
    """``"liver@3"`` -> ``("liver", 3)``; ``"liver"`` -> ``("liver", None)``.

    Raises:
        VersionError: an ``@`` not followed by a version number.
    """
    if "@" not in ref:
        return ref, None
    match = _REF.fullmatch(ref)
    if match is None or int(match["version"]) < 1:
        raise VersionError(f"adapter {ref!r}: name a version as NAME@N with N a version number from 1 "
                           "(GET /v1/adapters/NAME/versions lists them)")
    return match["name"], int(match["version"])


class VersionStore:
    """The versions of every adapter under ``root``: ``root/NAME/versions.json`` and ``root/NAME/NAME@N.safetensors``.

    Reads are cheap: each adapter's JSON is read again only when its stat changed, so a replica
    may ask on every batch. Thread-safe; several processes may share one root (writers lock).
    """

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"--versions {self.root}: not a folder; give a folder for the adapter versions")
        self._cache: dict[str, tuple[tuple[int, ...], bool, bytes, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reading

    def versions(self, name: str) -> list[Version]:
        """Every recorded version of ``name``, oldest first; [] when none is recorded."""
        data = self._read(name)
        if "built" not in data:  # once per parse: a replica asks on every batch
            data["built"] = self._versions(name, data)
        return list(data["built"])

    def serving(self, name: str) -> Optional[Version]:
        """The version that serves ``name``; None: no version recorded (the catalog's file serves)."""
        return next((v for v in self.versions(name) if v.serving), None)

    def get(self, name: str, version: int) -> Version:
        """Version ``version`` of ``name``.

        Raises:
            UnknownVersionError: not recorded (the message lists the recorded ones).
        """
        return self._pick(name, self.versions(name), version)

    def find(self, name: str, fingerprint: str) -> Optional[Path]:
        """The file of the version of ``name`` with that fingerprint (None: none recorded, or its file is gone).

        A replica asked for a version it does not hold reads it from here, though another one serves now.
        """
        for v in self.versions(name):
            if v.fingerprint == fingerprint and v.path.is_file():
                return v.path
        return None

    def load(self, name: str, version: int) -> Adapter:
        """Version ``version`` of ``name``, read and checked against its recorded fingerprint.

        Raises:
            UnknownVersionError: not recorded.
            VersionFileError: its file is missing, unreadable or holds another adapter.
        """
        return _checked(self.get(name, version))

    # ------------------------------------------------------------------ writing

    def adopt(self, name: str, path: PathLike) -> Version:
        """Version 1 of ``name``: a copy of ``path`` (the catalog's file), made the first time only.

        With versions already recorded it changes nothing and returns version 1.

        Raises:
            samed_adapter.adapter_file.adapter.AdapterError: ``path`` is not a valid adapter.
        """
        with self._writing(name) as data:
            if data["versions"]:
                return self._pick(name, self._versions(name, data), 1)
            fingerprint = Adapter.load(path).fingerprint
            record = {"version": 1, "fingerprint": fingerprint, "parent": None, "created": _now(), "figures": {},
                      "items": [], "holdout": [], "source": os.fspath(path)}

            def copy(tmp: Path) -> None:
                shutil.copyfile(path, tmp)
                _check_copy(tmp, fingerprint, path)

            self._place(name, 1, copy, {**data, "serving": 1, "versions": [record]})
            return self._pick(name, self._versions(name, self._read(name)), 1)

    def add(self, name: str, adapter: Adapter, *, parent: int, figures: dict[str, Any],
            items: list[dict[str, str]], holdout: list[str], serve: bool,
            datastore: Optional[str] = None) -> Version:
        """Record ``adapter`` as the next version of ``name`` (made from version ``parent``).

        The file records its lineage (parent, items, holdout, ``datastore``) in its metadata; it is
        written and flushed before the JSON names it. ``serve``: it serves from now on, if version
        ``parent`` still serves (else it is kept with its figures and the serving version goes on
        serving). A job compared the new version with its parent; an admin's rollback or another
        job's version that came to serve meanwhile is not what it was compared with, and wins.

        Raises:
            UnknownVersionError: ``parent`` is not recorded (adopt the catalog's file first).
            VersionError: ``figures``, ``items`` or ``holdout`` are not JSON.
            OSError: the disk is full (nothing recorded changed, no file is left behind).
        """
        record = {"fingerprint": adapter.fingerprint, "parent": parent, "created": _now(),
                  "figures": figures, "items": items, "holdout": holdout}
        _require_json(record)
        lineage = {"adapter": name, "parent": parent, "items": items, "holdout": holdout, "datastore": datastore}
        with self._writing(name) as data:
            known = self._versions(name, data)
            self._pick(name, known, parent)
            number = max(v.version for v in known) + 1
            record["version"] = number
            labelled = Adapter(adapter.config, adapter.tensors, adapter.base_fingerprint, finite_checked=True,
                               lineage={**lineage, "version": number})

            def save(tmp: Path) -> None:
                labelled.save(tmp)
                _check_copy(tmp, adapter.fingerprint, None)

            serving = number if serve and data["serving"] == parent else data["serving"]
            self._place(name, number, save, {**data, "serving": serving, "versions": [*data["versions"], record]})
            return self._pick(name, self._versions(name, self._read(name)), number)

    def set_serving(self, name: str, version: int) -> Version:
        """Serve version ``version`` of ``name`` from now on (a rollback or a promotion).

        Raises:
            UnknownVersionError: not recorded.
            VersionFileError: its file is missing or holds another adapter (the serving one stays).
        """
        with self._writing(name) as data:
            _checked(self._pick(name, self._versions(name, data), version))
            if data["serving"] != version:
                self._write_json(name, {**data, "serving": version})
                _sync_dir(self._folder(name))
            return self._pick(name, self._versions(name, self._read(name)), version)

    # ------------------------------------------------------------------ internals

    def _folder(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise VersionError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (at most 128), "
                               "starting with a letter or digit")
        return self.root / name

    def _path(self, name: str, version: int) -> Path:
        return self._folder(name) / f"{name}@{version}.safetensors"

    def _read(self, name: str) -> dict[str, Any]:
        """``name``'s JSON (an empty record when none), read again only when it may have changed.

        An unchanged stat is trusted only for a JSON replaced more than :data:`SETTLED_NS` before it
        was read: one replaced twice within a clock tick can reuse the freed inode and keep size
        and times, so a younger one is read again (a few kB: microseconds) and parsed if its bytes differ.
        """
        path = self._folder(name) / VERSIONS_FILE
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._lock:
                cached = self._cache.get(name)
            if cached is not None and cached[0] == stamp and cached[1]:
                return cached[3]
            raw = path.read_bytes()
        except FileNotFoundError:
            return {"serving": None, "versions": []}
        except OSError as err:
            raise VersionFormatError(f"{path} cannot be read ({err.strerror or err}); check its permissions") from None
        data = cached[3] if cached is not None and cached[2] == raw else _parse(path, raw, name)
        settled = time.time_ns() - st.st_ctime_ns > SETTLED_NS
        with self._lock:
            self._cache[name] = (stamp, settled, raw, data)
        return data

    def _versions(self, name: str, data: dict[str, Any]) -> list[Version]:
        return [Version(name, r["version"], self._path(name, r["version"]), r["fingerprint"], r["parent"],
                        r["created"], r["figures"], r["items"], r["holdout"], r["version"] == data["serving"])
                for r in data["versions"]]

    @staticmethod
    def _pick(name: str, known: list[Version], version: int) -> Version:
        for v in known:
            if v.version == version:
                return v
        listed = ", ".join(str(v.version) for v in known) or "none yet"
        raise UnknownVersionError(f"adapter {name!r} has no version {version!r} (versions: {listed}); "
                                  f"GET /v1/adapters/{name}/versions lists them")

    @contextmanager
    def _writing(self, name: str) -> Iterator[dict[str, Any]]:
        """Hold ``name``'s lock; remove what killed writers left; yield the JSON as it is on disk."""
        folder = self._folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with held_lock(folder / _LOCK, timeout=LOCK_TIMEOUT_S):
                data = self._read(name)
                _remove_orphans(folder, name, {r["version"] for r in data["versions"]})
                yield data
        except TimeoutError:
            raise VersionStoreBusyError(f"adapter {name!r}: another writer (a training job or a rollback) held "
                                        f"its versions for {LOCK_TIMEOUT_S:g} s; try again when it is done") from None

    def _place(self, name: str, number: int, write: Callable[[Path], None], data: dict[str, Any]) -> None:
        """Write version ``number``'s file with ``write(tmp)``, flush it, then the JSON ``data`` that names it.

        On any failure before the JSON moved in, the file is removed again: the JSON and the serving
        version are as they were. (A kill leaves the file: an orphan the next writer removes.)
        """
        target = self._path(name, number)
        named = False
        try:
            with atomic_path(target) as tmp:
                write(tmp)
                _sync_file(tmp)
            _sync_dir(target.parent)  # the file's entry is on disk before the JSON names it
            self._write_json(name, data)
            named = True
            _sync_dir(target.parent)
        except BaseException:
            if not named:
                target.unlink(missing_ok=True)
            raise

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        """Replace ``name``'s JSON with ``data``, flushed to disk first (raises before anything moved)."""
        text = json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": name,
                           "serving": data["serving"], "versions": data["versions"]}, indent=1, sort_keys=True)
        with atomic_path(self._folder(name) / VERSIONS_FILE) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
                fh.flush()
                os.fsync(fh.fileno())

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _require_json(record: dict[str, Any]) -> None:
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise VersionError(f"a version's figures, items and holdout must be JSON (numbers, strings, lists, "
                           f"dicts; no NaN): {err}") from None


def _sync_file(path: Path) -> None:
    """Flush ``path``'s bytes to the disk (a full disk shows here, before anything names it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (the renames) to the disk, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows opens no folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_copy(path: Path, fingerprint: str, source: Optional[PathLike]) -> None:
    """The file just written holds the adapter ``fingerprint`` names (a copy read back from disk)."""
    got = Adapter.load(path).fingerprint
    if got != fingerprint:
        raise VersionFileError(f"the version written reads back as {got[:19]}..., not {fingerprint[:19]}..."
                               f"{f' ({source} changed while copied)' if source else ''}; try again")


def _checked(version: Version) -> Adapter:
    """``version``'s adapter, or VersionFileError when its file no longer holds it."""
    try:
        adapter = Adapter.load(version.path)
    except (AdapterError, OSError) as err:
        raise VersionFileError(f"{version.ref}: its file cannot be read ({err}); it is not served: serve another "
                               f"version (POST /v1/adapters/{version.name}/serve?version=N)") from None
    if adapter.fingerprint != version.fingerprint:
        raise file_changed(version, adapter.fingerprint)
    return adapter


def file_changed(version: Version, found: str) -> VersionFileError:
    """The error for ``version``'s file found holding the adapter ``found`` (a fingerprint) instead."""
    return VersionFileError(f"{version.ref}: its file {version.path.name} was changed after it was recorded (it "
                            f"holds {found[:19]}..., recorded {version.fingerprint[:19]}...); it is not served: serve "
                            f"another version (POST /v1/adapters/{version.name}/serve?version=N) or put the file back")


def _parse(path: Path, raw: bytes, name: str) -> dict[str, Any]:
    """``versions.json``'s bytes checked: {"serving": int, "versions": [records]} (VersionFormatError)."""
    try:
        data = json.loads(raw.decode("utf-8"))
        ok = (data.get("format") == FORMAT_NAME and isinstance(data.get("versions"), list)
              and all(_record_ok(r) for r in data["versions"]))
        numbers = [r["version"] for r in data["versions"]] if ok else []
        ok = ok and len(set(numbers)) == len(numbers) and (not numbers or data.get("serving") in numbers)
    except (OSError, ValueError, AttributeError) as err:
        raise VersionFormatError(f"{path} cannot be read ({err}); restore it from a backup") from None
    if not ok:
        raise VersionFormatError(f"{path} is not a {FORMAT_NAME} file of adapter {name!r} (damaged?); restore it "
                                 "from a backup")
    return {"serving": data.get("serving"), "versions": data["versions"]}


def _record_ok(r: Any) -> bool:
    return (isinstance(r, dict) and isinstance(r.get("version"), int) and r["version"] >= 1
            and isinstance(r.get("fingerprint"), str) and (r.get("parent") is None or isinstance(r["parent"], int))
            and isinstance(r.get("created"), str) and isinstance(r.get("figures"), dict)
            and isinstance(r.get("items"), list) and isinstance(r.get("holdout"), list))


def _remove_orphans(folder: Path, name: str, recorded: set[int]) -> list[Path]:
    """Delete version files the JSON does not name and half-written temporaries (killed writers').

    Only under the adapter's lock: then no writer of this store is between a file and its JSON.
    """
    gone: list[Path] = []
    for path in folder.iterdir():
        orphan = path.name.startswith(f"{name}@") and path.suffix == ".safetensors" and path.is_file()
        if orphan:
            number = path.name[len(name) + 1:-len(".safetensors")]
            orphan = not (number.isdigit() and int(number) in recorded)
        if orphan or (path.name.startswith(".") and ".tmp" in path.name and path.is_file()):
            path.unlink(missing_ok=True)
            gone.append(path)
    return gone
