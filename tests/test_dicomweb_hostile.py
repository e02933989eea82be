"""A broken or hostile PACS (issue 28): a DICOMweb server of our own, in a thread on 127.0.0.1,
answers a study written to disk with one fault at a time. What it sends that was not asked for
(another patient's series, one series for every series, parts that are not DICOM) fails that
series and writes nothing for it; what would fill memory or never end (a multipart answer without
a boundary, a part that never ends, QIDO-RS pages without end, a byte at a time) stops at a bound
with one line naming the server and the limit; a STOW-RS the server takes and drops says that it
may hold part of it. Every server here stops by itself: its answers are bounded in bytes and time,
and the whole server shuts down after two minutes at most."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed: pip install 'samed-adapter[dicomweb]'")

import pydicom  # noqa: E402

from samed_adapter.dicomweb import segment_study  # noqa: E402
from samed_adapter.dicomweb.errors import BadAnswerError, LimitError  # noqa: E402
from samed_adapter.segment.pipeline import SamSource  # noqa: E402
from samed_adapter.testing.cli import run  # noqa: E402
from samed_adapter.testing.orthanc import organs_adapter, write_study  # noqa: E402

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]
BOUNDARY = "samed-hostile-boundary"
#: What any one answer of these servers sends at most, and for how long: a client without bounds
#: gets a finite (if large) answer, so that a test of an unfixed client fails instead of hanging.
SERVER_BYTES = 48 << 20
SERVER_SECONDS = 20.0


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


class Study:
    """The study a hostile server answers from: its files by series, and its QIDO-RS JSON."""

    def __init__(self, folder: Path, series: int = 3, patient_id: str = "SAMED-0001") -> None:
        made = write_study(folder, ct_series=series, patient_id=patient_id)
        self.uid, self.patient_id, self.series = made["study"], patient_id, made["ct"]
        self.files = {uid: sorted(made["folders"][uid].iterdir()) for uid in self.series}

    def study_json(self) -> list[dict[str, Any]]:
        return [{"0020000D": _element("UI", self.uid), "00100020": _element("LO", self.patient_id)}]

    def series_json(self) -> list[dict[str, Any]]:
        return [{"0020000E": _element("UI", uid), "00080060": _element("CS", "CT"),
                 "00200011": _element("IS", k + 2), "0008103E": _element("LO", f"axial {k + 1}")}
                for k, uid in enumerate(self.series)]

    def instances_json(self, series: str) -> list[dict[str, Any]]:
        return [{"00080018": _element("UI", str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))}
                for f in self.files[series]]


def multipart(parts: list[bytes]) -> bytes:
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts)
    return body + b"--" + BOUNDARY.encode() + b"--\r\n"


MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


class Handler(BaseHTTPRequestHandler):
    """Routes DICOMweb requests to the server's ``answer(handler, route, query)``."""

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        parts = urlsplit(self.path)
        route = parts.path.strip("/").split("/")[1:]  # after "dicom-web"
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        try:
            self.server.answer(self, route, query)  # type: ignore[attr-defined]
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the client gave up: what these tests want

    def do_POST(self) -> None:  # noqa: N802
        self.server.stow(self)  # type: ignore[attr-defined]

    def send(self, content_type: str, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream(self, content_type: str, chunks: Iterator[bytes]) -> None:
        """An answer without a length (HTTP/1.0: it ends when the connection closes), sent as made,
        up to SERVER_BYTES and SERVER_SECONDS."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        sent, started = 0, time.monotonic()
        for chunk in chunks:
            if sent > SERVER_BYTES or time.monotonic() - started > SERVER_SECONDS:
                return
            self.wfile.write(chunk)
            self.wfile.flush()
            sent += len(chunk)


class HostilePacs(ThreadingHTTPServer):
    """A DICOMweb server answering ``study`` honestly, except where a fault is given.

    Faults (each optional): ``wado(series_uid) -> (content type, chunks)``; ``series_page(offset)
    -> JSON-able or bytes``; ``stow``: ``"drop"`` reads the request and closes without an answer.
    """

    daemon_threads = True

    def __init__(self, study: Study, *, wado: Optional[Callable] = None, series_page: Optional[Callable] = None,
                 stow: Optional[str] = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.study, self.wado, self.series_page, self.stow_fault = study, wado, series_page, stow
        self.stowed: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"

    def answer(self, handler: Handler, route: list[str], query: dict[str, str]) -> None:
        study = self.study
        if route == ["studies"]:
            return handler.send("application/dicom+json", json.dumps(study.study_json()).encode())
        if len(route) == 3 and route[2] == "series":
            if self.series_page is not None:
                page = self.series_page(int(query.get("offset", 0)))
                if isinstance(page, Iterator):
                    return handler.stream("application/dicom+json", page)
                return handler.send("application/dicom+json", page if isinstance(page, bytes) else
                                    json.dumps(page).encode())
            offset = int(query.get("offset", 0))
            return handler.send("application/dicom+json", json.dumps(study.series_json()[offset:]).encode())
        if len(route) == 5 and route[4] == "instances":
            return handler.send("application/dicom+json", json.dumps(study.instances_json(route[3])).encode())
        if len(route) == 4 and route[2] == "series":
            if self.wado is not None:
                content_type, chunks = self.wado(route[3])
                return handler.stream(content_type, chunks)
            return handler.send(MULTIPART, multipart([f.read_bytes() for f in study.files[route[3]]]))
        handler.send("application/json", b"[]", status=404)

    def stow(self, handler: Handler) -> None:
        length = int(handler.headers.get("Content-Length", 0))
        body = handler.rfile.read(length) if length else b""
        self.stowed.append(len(body))
        if self.stow_fault == "drop":
            return  # took it all, answers nothing: the connection closes (HTTP/1.0)
        handler.send("application/dicom+json", b"{}")

    def __enter__(self) -> "HostilePacs":
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._stop = threading.Timer(120.0, self.shutdown)  # stops by itself, whatever the test does
        self._stop.daemon = True
        self._stop.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.cancel()
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A random adapter on the tiny random SAM that predicts several classes on CT_small."""
    return organs_adapter(tmp_path_factory.mktemp("adapter") / "organs.safetensors")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Study:
    return Study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> Study:
    """Another patient's study, whose series a hostile server sends instead."""
    return Study(tmp_path_factory.mktemp("stranger"), series=1, patient_id="SOMEONE-ELSE")


def _files(study: Study, series: str, change: Optional[Callable[[Any], None]] = None) -> list[bytes]:
    found = []
    for path in study.files[series]:
        ds = pydicom.dcmread(path)
        if change is not None:
            change(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        found.append(buffer.getvalue())
    return found


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "warning: using random SAM weights" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


# --- 2: what the PACS sends is what was asked for -------------------------------------------------------------

def test_another_patients_series_fails_that_series_and_writes_nothing_for_it(study, stranger, adapter, tmp_path,
                                                                             capsys):
    first, second, third = study.series

    def wado(series: str):
        if series == first:  # another patient's series (of another study) instead of this one
            return MULTIPART, iter([multipart(_files(stranger, stranger.series[0]))])
        if series == second:  # this series' UIDs, another patient's instances
            return MULTIPART, iter([multipart(_files(study, second, lambda ds: setattr(ds, "PatientID", "X-9")))])
        return MULTIPART, iter([multipart(_files(study, series))])

    with HostilePacs(study, wado=wado) as pacs:
        code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", pacs.url, "--study",
                             study.uid, "-o", tmp_path / "out")
    assert code == 1 and "Traceback" not in err, err
    assert f"series 2_axial_1: the server sent an instance of study {stranger.uid}, not of study {study.uid} as " \
           "asked (WADO-RS); nothing of this series was segmented or stored" in err, err
    assert "series 3_axial_2: the server sent an instance of another patient (its PatientID is not the study's)" \
           in err, err
    assert "SOMEONE-ELSE" not in out + err and "X-9" not in out + err  # the other patient is not named
    assert "series 4_axial_3 -> " in out and "segmented 1 of 3 series of 1 study" in out and "2 failed" in out, out
    assert _outputs(tmp_path / "out") == ["4_axial_3.nii.gz"]  # the rest went on; nothing for the two


def test_one_series_sent_for_every_series_is_segmented_once(study, adapter, tmp_path):
    first = study.series[0]
    with HostilePacs(study, wado=lambda series: (MULTIPART, iter([multipart(_files(study, first))]))) as pacs:
        result = segment_study(pacs.url, study.uid, sam=SamSource(backbone="tiny", seed=0), adapter=adapter,
                               output_dir=tmp_path / "out")
    assert [(s.name, s.status) for s in result.series] == \
           [("2_axial_1", "written"), ("3_axial_2", "failed"), ("4_axial_3", "failed")]
    for s, uid in zip(result.series[1:], study.series[1:]):
        assert f"the server sent an instance of series {first}, not of series {uid} as asked" in s.message
    assert _outputs(tmp_path / "out") == ["2_axial_1.nii.gz"]


def test_instances_missing_or_sent_twice_fail_the_series(study, adapter, tmp_path):
    first, second = study.series[:2]

    def wado(series: str):
        parts = _files(study, series)
        return MULTIPART, iter([multipart(parts[:2] if series == first else parts + parts[:1])])

    with HostilePacs(study, wado=wado) as pacs:
        result = segment_study(pacs.url, study.uid, series=[first, second], sam=SamSource(backbone="tiny", seed=0),
                               adapter=adapter, output_dir=tmp_path / "out")
    assert [s.status for s in result.series] == ["failed", "failed"]
    assert "the server sent 2 of the 4 instances QIDO-RS lists in this series" in result.series[0].message
    assert "twice" in result.series[1].message
    assert _outputs(tmp_path / "out") == []


# --- 6: a broken or hostile PACS cannot exhaust memory or hang a run ----------------------------------------------

def _endless(head: bytes = b"", piece: bytes = b"\0" * 65536) -> Iterator[bytes]:
    yield head
    while True:
        yield piece


def _fails(pacs: HostilePacs, study: Study, adapter: Path, tmp_path: Path, error: type, match: str, **limits: Any):
    with pytest.raises(error, match=match) as caught:
        segment_study(pacs.url, study.uid, sam=SamSource(backbone="tiny", seed=0), adapter=adapter,
                      output_dir=tmp_path / "out", **limits)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{pacs.url}: "), message
    assert _outputs(tmp_path / "out") == []
    return message


def test_a_multipart_answer_without_a_boundary_stops_at_the_instance_limit(study, adapter, tmp_path):
    with HostilePacs(study, wado=lambda s: ('multipart/related; type="application/dicom"', _endless())) as pacs:
        message = _fails(pacs, study, adapter, tmp_path, LimitError, "an instance of more than --max-instance-size 1M",
                         max_instance_bytes=1 << 20)
    assert "(Python: max_instance_bytes=)" in message and "while fetching series 2 (axial 1" in message


def test_a_part_that_never_ends_stops_at_the_instance_limit(study, adapter, tmp_path):
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    with HostilePacs(study, wado=lambda s: (MULTIPART, _endless(head))) as pacs:
        _fails(pacs, study, adapter, tmp_path, LimitError, "an instance of more than --max-instance-size 512K",
               max_instance_bytes=512 << 10)


def test_a_series_over_its_limit_stops_although_each_instance_is_small(study, adapter, tmp_path):
    # Four instances of about 33 KB each, every one the series' own: the third passes the series limit.
    with HostilePacs(study) as pacs:
        _fails(pacs, study, adapter, tmp_path, LimitError, "a series of more than --max-series-size 80K",
               max_series_bytes=80 << 10)


def test_the_instance_count_restarts_at_every_boundary_even_one_split_between_pieces():
    """What the instance limit counts: the bytes since the last multipart boundary, however the answer
    arrives in pieces (a boundary may straddle two reads)."""
    import random

    from samed_adapter.dicomweb.limits import Limits, _CappedBody

    rng = random.Random(0)
    for _ in range(2000):
        marker = b"--" + bytes(rng.choice(b"ab") for _ in range(rng.randint(1, 4)))
        body = bytes(rng.choice(b"-ab.") for _ in range(rng.randint(0, 60)))
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randint(0, 8))))
        counted = _CappedBody(None, Limits(), "server", f"multipart/related; boundary={marker[2:].decode()}")
        for start, end in zip([0, *cuts], [*cuts, len(body)]):
            if end > start:
                counted._count(body[start:end])
        at = body.rfind(marker)
        assert counted._part == (len(body) - at - len(marker) if at >= 0 else len(body)), (marker, body, cuts)


