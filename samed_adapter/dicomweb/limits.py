"""Bounds on what a DICOMweb server may make a run hold or wait for (a broken or hostile PACS).

Every request a run makes goes through a :func:`bounded_session`: its answer is read as a stream
whatever the caller asked, in pieces as they come (``read1``: a byte every 20 s is seen as it
arrives, not after a full buffer), counted as it is read, and given up once it passes a bound:

- ``max_instance_bytes``: one instance of a WADO-RS answer (the bytes since the last multipart
  boundary; a multipart answer without a boundary is one instance), or a whole answer that is
  not multipart (a QIDO-RS page, a series' metadata);
- ``max_series_bytes``: one multipart answer (a series, fetched with one request);
- ``max_series``: the series of one study; ``max_pages``: the pages of one QIDO-RS search;
- ``max_run_time``: the whole run, from the :class:`Limits` being made to its last answer
  (each request's socket timeout is cut to the time left, too).

Each bound gives a :class:`LimitError`: one line naming the server and the limit to raise.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from .errors import LimitError, shown_url

__all__ = ["LimitError", "Limits", "bounded_session", "parse_duration", "parse_size", "shown_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: The bounds of :class:`Limits`, as its fields and keyword arguments name them.
_BOUNDS = ("max_instance_bytes", "max_series_bytes", "max_series", "max_pages", "max_run_time")


def parse_size(text: str) -> int:
    """``2G`` -> 2147483648: bytes, with an optional K, M, G or T (powers of 1024; ``iB``/``B`` allowed)."""
    found = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if found is None or int(found.group(1)) < 1:
        raise ValueError(f"{text!r} is not a size; give bytes, e.g. 500M, 2G or 1048576")
    return int(found.group(1)) * _UNITS[found.group(2).upper()]


def parse_duration(text: str) -> float:
    """``90m`` -> 5400.0: seconds, with an optional s, m, h or d."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text), re.IGNORECASE)
    if found is None or float(found.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration; give seconds, or e.g. 90m, 24h, 2d")
    return float(found.group(1)) * _SECONDS[found.group(2).lower()]


def shown_size(size: int) -> str:
    """``2147483648`` -> ``2G``, ``1536`` -> ``1536``: as :func:`parse_size` reads it back."""
    for unit in ("T", "G", "M", "K"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def _shown_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= _SECONDS[unit] and seconds % _SECONDS[unit] == 0:
            return f"{int(seconds // _SECONDS[unit])}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Limits:
    """What one run accepts from a server; the defaults are beyond any real study.

    Made when a run starts: ``max_run_time`` counts from then (``started``, ``time.monotonic()``).
    ``flags``: how messages name each bound for the caller (command-line flags by default).
    """

    max_instance_bytes: int = 2 << 30
    max_series_bytes: int = 64 << 30
    max_series: int = 2000
    max_pages: int = 1000
    max_run_time: float = 24 * 3600.0
    started: float = field(default_factory=time.monotonic, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in _BOUNDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    @classmethod
    def take(cls, options: dict[str, Any]) -> "Limits":
        """The ``limits=`` of ``options``, else one made of its ``max_*`` keyword arguments (both popped)."""
        given = {name: value for name in _BOUNDS if (value := options.pop(name, None)) is not None}
        limits = options.pop("limits", None)
        if limits is not None and given:
            raise ValueError(f"give either limits= or {', '.join(given)}, not both")
        return limits if limits is not None else cls(**given)

    def left(self) -> float:
        """Seconds left of ``max_run_time``."""
        return self.max_run_time - (time.monotonic() - self.started)

    def check_time(self, server: str) -> None:
        if self.left() <= 0:
            raise LimitError(server, f"the run took longer than --max-run-time {_shown_duration(self.max_run_time)} "
                             "(Python: max_run_time=)", "a server that answers this slowly is broken: check it, or "
                             "raise the limit, then run again with --continue")

    def too_big(self, server: str, what: str, flag: str, size: int) -> LimitError:
        python = {"--max-instance-size": "max_instance_bytes", "--max-series-size": "max_series_bytes"}[flag]
        return LimitError(server, f"sent {what} of more than {flag} {shown_size(size)} (Python: {python}=)",
                          "no real study has one so large: check the server, or raise the limit")

    def too_many(self, server: str, what: str, flag: str, count: int) -> LimitError:
        python = {"--max-series": "max_series", "--max-pages": "max_pages"}[flag]
        return LimitError(server, f"answered more than {flag} {count} {what} (Python: {python}=)",
                          "no real study has so many: check the server, or raise the limit")


def _boundary(content_type: str) -> Optional[bytes]:
    """The multipart boundary of a Content-Type, as the body's delimiter ``--boundary``; None without one."""
    for item in content_type.split(";")[1:]:
        name, _, value = item.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return b"--" + value.strip().strip('"').encode("latin-1")
    return None


class _CappedBody:
    """A urllib3 response body read in pieces as they arrive, counted, and cut at the limits.

    requests reads a body through ``raw.stream()`` (``Response.content`` and ``iter_content``
    both); everything else is the wrapped response's.
    """

    def __init__(self, raw: Any, limits: Limits, server: str, content_type: str) -> None:
        self._raw, self._limits, self._server = raw, limits, server
        self._multipart = content_type.strip().lower().startswith("multipart/")
        self._marker = _boundary(content_type) if self._multipart else None
        self._total = 0
        self._part = 0  # bytes since the last boundary: the instance being read
        self._tail = b""  # the end of the last piece, for a boundary split between two pieces

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def stream(self, amt: int = 1 << 16, decode_content: Optional[bool] = None) -> Iterator[bytes]:
        while True:
            self._limits.check_time(self._server)
            chunk = self._raw.read1(amt, decode_content=decode_content)
            if not chunk:
                return
            self._count(chunk)
            yield chunk

    def read(self, amt: Optional[int] = None, **kwargs: Any) -> bytes:
        if amt is None:  # all of it, through the counted pieces
            return b"".join(self.stream(1 << 16, kwargs.get("decode_content")))
        self._limits.check_time(self._server)
        chunk = self._raw.read1(amt, **kwargs)
        self._count(chunk or b"")
        return chunk

    def _count(self, chunk: bytes) -> None:
        self._total += len(chunk)
        if self._marker is not None:
            marker = self._marker
            at = chunk.rfind(marker)
            if at >= 0:
                self._part = len(chunk) - at - len(marker)
            else:  # a marker split between the last piece and this one (only the edges are joined: no copy)
                edge = self._tail + chunk[:len(marker) - 1]
                split = edge.rfind(marker)
                self._part = len(edge) - split - len(marker) + len(chunk) - min(len(chunk), len(marker) - 1) \
                    if split >= 0 else self._part + len(chunk)
            self._tail = (self._tail + chunk)[-(len(marker) - 1):] if len(chunk) < len(marker) else \
                chunk[-(len(marker) - 1):]
        else:
            self._part = self._total
        limits = self._limits
        if self._multipart and self._total > limits.max_series_bytes:
            raise limits.too_big(self._server, "a series", "--max-series-size", limits.max_series_bytes)
        if self._part > limits.max_instance_bytes:
            what = "an instance" if self._multipart else "an answer"
            raise limits.too_big(self._server, what, "--max-instance-size", limits.max_instance_bytes)


def bounded_session(url: str, limits: Limits) -> Any:
    """A ``requests.Session`` for the server ``url`` whose every answer is read under ``limits``."""
    import requests

    server = shown_url(url)

    class _Session(requests.Session):
        def send(self, request: Any, **kwargs: Any) -> Any:
            limits.check_time(server)
            wanted = kwargs.get("stream", False)
            kwargs["stream"] = True  # the body is read here, counted, not by requests in one piece
            kwargs["timeout"] = _cut(kwargs.get("timeout"), limits.left())
            response = super().send(request, **kwargs)
            if not wanted:
                response.content  # noqa: B018 - read now, under the limits, as requests would have
            return response

    def capped(response: Any, **_: Any) -> Any:
        # A hook runs before requests reads anything of the body, redirects included.
        if not isinstance(response.raw, _CappedBody):
            response.raw = _CappedBody(response.raw, limits, server, response.headers.get("Content-Type", ""))
        return response

    session = _Session()
    session.hooks["response"].append(capped)
    return session


def _cut(timeout: Any, left: float) -> Any:
    """A requests timeout (seconds, or (connect, read)) no longer than ``left`` seconds."""
    left = max(left, 0.001)
    if timeout is None:
        return (left, left)
    if isinstance(timeout, tuple):
        return tuple(left if t is None else min(float(t), left) for t in timeout)
    return min(float(timeout), left)
