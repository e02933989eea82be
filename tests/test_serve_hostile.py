"""The service against a hostile client: zips that list more members than they hold room for,
uploads that declare a body and never send it, more held requests than Ray Serve queues, and who
can reach the sockets of the Ray it starts. The server tests run a real one (local Ray, Ray
Serve's HTTP proxy, a tiny random SAM) and talk to it with raw sockets on 127.0.0.1."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from samed_adapter.serve import uploads
from samed_adapter.serve.errors import PayloadTooLargeError, UnprocessableError

_CENTRAL = struct.Struct("<4s6H3L5H2L")  # a central directory header (PKWARE APPNOTE 4.3.12)


def _central_entries(count: int) -> bytes:
    """``count`` central directory headers of one-byte names (47 bytes each), no data behind them."""
    entry = _CENTRAL.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    return entry * count


def _zip64_listing(path: Path, count: int) -> None:
    """A zip whose central directory lists ``count`` members, with the zip64 end records that
    a count over 65535 needs (as zipfile writes them)."""
    directory = _central_entries(count)
    eocd64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(directory), 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(directory), 1)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(directory + eocd64 + locator + eocd)


def _refused_before_parsing(monkeypatch, archive: Path, into: Path) -> tuple[str, int]:
    """unpack_series on ``archive``: (its 413 message, the peak of Python memory it took), with
    zipfile.ZipFile replaced by a trap that records being built."""
    built = []
    monkeypatch.setattr(uploads.zipfile, "ZipFile", lambda *a, **k: built.append(a) or pytest.fail("ZipFile built"))
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLargeError) as err:
            uploads.unpack_series(archive, into, max_bytes=1 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not built and not into.exists()
    return str(err.value), peak


def test_a_zip_listing_a_million_members_is_refused_from_its_end_record(tmp_path, monkeypatch):
    """47 MB listing a million members: zipfile would build a million ZipInfo (0.4 GB) first."""
    archive = tmp_path / "million.zip"
    _zip64_listing(archive, 1_000_000)
    assert archive.stat().st_size > 45e6
    message, peak = _refused_before_parsing(monkeypatch, archive, tmp_path / "series")
    assert "the zip holds 1000000 files, more than a series (20000)" in message, message
    assert peak < 1 << 20, peak  # the end records only: about 64 KiB


def test_a_zip_whose_end_record_understates_its_members_is_refused(tmp_path, monkeypatch):
    """The end record says 3; the central directory holds 100000 (zipfile reads by its size)."""
    directory = _central_entries(100_000)
    archive = tmp_path / "liar.zip"
    archive.write_bytes(directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 3, 3, len(directory), 0, 0))
    message, peak = _refused_before_parsing(monkeypatch, archive, tmp_path / "series")
    assert "more than 20000 files" in message and peak < 1 << 20, (message, peak)


def test_zip64_counts_as_zipfile_writes_them(tmp_path):
    """A real zip64 archive (zipfile's own writer, 70000 members) is refused on its count; a
    small zip behind a prefix (data before the zip, which zipfile accepts) still unpacks."""
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as zf:
        for i in range(70_000):
            zf.writestr(f"{i}.dcm", b"")
    with pytest.raises(PayloadTooLargeError, match="the zip holds 70000 files"):
        uploads.check_zip_entries(big)
    small = io.BytesIO()
    with zipfile.ZipFile(small, "w") as zf:
        for i in range(3):
            zf.writestr(f"series/{i}.dcm", b"DICM" * (i + 1))
    (tmp_path / "small.zip").write_bytes(b"#!prefix\n" + small.getvalue())
    out = uploads.unpack_series(tmp_path / "small.zip", tmp_path / "series", max_bytes=1 << 20)
    assert sorted(p.read_bytes() for p in out.iterdir()) == [b"DICM", b"DICM" * 2, b"DICM" * 3]
    (tmp_path / "not.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UnprocessableError, match="not a readable zip"):
        uploads.unpack_series(tmp_path / "not.zip", tmp_path / "none", max_bytes=1 << 20)


# --------------------------------------------------------------------------- a real server

TOKEN = "h0stile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_TIMEOUT = 6.0  # long enough for a loaded machine to see both stalled uploads in progress first
MAX_QUEUE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'samed-adapter[serve]'")
    import samed_adapter as sa
    from samed_adapter.segment.pipeline import SamSource
    from samed_adapter.serve import ServeSettings, start
    from samed_adapter.testing import random_adapter

    root = tmp_path_factory.mktemp("hostile")
    config = sa.AdapterConfig(num_classes=1, image_size=64, class_names=["liver"])
    random_adapter(sa.build_sam("tiny", seed=0), config, seed=5).save(root / "liver.safetensors")
    settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapters=[str(root)], port=_free_port(),
                             token=TOKEN, max_queue=MAX_QUEUE, body_timeout_s=BODY_TIMEOUT)
    with start(settings) as running:
        yield running


def _stalled(url: str, path: str, declared: int = 1 << 20) -> socket.socket:
    """A raw request that declares a ``declared``-byte multipart body, sends its first field, and stalls."""
    port = int(url.rsplit(":", 1)[1])
    conn = socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT + 60)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: multipart/form-data; boundary=stall\r\nContent-Length: {declared}\r\n\r\n"
            "--stall\r\nContent-Disposition: form-data; name=\"adapter\"\r\n\r\nliver\r\n")
    conn.sendall(head.encode())
    return conn


def _answer(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The one HTTP response on ``conn``: (status, headers in lower case, body); bounded by its timeout."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = conn.recv(65536)
        assert chunk, "the connection closed inside the answer"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _json_error(status: int, headers: dict[str, str], body: bytes) -> dict:
    """The JSON error body every error has (``{"error", "status"}``), checked against ``status``."""
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:200])
    answer = json.loads(body)
    assert answer["status"] == status and answer["error"], answer
    return answer


def _segment(server, scan: Path):
    import requests

    with open(scan, "rb") as f:
        return requests.post(f"{server.url}/v1/segment", headers=AUTH, data={"adapter": "liver"},
                             files={"file": ("ct.nii.gz", f)}, timeout=120)


def test_stalled_uploads_get_408_and_free_their_slots(server, tmp_path):
    """As many uploads as --max-queue declare a body and stall: every other upload got 503 until
    their clients closed. Now each gets 408 after --body-timeout, and the next upload is answered."""
    import requests

    from samed_adapter.testing.cli import random_scan

    scan = random_scan(tmp_path / "ct.nii.gz", shape=(40, 36, 3))
    stalled = [_stalled(server.url, "/v1/segment") for _ in range(MAX_QUEUE)]
    try:
        deadline = time.monotonic() + BODY_TIMEOUT
        while requests.get(f"{server.url}/healthz", timeout=30).json()["in_progress"] < MAX_QUEUE:
            assert time.monotonic() < deadline, "the stalled uploads never reached the front"
            time.sleep(0.1)
        busy = _segment(server, scan)  # while they hold every slot
        assert busy.status_code == 503 and busy.json()["status"] == 503, busy.text
        answers = [_answer(conn) for conn in stalled]
    finally:
        for conn in stalled:
            conn.close()
    for status, headers, body in answers:
        assert status == 408, (status, body)
        assert "--body-timeout" in _json_error(status, headers, body)["error"]
    done = _segment(server, scan)
    assert done.status_code == 200, done.text
    with zipfile.ZipFile(io.BytesIO(done.content)) as zf:
        assert "ct.nii.gz" in zf.namelist()
    assert requests.get(f"{server.url}/healthz", timeout=30).json()["in_progress"] == 0


def test_more_held_requests_than_ray_queues_still_get_json(server):
    """Requests that hold the front without a slot of --max-queue (a login whose body stalls):
    the front took --max-queue + 16 of them, Ray Serve queued --max-queue more and answered the
    rest itself, 503 in plain text. Now every answer is the front's, JSON."""
    import requests

    held = [_stalled(server.url, "/auth/token") for _ in range(MAX_QUEUE + 16 + MAX_QUEUE + 4)]
    try:
        info = requests.get(f"{server.url}/info/", headers=AUTH, timeout=60)
        assert info.status_code == 200 and info.json()["models"]["liver"]["labels"] == {"liver": 1}, info.text
        answers = [_answer(conn) for conn in held]
    finally:
        for conn in held:
            conn.close()
    assert sorted({status for status, _, _ in answers}) == [408], [(s, b[:80]) for s, _, b in answers]
    for answer in answers:
        _json_error(*answer)


def _is_loopback(host: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(host.split("%")[0])
    return address.is_loopback or getattr(address, "ipv4_mapped", None) is not None and address.ipv4_mapped.is_loopback


def test_the_ray_started_for_a_loopback_server_listens_on_loopback(server):
    """The server listens on 127.0.0.1; Ray's metrics exporters listened on 0.0.0.0 without a
    token, and its other sockets on every interface. The one socket per Serve replica that Ray
    binds to all interfaces itself ([::]:0 in ray/serve/_private/replica.py, for calls between
    deployments, behind Ray's token) is the only one allowed elsewhere."""
    psutil = pytest.importorskip("psutil", reason="psutil lists the sockets each process listens on")
    me = psutil.Process()
    elsewhere, processes = [], 0
    for proc in [me, *me.children(recursive=True)]:  # this process drives the Ray it started
        try:
            name = proc.name()
            ray = proc == me or name in ("raylet", "gcs_server") or name.startswith("ray::") or \
                any("/ray/" in part for part in proc.cmdline())  # Ray's monitor, dashboard, log monitor
            listening = [c.laddr for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN] if ray else []
        except psutil.Error:  # a process that ended meanwhile
            continue
        processes += bool(listening)
        wide = [f"{a.ip}:{a.port}" for a in listening if not _is_loopback(a.ip)]
        if name.startswith("ray::ServeReplica") and len(wide) == 1 and wide[0].startswith(":::"):
            continue
        elsewhere += [f"{name} {w}" for w in wide]
    assert processes >= 5, processes  # the GCS, the raylet, Ray's agents, Serve's proxy and replicas
    assert not elsewhere, elsewhere