def test_qido_pages_of_new_series_without_end_stop_at_the_page_and_series_limits(study, adapter, tmp_path, capsys):
    def page(offset: int) -> list[dict[str, Any]]:  # 200 new series on every page, whatever the offset
        return [{"0020000E": _element("UI", f"1.2.3.{offset + k}"), "00080060": _element("CS", "CT")}
                for k in range(200)]

    with HostilePacs(study, series_page=page) as pacs:
        _fails(pacs, study, adapter, tmp_path, LimitError, "more than --max-pages 3 QIDO-RS pages", max_pages=3)
        _fails(pacs, study, adapter, tmp_path, LimitError, "more than --max-series 250 series", max_series=250)
        code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", pacs.url, "--study",
                           study.uid, "-o", tmp_path / "out", "--max-pages", "2")
    line = _one_error_line(err)
    assert code == 2 and f"{pacs.url}: answered more than --max-pages 2 QIDO-RS pages" in line, line
    assert "while searching for the series of study" in line and "raise the limit" in line, line


def test_an_answer_of_a_byte_at_a_time_stops_at_the_run_time_limit(study, adapter, tmp_path, capsys):
    def drip(offset: int) -> Iterator[bytes]:
        yield b"["
        while True:
            time.sleep(0.05)
            yield b" "

    with HostilePacs(study, series_page=drip) as pacs:
        started = time.monotonic()
        _fails(pacs, study, adapter, tmp_path, LimitError, "the run took longer than --max-run-time 1s",
               max_run_time=1.0)
        assert time.monotonic() - started < SERVER_SECONDS / 2  # not hanging until the server gives up
        code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", pacs.url, "--study",
                           study.uid, "-o", tmp_path / "out", "--max-run-time", "2s")
    line = _one_error_line(err)
    assert code == 2 and "the run took longer than --max-run-time 2s" in line, line


