"""Clicks through `samed-adapter serve` (issue 31): a real server (local Ray, Ray Serve, two model
replicas on a tiny random SAM) called with MONAI Label's own client, sending what 3D Slicer's
MONAI Label module sends; the answers are compared, voxel for voxel, with a local ClickSession."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'samed-adapter[serve]'")

import samed_adapter as sa  # noqa: E402
from samed_adapter.interactive.prompts import ClicksNotTrainedError, SliceClick, require_clicks  # noqa: E402
from samed_adapter.segment.pipeline import SamSource  # noqa: E402
from samed_adapter.serve import ServeSettings, start  # noqa: E402
from samed_adapter.serve.errors import BadRequestError  # noqa: E402
from samed_adapter.serve.sessions import Click, KeptSessions, memory_bytes, parse_clicks  # noqa: E402
from samed_adapter.testing import random_adapter  # noqa: E402
from samed_adapter.testing.tiny import CONFIGS, stock_sam  # noqa: E402

TOKEN = "click-token"
NAMES = ["liver", "kidney", "spleen"]
CLICK_CONFIG = dataclasses.replace(CONFIGS["clicks"], class_names=NAMES)
PLAIN_CONFIG = dataclasses.replace(CONFIGS["k3"], class_names=["lung", "heart", "bone"])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A click-trained adapter, a plain one and one to replace, on stock_sam(); a crop of nilearn's
    MNI152 template with a non-diagonal affine (voxel indices are not world axes)."""
    from nilearn.datasets import load_mni152_template

    root = tmp_path_factory.mktemp("clicks")
    (root / "adapters").mkdir()
    random_adapter(stock_sam(), CLICK_CONFIG, seed=1, scale=0.5).save(root / "adapters" / "clicky.safetensors")
    random_adapter(stock_sam(), CLICK_CONFIG, seed=1, scale=0.5).save(root / "adapters" / "replaced.safetensors")
    random_adapter(stock_sam(), CLICK_CONFIG, seed=2).save(root / "other.safetensors")
    random_adapter(stock_sam(), PLAIN_CONFIG, seed=3).save(root / "adapters" / "plain.safetensors")
    mni = load_mni152_template(resolution=2)
    data = np.asarray(mni.dataobj, dtype=np.float32)[25:65, 30:78, 40:44]
    affine = mni.affine @ np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(data / data.max(), affine), root / "mni.nii.gz")
    return {"adapters": root / "adapters", "mni": root / "mni.nii.gz", "other": root / "other.safetensors"}


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapters=[str(files["adapters"])], port=port,
                             token=TOKEN, replicas=2, max_sessions=6, batch_wait_ms=5,
                             tmp_dir=str(tmp_path_factory.mktemp("clicks-tmp")))
    with start(settings) as running:
        yield running


class _SlicerClient:
    """MONAI Label's client as 3D Slicer's module uses it: a new one, logged in, for every call
    (one kept across calls, with a token, sends create_session() with the Content-Type that its
    last infer() left in its headers, whose multipart boundary is not the body's)."""

    def __init__(self, url: str, tmpdir: str) -> None:
        self.url, self.tmpdir = url, tmpdir

    def __getattr__(self, name: str):
        from monailabel.client import MONAILabelClient

        client = MONAILabelClient(self.url, tmpdir=self.tmpdir)
        client.update_auth({"token_type": "Bearer", "access_token": TOKEN})
        return getattr(client, name)


@pytest.fixture()
def client(server, tmp_path):
    return _SlicerClient(server.url, str(tmp_path))


@pytest.fixture(scope="module")
def local(files):
    """The session a local user gets for the same adapter and file."""
    model = sa.patch(stock_sam(), files["adapters"] / "clicky.safetensors")
    with pytest.warns(UserWarning):  # the adapter records no orientation
        return model.interactive(str(files["mni"]))


def _status(err: Exception) -> int:
    """The HTTP status of MONAI Label's client's exception (its infer() puts it only in the message)."""
    return int(re.match(r"Status: (\d+);", err.msg).group(1))  # type: ignore[attr-defined, union-attr]


