"""What a local `segment` writes can be trusted (issue 28): two runs into one folder leave each
label file beside its own record, the quick start's next step works, and the small words of
the command line are true."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import samed_adapter as sa
from samed_adapter.segment import outputs, pipeline
from samed_adapter.segment.pipeline import SamSource
from samed_adapter.testing.cli import random_scan, run, two_adapters

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    return two_adapters(tmp_path_factory.mktemp("adapters"))


_scan = random_scan


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# --------------------------------------------------------------------------- two runs, one folder


def _crossed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make two runs write each input at the same moment, in the order that crosses them: both
    reach an input's write_prepared together (a barrier per label file); the first there writes
    its label file late and its record at once, the second its label file at once and its record
    later still. Unlocked, that leaves the first's labels beside the second's record, every time;
    under the lock, whichever holds it writes both before the other starts."""
    import samed_adapter.io as sio

    barriers: dict[Path, threading.Barrier] = {}
    guard = threading.Lock()
    arrived = threading.local()  # 0 or 1: this writer's place at its input's barrier

    def meet(label_path: Path) -> None:
        with guard:
            barrier = barriers.setdefault(Path(label_path), threading.Barrier(2, timeout=20))
        try:
            arrived.place = barrier.wait()
        except threading.BrokenBarrierError:  # the other run failed this input: nothing to meet
            arrived.place = 0

    real_write, real_labels, real_json = pipeline.write_prepared, sio.write_labels, outputs._write_json

    def write_prepared(prepared, labels, probs, label_path, *args, **kwargs):
        meet(label_path)
        return real_write(prepared, labels, probs, label_path, *args, **kwargs)

    def write_labels(*args, **kwargs):
        time.sleep(0.05 if arrived.place == 0 else 0.0)
        return real_labels(*args, **kwargs)

    def write_json(data, path):
        if "adapter_fingerprint" in data and "pending" not in data:  # the finished record
            time.sleep(0.1 if arrived.place == 1 else 0.0)
        return real_json(data, path)

    monkeypatch.setattr(pipeline, "write_prepared", write_prepared)
    monkeypatch.setattr(sio, "write_labels", write_labels)
    monkeypatch.setattr(outputs, "_write_json", write_json)