@pytest.mark.parametrize("body, match", [
    (b"{not json", "answered what is not JSON"),
    (b'{"0020000E": 3}', r"answered what is not DICOM JSON \(tag 0020000E is not an element"),
    (b"[1, 2]", r"answered what is not DICOM JSON \(a int where a data set belongs\)"),
    (b'[{"0020000E": {"vr": "UI", "Value": "1.2"}}]', "is not an element with a list of values"),
])
def test_malformed_qido_json_is_one_line(body, match, study, adapter, tmp_path, capsys):
    with HostilePacs(study, series_page=lambda offset: body) as pacs:
        _fails(pacs, study, adapter, tmp_path, BadAnswerError, match)
        code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", pacs.url, "--study",
                           study.uid, "-o", tmp_path / "out")
    line = _one_error_line(err)
    assert code == 2 and "while searching for the series of study" in line, line


def test_wado_parts_that_are_not_dicom_fail_their_series_in_one_line(study, adapter, tmp_path, capsys):
    def wado(series: str):
        if series == study.series[0]:
            return MULTIPART, iter([multipart([b"<html>not found</html>"])])
        if series == study.series[1]:  # not multipart at all, no boundary: one part of garbage
            return "multipart/related", iter([b"\x00" * 1000])
        return "text/html", iter([b"<html>a login page</html>"])

    with HostilePacs(study, wado=wado) as pacs:
        code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", pacs.url, "--study",
                             study.uid, "-o", tmp_path / "out")
    assert code == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 3 and all("the server sent a part that is not DICOM" in e for e in errors), err
    assert "segmented 0 of 3 series" in out and _outputs(tmp_path / "out") == []


