"""Clicks through the service: MONAI Label's ``/session/`` images at the front, click sessions
(kept embeddings) in the model replica that made them, and the click parameters 3D Slicer sends.

- :class:`SessionImages` (the front): images uploaded once by ``PUT /session/``, each in a
  private folder, at most ``--max-sessions`` (the least recently used goes first); a session
  also pins the adapter version each model was first asked with (a replaced adapter: 409).
- :class:`KeptSessions` (each model replica): a :class:`~samed_adapter.interactive.ClickSession`
  per (session, adapter version), at most ``--max-sessions`` and ``--session-memory`` bytes of
  embeddings (least recently used first out).
- :func:`parse_clicks` reads MONAI Label's ``params``; :func:`answer_clicks` runs on a replica.

Routing: a session's requests carry its id as Ray Serve's ``multiplexed_model_id``, so the
router sends them to the replica that reported holding it. That is a preference, not a promise
(a busy replica is passed over after about a second, a replica may have evicted it): a replica
without the session answers :class:`SessionMissing` and the front sends the request again with
the image, so that replica builds it (one encoder pass) and keeps it from then on.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, Union

from .errors import BadRequestError, NotFoundError, ServeError, UnprocessableError
from .folders import RequestFolder

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..interactive.session import ClickSession
    from .residents import ServingModel

#: the most clicks one request may carry (Slicer resends every click placed so far)
MAX_CLICKS = 1000
#: session ids evicted or removed that are still told apart from ids never given (410 vs 404)
_FORGOTTEN = 4096


class SessionGoneError(ServeError):
    """A session that was evicted or deleted (410: upload the image again)."""

    status = 410


class SessionAdapterChangedError(ServeError):
    """The adapter file changed since the session was first used with it (409: start a new session)."""

    status = 409


# ---------------------------------------------------------------------------------------- the front


@dataclass
class SessionImage:
    """One ``PUT /session/`` upload: ``image`` in ``folder``, and the adapter version each model
    was first asked with in this session (name -> fingerprint)."""

    id: str
    folder: RequestFolder
    image: Path
    name: str
    created: float = field(default_factory=time.time)
    used: float = field(default_factory=time.time)
    pins: dict[str, str] = field(default_factory=dict)
    #: the adapters a replica has answered this session for (a first request sends the image along)
    answered: set[str] = field(default_factory=set)

    def info(self) -> dict[str, Any]:
        """MONAI Label's ``SessionInfo`` JSON (``utils/sessions.py``); no server paths in it."""
        return {"name": self.id, "path": "", "image": self.name, "meta": {}, "create_ts": int(self.created),
                "last_access_ts": int(self.used), "expiry": 0}

    def pin(self, model: str, fingerprint: str) -> None:
        """Pin ``model`` to ``fingerprint`` on first use; a later other version is a 409."""
        first = self.pins.setdefault(model, fingerprint)
        if first != fingerprint:
            raise SessionAdapterChangedError(
                f"adapter {model!r} was replaced on the server after this session first used it ({first[:19]}..., now "
                f"{fingerprint[:19]}...); its kept embeddings are of the former version: start a new session (upload "
                "the image again: PUT /session/)")


class SessionImages:
    """The front's sessions: at most ``max_sessions``, the least recently used evicted first."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, SessionImage] = OrderedDict()
        self._forgotten: deque[tuple[str, str]] = deque(maxlen=_FORGOTTEN)  # (id, why)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, folder: RequestFolder, image: Path, name: str) -> SessionImage:
        """Keep ``image`` (in ``folder``, which the store now owns) under a new session id."""
        session = SessionImage(uuid.uuid4().hex, folder, image, name)
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self.max_sessions:
                _, old = self._sessions.popitem(last=False)
                self._forget(old, f"evicted to make room for newer sessions (this server keeps {self.max_sessions}: "
                                  "samed-adapter serve --max-sessions)")
        return session

    def get(self, session_id: str) -> SessionImage:
        """The session, marked as just used; 404 for an id never given, 410 for one evicted or deleted."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._sessions.move_to_end(session_id)
                session.used = time.time()
                return session
            why = next((w for i, w in self._forgotten if i == session_id), None)
        if why is not None:
            raise SessionGoneError(f"session {session_id} was {why}; upload the image again (PUT /session/) and use "
                                   "the new session id")
        raise NotFoundError(f"no session {session_id!r} on this server (ids come from PUT /session/; a restarted server "
                            "has none): upload the image again")

    def remove(self, session_id: str) -> SessionImage:
        session = self.get(session_id)
        with self._lock:
            self._sessions.pop(session_id, None)
            self._forget(session, "deleted (DELETE /session/)")
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.folder.close()
            self._sessions.clear()

    def _forget(self, session: SessionImage, why: str) -> None:
        session.folder.close()
        self._forgotten.append((session.id, why))


# ------------------------------------------------------------------------------------- the clicks