def _labels(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _refined(session, clicks: list[SliceClick]) -> np.ndarray:
    """The session's labels after ``clicks`` (one refine), the session put back as it was."""
    session.refine(clicks)
    labels = session.labels
    session.undo()
    return labels


def _points(local, label: int, count: int, *, inside: bool, k: int = 2) -> list[list[int]]:
    """``count`` voxels on slice k where the automatic labels are (inside) or are not ``label``."""
    auto = local.labels[:, :, k]
    i, j = np.nonzero(auto == label if inside else auto != label)
    pick = np.linspace(0, len(i) - 1, count).round().astype(int)
    return [[int(i[p]), int(j[p]), k] for p in pick]


def test_info_lists_a_click_adapter_as_deepedit_with_its_labels(client):
    info = client.info()
    clicky, plain = info["models"]["clicky"], info["models"]["plain"]
    # The type 3D Slicer's module offers its point tools for; with labels, its multi-label mode.
    assert clicky["type"] == "deepedit" and clicky["dimension"] == 3
    assert clicky["labels"] == {"liver": 1, "kidney": 2, "spleen": 3, "background": 0}
    assert plain["type"] == "segmentation" and plain["labels"] == {"lung": 1, "heart": 2, "bone": 3}
    assert {"liver", "kidney", "spleen", "background", "lung"} <= set(info["labels"])


def test_deepgrow_clicks_on_an_upload_equal_a_local_session(client, files, local):
    auto_remote, params = client.infer("clicky", "mni", {}, file=str(files["mni"]))
    np.testing.assert_array_equal(_labels(auto_remote), local.labels)  # no clicks: the automatic labels
    assert params["label_names"] == {"liver": 1, "kidney": 2, "spleen": 3}
    fg, bg = _points(local, 2, 2, inside=False), _points(local, 2, 1, inside=True)
    sent = {"label": "kidney", "foreground": fg, "background": bg}
    path, params = client.infer("clicky", "mni", sent, file=str(files["mni"]))
    labels = _labels(path)
    expected = _refined(local, [SliceClick(2, *local.locate(p), True) for p in fg]
                        + [SliceClick(2, *local.locate(p), False) for p in bg])
    np.testing.assert_array_equal(labels, expected)
    assert all(labels[tuple(p)] == 2 for p in fg) and all(labels[tuple(p)] != 2 for p in bg)
    changed = np.argwhere(labels != local.labels)
    assert len(changed) and set(changed[:, 2]) == {2}  # only the clicked slice changed
    assert params["clicks"]["count"] == 3 and params["params"] == sent
    assert nib.load(path).affine.tolist() == nib.load(files["mni"]).affine.tolist()


def test_deepedit_landmarks_as_slicer_sends_them(client, files, local):
    # Slicer's multi-label mode sends every label name of the app (other models' too) with that
    # segment's points, the selected segment as "label"; background's points are negatives.
    fg1, fg3 = _points(local, 1, 1, inside=False), _points(local, 3, 2, inside=False)
    bg = _points(local, 2, 1, inside=True)
    sent = {"liver": fg1, "kidney": [], "spleen": fg3, "background": bg, "lung": [], "heart": [], "bone": [],
            "label": "spleen"}
    path, _ = client.infer("clicky", "mni", sent, file=str(files["mni"]))
    expected = _refined(local, [SliceClick(1, *local.locate(fg1[0]), True)]
                        + [SliceClick(3, *local.locate(p), True) for p in fg3]
                        + [SliceClick(2, *local.locate(bg[0]), False)])  # removes what the automatic labels had there
    np.testing.assert_array_equal(_labels(path), expected)


def _both_replicas_running(timeout_s: float = 120.0) -> None:
    from ray import serve

    from samed_adapter.serve.server import APP_NAME

    deadline = time.monotonic() + timeout_s
    while serve.status().applications[APP_NAME].deployments["Segmenter"].replica_states.get("RUNNING", 0) < 2:
        assert time.monotonic() < deadline, "the second model replica did not start"
        time.sleep(0.5)


def test_a_session_keeps_the_embeddings_in_its_replica_and_answers_as_the_upload(client, files, local):
    _both_replicas_running()
    sent = {"label": "liver", "foreground": _points(local, 1, 2, inside=False), "background": []}
    by_upload, _ = client.infer("clicky", "mni", sent, file=str(files["mni"]))
    # Sessions until both replicas hold some: Ray Serve routes a new multiplexed id to the replica
    # holding fewest, once the replicas' reports reached the router (a moment: hence the pause).
    built: dict[str, dict] = {}
    while len({b["replica"] for b in built.values()}) < 2:
        assert len(built) < 6, f"every session went to one replica: {built}"
        created = client.create_session(str(files["mni"]))
        sid = created["session_id"]
        assert created["session_info"]["name"] == sid and created["session_info"]["path"] == ""
        assert client.get_session(sid)["name"] == sid
        path, params = client.infer("clicky", "", sent, session_id=sid)
        np.testing.assert_array_equal(_labels(path), _labels(by_upload))
        assert params["clicks"]["encoded"]  # built now: the encoder ran once
        built[sid] = params["clicks"]
        time.sleep(1.0)
    for _ in range(3):  # each session's next clicks reach the replica that holds it: no encoder
        for sid, first in built.items():
            path, params = client.infer("clicky", "", sent, session_id=sid)
            np.testing.assert_array_equal(_labels(path), _labels(by_upload))
            assert not params["clicks"]["resent"] and not params["clicks"]["encoded"]
            assert params["clicks"]["replica"] == first["replica"]
    session_id = next(iter(built))
    # A plain adapter segments the session's image as it segments the upload.
    plain_session, _ = client.infer("plain", "", {}, session_id=session_id)
    plain_upload, _ = client.infer("plain", "mni", {}, file=str(files["mni"]))
    np.testing.assert_array_equal(_labels(plain_session), _labels(plain_upload))
    assert client.remove_session(session_id)["name"] == session_id
    with pytest.raises(Exception) as gone:
        client.infer("clicky", "", sent, session_id=session_id)
    assert _status(gone.value) == 410 and "upload the image again" in gone.value.msg


def test_unknown_session_and_bad_clicks_are_one_line_4xx(client, files):
    import requests

    with pytest.raises(Exception) as unknown:
        client.infer("clicky", "", {}, session_id="no-such-session")
    assert _status(unknown.value) == 404 and "upload the image again" in unknown.value.msg
    with pytest.raises(Exception) as missing:
        client.get_session("no-such-session")
    assert _status(missing.value) == 404
    outside = {"label": "liver", "foreground": [[400, 1, 1]]}
    with pytest.raises(Exception) as far:
        client.infer("clicky", "mni", outside, file=str(files["mni"]))
    assert _status(far.value) == 400 and "[400, 1, 1]" in far.value.msg
    unknown_class = {"label": "pancreas", "foreground": [[1, 1, 1]]}
    with pytest.raises(Exception) as named:
        client.infer("clicky", "mni", unknown_class, file=str(files["mni"]))
    assert _status(named.value) == 400 and "pancreas" in named.value.msg and "liver" in named.value.msg
    answer = requests.put(f"{client.get_server_url()}/session/", timeout=30)  # no token
    assert answer.status_code == 401 and answer.json()["status"] == 401


def test_clicks_on_a_plain_adapter_say_it_was_trained_without_them(client, files):
    with pytest.raises(Exception) as plain:
        client.infer("plain", "mni", {"label": "lung", "foreground": [[1, 1, 1]]}, file=str(files["mni"]))
    with pytest.raises(ClicksNotTrainedError) as expected:
        require_clicks(PLAIN_CONFIG, "adapter 'plain'")
    body = json.loads(plain.value.msg.split("Response: ", 1)[1])
    assert _status(plain.value) == 422 and body["error"] == str(expected.value) and "\n" not in body["error"]


def test_the_oldest_session_goes_first(client, files):
    ids = [client.create_session(str(files["mni"]))["session_id"] for _ in range(7)]  # --max-sessions 6
    for kept in ids[1:]:
        assert client.get_session(kept)["name"] == kept
    with pytest.raises(Exception) as evicted:
        client.infer("clicky", "", {}, session_id=ids[0])
    assert _status(evicted.value) == 410 and "--max-sessions" in evicted.value.msg


def test_a_replaced_adapter_ends_its_sessions_with_409(client, files):
    session_id, fresh = (client.create_session(str(files["mni"]))["session_id"] for _ in range(2))
    client.infer("replaced", "", {}, session_id=session_id)
    target = files["adapters"] / "replaced.safetensors"
    shutil.copyfile(files["other"], target.with_suffix(".tmp"))
    target.with_suffix(".tmp").replace(target)
    with pytest.raises(Exception) as changed:
        client.infer("replaced", "", {}, session_id=session_id)
    assert _status(changed.value) == 409 and "start a new session" in changed.value.msg
    _, params = client.infer("replaced", "", {}, session_id=fresh)  # first used now: the new version
    assert params["adapter"]["fingerprint"] == sa.Adapter.load(target).fingerprint


# ------------------------------------------------------------------ the parts, without a server


class _Sized:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_kept_sessions_are_bounded_by_count_and_bytes():
    kept = KeptSessions(max_sessions=3, max_bytes=100)
    for i in range(3):
        assert kept.put((f"s{i}", "a", "f"), _Sized(30))  # type: ignore[arg-type]
    kept.get(("s0", "a", "f"))  # used: the least recently used is now s1
    assert kept.put(("s3", "a", "f"), _Sized(30))  # type: ignore[arg-type]
    assert kept.get(("s1", "a", "f")) is None and len(kept) == 3
    assert kept.put(("s4", "a", "f"), _Sized(60))  # type: ignore[arg-type]
    assert kept.nbytes <= 100 and kept.get(("s4", "a", "f")) is not None and kept.get(("s2", "a", "f")) is None
    assert not kept.put(("big", "a", "f"), _Sized(101)) and kept.get(("big", "a", "f")) is None  # type: ignore


def test_parse_clicks_reads_both_shapes_and_names_what_is_wrong():
    assert parse_clicks({"label": "kidney", "foreground": [[1, 2, 3]], "background": [[4, 5, 6.0]]}, NAMES) == [
        Click(2, (1, 2, 3), True), Click(2, (4, 5, 6), False)]
    assert parse_clicks({"label": "x", "spleen": [[1, 2, 3]], "background": [[0, 0, 0]]}, NAMES) == [
        Click(3, (1, 2, 3), True), Click(None, (0, 0, 0), False)]
    assert parse_clicks({"label": "anything", "foreground": [], "background": []}, NAMES) == []
    for bad in ({"label": "liver", "foreground": [[1, 2]]}, {"label": "liver", "foreground": "1,2,3"},
                {"label": "liver", "foreground": [[1, 2, 3.5]]}, {"label": "liver", "foreground": [[True, 1, 1]]}):
        with pytest.raises(BadRequestError):
            parse_clicks(bad, NAMES)
    assert memory_bytes("4G") == 4 * 2**30 and memory_bytes("512MiB") == 512 * 2**20 and memory_bytes("100") == 100
    with pytest.raises(ValueError):
        memory_bytes("lots")


@pytest.mark.parametrize("flag, value, says", [("--session-memory", "lots", "give bytes, or a number with K, M or G"),
                                               ("--max-sessions", "0", "--max-sessions must be an integer at least 1")])
def test_session_flags_are_checked_before_anything_starts(capsys, files, flag, value, says):
    from samed_adapter.testing.cli import run

    code, _, err = run(capsys, "serve", "--sam-backbone", "tiny", "--random-sam-seed", "0", "--adapters",
                       files["adapters"], flag, value)
    assert code == 2 and says in err and f"{flag} " in err