# --- 11: a STOW-RS the server takes and drops ------------------------------------------------------------------

def test_a_stow_request_taken_and_dropped_says_the_server_may_hold_part(study, adapter, tmp_path, capsys):
    with HostilePacs(study, stow="drop") as pacs:
        code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, "--dicomweb", pacs.url, "--study",
                             study.uid, "--series", study.series[0], "--store", "-o", tmp_path / "out")
        assert pacs.stowed and pacs.stowed[0] > 1000  # it took the whole request
    line = _one_error_line(err)
    assert code == 2 and "went away while storing the results of series 2_axial_1 (STOW-RS)" in line, line
    assert "the server may hold part of the results of series 2_axial_1" in line and "--continue" in line, line
    assert "nothing was stored" not in line, line


@pytest.mark.parametrize("argv, message", [
    (["--max-pages", "3", "x.nii.gz", "-o", "o"], "--max-pages goes with --dicomweb URL"),
    (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2", "-o", "o", "--max-instance-size", "2X"],
     "argument --max-instance-size: '2X' is not a size; give bytes, e.g. 500M, 2G or 1048576"),
    (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2", "-o", "o", "--max-run-time", "soon"],
     "argument --max-run-time: 'soon' is not a duration"),
    (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2", "-o", "o", "--max-series", "0"],
     "argument --max-series: '0' is not a positive whole number"),
])
def test_limit_flags_are_checked_before_any_work(argv, message, capsys):
    try:
        code, _, err = run(capsys, "segment", *TINY, "--adapter", "missing.safetensors", *argv)
    except SystemExit as stop:  # argparse's own refusal of a flag's value
        code, err = stop.code, capsys.readouterr().err
    assert code == 2 and message in err, err