@dataclass(frozen=True)
class Click:
    """One click on the uploaded image's voxel grid (nibabel's (i, j, k), as Slicer's IJK).

    ``label`` is the class id it refines, or None for a landmark on Slicer's "background"
    segment: it then removes the class the automatic labels have at that voxel (none: dropped).
    """

    label: Optional[int]
    point: tuple[int, int, int]
    positive: bool


def parse_clicks(params: dict[str, Any], class_names: list[str]) -> list[Click]:
    """The clicks in MONAI Label's ``params``, in the order they are applied.

    Two shapes, both what 3D Slicer's MONAI Label module sends:
    - deepgrow's: ``label`` (a class name), ``foreground`` and ``background`` lists of [i, j, k]:
      the foreground clicks, then the background ones, all refining that class;
    - deepedit's (a model of type "deepedit" with labels, as :mod:`.monai_label` lists a
      click-trained adapter): one list of landmarks per label name of the app, ``background``'s
      among them; every class's landmarks refine that class, the background's remove the class
      the automatic labels have there. ``label`` (the segment selected) changes nothing.
    """
    if "foreground" in params:
        positive = _points(params.get("foreground"), "foreground")
        negative = _points(params.get("background"), "background")
        if not (positive or negative):
            return []
        label = params.get("label")
        if not isinstance(label, str) or label not in class_names:
            raise BadRequestError(f"params.label={label!r}: name the class the clicks refine, one of {class_names}")
        target = class_names.index(label) + 1
        clicks = [Click(target, p, True) for p in positive] + [Click(target, p, False) for p in negative]
    else:
        clicks = [Click(i, p, True) for i, name in enumerate(class_names, start=1) for p in _points(params.get(name), name)]
        clicks += [Click(None, p, False) for p in _points(params.get("background"), "background")]
    if len(clicks) > MAX_CLICKS:
        raise BadRequestError(f"{len(clicks)} clicks in one request, more than {MAX_CLICKS}; send fewer")
    return clicks


def _points(value: Any, key: str) -> list[tuple[int, int, int]]:
    """A list of [i, j, k] voxel indices (whole numbers), or 400 naming ``key``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequestError(f"params.{key} must be a list of [i, j, k] voxel indices, got {type(value).__name__}")
    points = []
    for point in value:
        if not (isinstance(point, list) and len(point) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in point)):
            raise BadRequestError(f"params.{key}: {point!r} is not an [i, j, k] voxel index (three whole numbers)")
        points.append((int(point[0]), int(point[1]), int(point[2])))
    return points


@dataclass
class ClickRequest:
    """What the front asks a replica: the labels of ``image`` (NIfTI bytes, None to use the kept
    session ``session_id``) by version ``fingerprint`` of ``adapter``, after ``clicks``."""

    adapter: str
    fingerprint: str
    clicks: list[Click]
    session_id: Optional[str] = None
    image: Optional[bytes] = None
    suffix: str = ".nii.gz"

    @property
    def key(self) -> tuple[str, str, str]:
        return self.session_id or "", self.adapter, self.fingerprint


@dataclass
class ClickResult:
    """A replica's answer: the labels as an uncompressed NIfTI (the image ``segment`` writes for
    the same file), whether the session was built for it (the encoder ran), and where."""

    nifti: bytes
    built: bool
    replica: str = "local"
    times: dict[str, float] = field(default_factory=dict)


@dataclass
class SessionMissing:
    """The replica does not hold the session: send the request again with the image."""

    replica: str = "local"


# ----------------------------------------------------------------------------------- the replica


class KeptSessions:
    """One replica's click sessions by (session id, adapter, fingerprint): at most ``max_sessions``
    and ``max_bytes`` of them (:attr:`ClickSession.nbytes`), the least recently used out first."""

    def __init__(self, max_sessions: int, max_bytes: int) -> None:
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self._kept: OrderedDict[tuple[str, str, str], "ClickSession"] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._kept.values())

    def get(self, key: tuple[str, str, str]) -> Optional["ClickSession"]:
        session = self._kept.get(key)
        if session is not None:
            self._kept.move_to_end(key)
        return session

    def put(self, key: tuple[str, str, str], session: "ClickSession") -> bool:
        """Keep ``session``, evicting the oldest to fit; False (not kept) if it alone is over ``max_bytes``."""
        self._kept.pop(key, None)
        if session.nbytes > self.max_bytes:
            return False
        self._kept[key] = session
        while len(self._kept) > self.max_sessions or self.nbytes > self.max_bytes:
            self._kept.popitem(last=False)
        return True


def answer_clicks(serving: "ServingModel", kept: KeptSessions, request: ClickRequest, *, replica: str = "local",
                  tmp_dir: Optional[str] = None) -> Union[ClickResult, SessionMissing, ServeError]:
    """The labels for ``request`` on this replica: the automatic labels, then its clicks as one
    :meth:`ClickSession.refine` (taken back afterwards, so the kept session stays automatic:
    Slicer sends every click so far with each request). Runs on the replica's model thread."""
    from ..interactive.session import SessionChangedError

    start = time.perf_counter()
    with serving._lock:  # the model thread's batches swap adapters too
        slots, errors = serving.ensure([(request.adapter, request.fingerprint)])
        if errors:
            return next(iter(errors.values()))
        slot = next(iter(slots.values()))
        model = serving.model
        if model.active_adapter != slot:
            model.set_adapter(slot)
        session = kept.get(request.key) if request.session_id else None
        built = session is None
        if session is None:
            if request.image is None:
                return SessionMissing(replica)
            session = _build(model, request.image, request.suffix, tmp_dir)
            if request.session_id:
                kept.put(request.key, session)
        else:
            # A hot swap gives the model a new config object, which a session takes for another
            # adapter; the slot is this very version (name@fingerprint), so its embeddings hold.
            session.resume()
        encoded = time.perf_counter()
        try:
            clicks = _slice_clicks(session, request.clicks)
            if clicks:
                session.refine(clicks)
            nifti = session.label_image().to_bytes()  # before the undo: the image may view the session's labels
            if clicks:
                session.undo()
        except SessionChangedError as err:  # not expected: the slot was set above
            return ServeError(f"internal error: {err}")
    return ClickResult(nifti, built, replica, {"encode": encoded - start, "clicks": time.perf_counter() - encoded})