def test_two_runs_into_one_folder_leave_each_label_file_beside_its_own_record(adapters, tmp_path, monkeypatch):
    """Two runs with different adapters write the same 12 outputs at the same moments: every
    label file is the one its record's adapter gives, byte for byte in its labels, and a later
    --continue with either adapter skips exactly the inputs whose record is its own."""
    src = [_scan(tmp_path / "in" / f"s{i:02d}.nii.gz", seed=i) for i in range(12)]
    fingerprint = {sa.Adapter.load(path).fingerprint: name for name, path in adapters.items()}
    sams = {name: sa.build_sam("tiny", seed=0) for name in adapters}
    expected = {}
    for name in adapters:  # each adapter alone: the labels it gives
        sa.segment_files(src, tmp_path / f"alone_{name}", sam=SamSource(module=sams[name]), adapter=adapters[name],
                         engine="serial")
        expected[name] = {p.name: _labels(tmp_path / f"alone_{name}" / p.name) for p in src}
    assert sum(not np.array_equal(expected["a"][k], expected["b"][k]) for k in expected["a"]) >= 10

    _crossed(monkeypatch)
    out = tmp_path / "out"
    results: dict[str, list] = {}

    def segment(name: str, engine: str) -> None:
        results[name] = sa.segment_files(src, out, sam=SamSource(module=sams[name]), adapter=adapters[name],
                                         engine=engine, num_workers=1)

    threads = [threading.Thread(target=segment, args=("a", "pipeline")),
               threading.Thread(target=segment, args=("b", "serial"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(r.status == "written" for name in adapters for r in results[name]), results

    owner = {}
    for path in src:
        record = json.loads(outputs.record_path(out / path.name).read_text())
        assert "pending" not in record
        owner[path.name] = fingerprint[record["adapter_fingerprint"]]
        np.testing.assert_array_equal(_labels(out / path.name), expected[owner[path.name]][path.name],
                                      err_msg=f"{path.name}: not the labels of the adapter its record names")
    assert not list(out.glob(".*.lock")) and not list(out.glob(".*.tmp*"))
    monkeypatch.undo()
    for name in adapters:  # --continue trusts exactly the records that are its own
        shutil.copytree(out, tmp_path / f"again_{name}")
        done = sa.segment_files(src, tmp_path / f"again_{name}", sam=SamSource(module=sams[name]),
                                adapter=adapters[name], engine="serial", skip_existing=True)
        assert sorted(Path(r.name).name for r in done if r.status == "skipped") == \
            sorted(k for k, v in owner.items() if v == name)


@pytest.mark.parametrize("via", ["local", "server"])
def test_an_input_another_run_holds_waits_and_then_fails_with_the_lock_named(adapters, capsys, tmp_path,
                                                                            monkeypatch, via):
    """A run whose outputs another run holds (here: the test) waits for it, then fails that input
    with one line naming the lock and --continue; the other inputs are written, nothing of it.
    With --server the client takes the same lock before it writes what the server sent."""
    import contextlib

    from samed_adapter.io.files import held_lock

    src = [_scan(tmp_path / "in" / f"s{i}.nii.gz", seed=i) for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(outputs, "LOCK_TIMEOUT", 0.5)
    with contextlib.ExitStack() as stack:
        if via == "server":
            server = stack.enter_context(_StandIn(adapters["a"], tmp_path / "server"))
            how = ["--server", server.url, "--adapter", "a"]
        else:
            how = [*TINY, "--adapter", adapters["a"]]
        with held_lock(outputs.lock_path(out / "s0.nii.gz"), timeout=1):
            code, stdout, err = run(capsys, "segment", *how, *src, "-o", out)
    assert code == 1 and "segmented 1 of 2 inputs" in stdout, err
    assert "another samed-adapter run has been writing" in err and ".s0.samed-adapter.lock" in err
    assert "--continue" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [".s1.samed-adapter.json", "s1.nii.gz"]


def test_a_lock_left_by_a_killed_run_is_taken_and_removed(adapters, capsys, tmp_path):
    """A run killed while writing leaves its lock file (the kernel releases the lock itself) and
    its temporaries: the next run takes the lock, removes both, and writes."""
    src = _scan(tmp_path / "in" / "s0.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    outputs.lock_path(out / "s0.nii.gz").write_text("")
    stale = out / ".s0.0123456789ab.tmp.nii.gz"
    stale.write_bytes(b"half a file")
    other = out / ".s0.v2.0123456789ab.tmp.nii.gz"  # s0.v2.nii.gz's, which this run does not write
    other.write_bytes(b"someone else's")
    code, stdout, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], src, "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".s0.samed-adapter.json", other.name, "s0.nii.gz"]


# --------------------------------------------------------------------------- the quick start's next step

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> tuple[list[str], list[str]]:
    """The README's quick start command (the last step of its first install line) and the
    `segment` command it says the quick start prints, as argument lists."""
    text = README.read_text(encoding="utf-8")
    install = re.search(r"```bash\n# 1\. install.*?\n```", text, re.S)
    assert install is not None, "README: the install block (# 1. install ...) is gone"
    quickstart = shlex.split(install.group(0).replace("\\\n", " ").splitlines()[2].split("&&")[-1])
    after = text.index("It ends by printing the `segment` command")
    segment = re.search(r"```bash\n(.*?)\n```", text[after:], re.S)
    assert segment is not None, "README: the segment command after the quick start is gone"
    return quickstart, shlex.split(segment.group(1).replace("\\\n", " "))


def test_the_readmes_quick_start_then_its_segment_command_give_the_same_labels(capsys, tmp_path, monkeypatch):
    """The README's commands in sequence, in a fresh folder: `python examples/quickstart.py`
    (with fewer epochs at a smaller size, for time), the command it prints (which is the README's
    next one), a --continue that trusts the quick start's own record, and the README's command,
    which makes the labels again: each exits 0, and the labels are the quick start's."""
    import runpy
    import sys

    quickstart, segment = _readme_commands()
    assert quickstart[:2] == ["python", "examples/quickstart.py"] and segment[:2] == ["samed-adapter", "segment"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [*quickstart[1:], "--epochs", "10", "--image-size", "64"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(README.parent / quickstart[1]), run_name="__main__")
    stdout = capsys.readouterr().out
    assert exited.value.code == 0, stdout
    printed = shlex.split(stdout.split("the same from the command line:\n", 1)[1].splitlines()[0])
    assert printed == segment, "the quick start prints another command than the README shows"
    label_file = tmp_path / segment[segment.index("-o") + 1] / "mni_val.nii.gz"
    made = _labels(label_file)
    assert len(np.unique(made)) == 3

    # The quick start's record is the one `segment` writes: --continue (without --overlay) trusts it.
    code, stdout, err = run(capsys, *segment[1:-1], "--continue")
    assert code == 0 and "segmented 0 of 1 inputs" in stdout and "1 skipped" in stdout, err
    code, stdout, err = run(capsys, *segment[1:])
    assert code == 0 and "segmented 1 of 1 inputs" in stdout, err
    np.testing.assert_array_equal(_labels(label_file), made)
    assert (label_file.parent / "mni_val_overlay.png").is_file()


def test_segment_file_writes_the_record_that_segment_trusts(adapters, capsys, tmp_path):
    """Python's segment_file writes what `segment` writes, record included: a later `segment` into
    that folder makes its files again, and with --continue skips them."""
    scan = _scan(tmp_path / "in" / "s0.nii.gz")
    sa.segment_file(scan, tmp_path / "out" / "s0.nii.gz", sam=sa.build_sam("tiny", seed=0), adapter=adapters["a"],
                    statistics=True)
    made = _labels(tmp_path / "out" / "s0.nii.gz")
    args = ["segment", *TINY, "--adapter", adapters["a"], scan, "-o", tmp_path / "out", "--statistics"]
    code, stdout, err = run(capsys, *args, "--continue")
    assert code == 0 and "segmented 0 of 1 inputs" in stdout and "1 skipped" in stdout, err
    code, stdout, err = run(capsys, *args)
    assert code == 0 and "segmented 1 of 1 inputs" in stdout, err
    np.testing.assert_array_equal(_labels(tmp_path / "out" / "s0.nii.gz"), made)


# --------------------------------------------------------------------------- names: one rule for local and --server


class _StandIn:
    """A `samed-adapter serve` stand-in on 127.0.0.1 (a thread; stops with the block): the server's
    own rules for what a request may name (serve.uploads: upload_suffix, label_name,
    segment_options), the outputs of segment_file for that name, zipped as the server zips them."""

    def __init__(self, adapter: Path, root: Path) -> None:
        import http.server

        self.adapter, self.root, self.sam = sa.Adapter.load(adapter), root, sa.build_sam("tiny", seed=0)
        self.requests, self.lock = 0, threading.Lock()  # one SAM, patched per request: one at a time
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                entry = {"name": "a", "config": stand_in.adapter.config.to_dict(),
                         "fingerprint": stand_in.adapter.fingerprint,
                         "base_fingerprint": stand_in.adapter.base_fingerprint}
                self._send(200, "application/json", json.dumps({"adapters": [entry]}).encode())

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    self._send(200, "application/zip", stand_in.segment(self.headers["Content-Type"], body))
                except Exception as err:  # noqa: BLE001 - the server's JSON error, as it answers
                    answer = json.dumps({"error": str(err)}).encode()
                    self._send(getattr(err, "status", 500), "application/json", answer)

            def _send(self, status: int, kind: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def segment(self, content_type: str, body: bytes) -> bytes:
        with self.lock:
            return self._segment(content_type, body)

    def _segment(self, content_type: str, body: bytes) -> bytes:
        from email.parser import BytesParser

        from samed_adapter.serve.uploads import label_name, segment_options, upload_stem, upload_suffix, zip_outputs

        message = BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        form, upload = {}, None
        for part in message.get_payload():
            field = part.get_param("name", header="content-disposition")
            if field == "file":
                upload = (part.get_filename(), part.get_payload(decode=True))
            else:
                form[field] = part.get_payload(decode=True).decode()
        self.requests += 1
        folder = self.root / f"request{self.requests}"
        (folder / "out").mkdir(parents=True)
        saved = folder / f"upload{upload_suffix(upload[0])}"
        saved.write_bytes(upload[1])
        options = segment_options(form, dicom=False)
        label = folder / "out" / label_name(form.get("name"), upload_stem(upload[0]))
        sa.segment_file(saved, label, sam=self.sam, adapter=self.adapter, **options)
        files = sorted((p for p in (folder / "out").rglob("*") if p.is_file()),
                       key=lambda p: p.name.endswith(".samed-adapter.json"))  # the record last
        zip_outputs(files, folder / "out", folder / "outputs.zip", [])
        return (folder / "outputs.zip").read_bytes()

    def __enter__(self) -> "_StandIn":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_and_local_runs_take_the_same_names_and_say_what_a_search_leaves_out(adapters, capsys, tmp_path):
    """A hidden NIfTI and one with a backslash in its name, named as inputs, are segmented locally
    and with --server alike (the server refused them: its rule for a plain file name), and a
    hidden NIfTI found in a folder is left out with a note saying so, by both."""
    named = [_scan(tmp_path / "in" / ".hidden.nii.gz", seed=1), _scan(tmp_path / "in" / "a\\b.nii.gz", seed=2)]
    _scan(tmp_path / "in" / "folder" / "seen.nii.gz", seed=3)
    _scan(tmp_path / "in" / "folder" / ".quiet.nii.gz", seed=4)
    inputs = [*named, tmp_path / "in" / "folder"]
    code, local_out, local_err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], *inputs,
                                     "-o", tmp_path / "local")
    with _StandIn(adapters["a"], tmp_path / "server") as server:
        code_remote, remote_out, remote_err = run(capsys, "segment", "--server", server.url, "--adapter", "a",
                                                  *inputs, "-o", tmp_path / "remote")
    for code, out, err in ((code, local_out, local_err), (code_remote, remote_out, remote_err)):
        assert code == 0 and "segmented 3 of 3 inputs" in out and "1 file(s) not segmented" in out, err
        assert f"note: not segmented: {tmp_path / 'in' / 'folder' / '.quiet.nii.gz'}: hidden" in err
        assert "name the file itself as an input" in err
    written = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert sorted(str(p) for p in written) == sorted([".a\\b.samed-adapter.json", "..hidden.samed-adapter.json",
                                                      ".hidden.nii.gz", "a\\b.nii.gz", "seen.nii.gz",
                                                      ".seen.samed-adapter.json"])
    assert sorted(p.relative_to(tmp_path / "remote") for p in (tmp_path / "remote").rglob("*") if p.is_file()) \
        == written
    for rel in written:
        if rel.name.endswith(".nii.gz"):
            np.testing.assert_array_equal(_labels(tmp_path / "remote" / rel), _labels(tmp_path / "local" / rel))
        else:
            assert outputs.same_record(tmp_path / "remote" / rel.parent / rel.name.split(".samed")[0][1:],
                                       json.loads((tmp_path / "local" / rel).read_text()))