async def click_labels(call: Callable[[ClickRequest], Awaitable[Any]], entry: dict[str, Any], source: Path,
                       session: Optional[SessionImage], clicks: list[Click], out: Path,
                       times: dict[str, float]) -> tuple[ClickResult, bool]:
    """The front's side: the labels of ``source`` by the pinned version ``entry`` after ``clicks``,
    as a .nii.gz at ``out``, from a replica's click session through ``call`` (the session's own
    replica when it has one); and whether the request had to be sent again with the image (it
    reached a replica without the session). ``call`` raises what a replica answers as an error."""
    request = ClickRequest(entry["name"], entry["fingerprint"], clicks, session.id if session else None,
                           suffix=session_suffix(source))
    if session is None or entry["name"] not in session.answered:  # no replica holds it yet
        request.image = await asyncio.to_thread(source.read_bytes)
    result = await call(request)
    resent = isinstance(result, SessionMissing)
    if resent:  # routed to a replica without it, or evicted there: it builds it
        try:
            request.image = await asyncio.to_thread(source.read_bytes)
        except FileNotFoundError:
            raise SessionGoneError(f"session {request.session_id} was evicted while this request was being "
                                   "answered; upload the image again (PUT /session/)") from None
        result = await call(request)
    assert isinstance(result, ClickResult)
    if session is not None:
        session.answered.add(entry["name"])
    await asyncio.to_thread(gzip_nifti, result.nifti, out)
    times.update({f"replica_{k}": v for k, v in result.times.items()})
    return result, resent


def _build(model: Any, image: bytes, suffix: str, tmp_dir: Optional[str]) -> "ClickSession":
    """A click session over the NIfTI ``image`` (its file's own voxel grid), read from a private folder."""
    from ..interactive.session import ClickSession

    folder = Path(tempfile.mkdtemp(prefix="samed-session-", dir=tmp_dir))
    try:
        path = folder / f"image{suffix}"
        path.write_bytes(image)
        with warnings.catch_warnings():  # what segment says about the image; the front's answer does not carry it
            warnings.simplefilter("ignore")
            try:
                return ClickSession(model, str(path))
            except (ValueError, OSError) as err:
                raise UnprocessableError(str(err).replace(str(path), "the upload")) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _slice_clicks(session: "ClickSession", clicks: list[Click]) -> list[Any]:
    """Voxel clicks -> the session's SliceClicks (400 for a voxel outside the image)."""
    from ..interactive.prompts import SliceClick

    out = []
    for click in clicks:
        try:
            d, row, col = session.locate(click.point)
        except IndexError as err:
            raise BadRequestError(f"click at {list(click.point)}: {err}; clicks are [i, j, k] voxel indices of the "
                                  "uploaded image") from None
        label = click.label if click.label is not None else int(session.automatic[d, row, col])
        if label:
            out.append(SliceClick(label, d, row, col, click.positive))
    return out


def gzip_nifti(data: bytes, path: Path) -> Path:
    """Uncompressed NIfTI bytes -> the .nii.gz file ``path`` (the answer's label file)."""
    with gzip.open(path, "wb") as out:
        out.write(data)
    return path


def session_suffix(path: Path) -> str:
    """The upload's suffix for a click session: a NIfTI volume only (400 otherwise)."""
    name = path.name.lower()
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return suffix
    raise BadRequestError("clicks need a NIfTI volume (.nii, .nii.gz) as the image, as 3D Slicer uploads it; a DICOM "
                          "series zip segments automatically only")


def memory_bytes(text: str) -> int:
    """``--session-memory``: bytes, or with a K/M/G suffix (powers of 1024)."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in units else value
    try:
        result = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"--session-memory {text!r}: give bytes, or a number with K, M or G (e.g. 4G)") from None
    if result < 1:
        raise ValueError(f"--session-memory {text!r} must be above 0")
    return result
