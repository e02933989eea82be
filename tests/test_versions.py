"""Adapter versions (samed_adapter.learning.versions): NAME@N files and versions.json written so that
a full disk, a kill or a second writer never loses or half-writes what serves; the lineage a
version's file records; refusals in one line."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest
import torch

import samed_adapter as sa
from samed_adapter.adapter_file.adapter import Adapter, AdapterFormatError
from samed_adapter.learning import (UnknownVersionError, VersionError, VersionFileError, VersionFormatError,
                                    VersionStore, parse_ref)
from samed_adapter.learning import versions as versions_module
from samed_adapter.testing import random_adapter

K3 = sa.AdapterConfig(num_classes=3, image_size=64, class_names=["a", "b", "c"])
ITEMS = [{"image": "ct1", "label_checksum": "sha256:aa"}, {"image": "ct2", "label_checksum": "sha256:bb"}]


@pytest.fixture(scope="module")
def adapters() -> list[Adapter]:
    sam = sa.build_sam("tiny", seed=0)
    return [random_adapter(sam, K3, seed=60 + i) for i in range(3)]


@pytest.fixture
def store(tmp_path, adapters):
    """A store whose adapter "liver" has version 1 (adopted from liver.safetensors)."""
    adapters[0].save(tmp_path / "liver.safetensors")
    s = VersionStore(tmp_path / "versions")
    s.adopt("liver", tmp_path / "liver.safetensors")
    return s


def _files(store: VersionStore) -> dict[str, bytes]:
    """Every file under the store's root (hidden ones included), with its bytes."""
    return {os.fspath(p.relative_to(store.root)): p.read_bytes() for p in sorted(store.root.rglob("*")) if p.is_file()}


def _add(store: VersionStore, adapter: Adapter, serve: bool = True, parent: int = 1):
    return store.add("liver", adapter, parent=parent, figures={"holdout_dice": {"current": 61.2, "new": 67.0}},
                     items=ITEMS, holdout=["ct9"], serve=serve, datastore="/data/store")


# ---------------------------------------------------------------- the API


def test_adopt_makes_version_one_once_as_a_copy_of_the_catalogs_file(tmp_path, adapters):
    adapters[0].save(tmp_path / "liver.safetensors")
    store = VersionStore(tmp_path / "versions")
    assert store.versions("liver") == [] and store.serving("liver") is None
    first = store.adopt("liver", tmp_path / "liver.safetensors")
    assert (first.version, first.parent, first.serving, first.ref) == (1, None, True, "liver@1")
    assert first.path == tmp_path / "versions" / "liver" / "liver@1.safetensors"
    assert first.path.read_bytes() == (tmp_path / "liver.safetensors").read_bytes()
    assert first.fingerprint == adapters[0].fingerprint
    adapters[1].save(tmp_path / "liver.safetensors")  # adopting again changes nothing
    again = store.adopt("liver", tmp_path / "liver.safetensors")
    assert again == first and len(store.versions("liver")) == 1
    assert Adapter.load(first.path).fingerprint == adapters[0].fingerprint


def test_versions_round_trip_with_figures_items_and_lineage(store, adapters):
    second = _add(store, adapters[1])
    third = _add(store, adapters[2], serve=False, parent=2)
    assert [(v.version, v.parent, v.serving) for v in store.versions("liver")] == [(1, None, False), (2, 1, True),
                                                                                (3, 2, False)]
    assert store.serving("liver") == store.get("liver", 2) == second
    assert third.figures == {"holdout_dice": {"current": 61.2, "new": 67.0}}
    assert (third.items, third.holdout, third.fingerprint) == (ITEMS, ["ct9"], adapters[2].fingerprint)
    # a fresh store (another process) reads the same from disk
    other = VersionStore(store.root)
    assert other.versions("liver") == store.versions("liver")
    loaded = other.load("liver", 3)
    assert loaded.fingerprint == adapters[2].fingerprint
    assert loaded.lineage == {"adapter": "liver", "version": 3, "parent": 2, "items": ITEMS, "holdout": ["ct9"],
                              "datastore": "/data/store"}
    assert store.find("liver", adapters[1].fingerprint) == second.path
    assert store.find("liver", adapters[2].fingerprint) == third.path
    assert store.find("liver", "sha256:" + "0" * 64) is None and store.find("kidney", adapters[0].fingerprint) is None
    assert third.to_dict() == {"name": "liver", "version": 3, "ref": "liver@3", "fingerprint": adapters[2].fingerprint,
                               "parent": 2, "created": third.created, "figures": third.figures, "items": 2,
                               "holdout": 1, "serving": False}


def test_set_serving_rolls_back_and_forward(store, adapters):
    _add(store, adapters[1])
    assert store.set_serving("liver", 1).serving
    assert store.serving("liver").version == 1
    assert VersionStore(store.root).serving("liver").version == 1  # on disk, not only in this object
    assert store.set_serving("liver", 2).version == 2 and store.serving("liver").fingerprint == adapters[1].fingerprint


def test_a_rollback_while_a_job_trained_wins_over_the_jobs_version(store, adapters):
    """A job compares its version with the one serving when it started (its parent); if an admin
    rolled back meanwhile, the new version is kept with its figures but does not serve."""
    _add(store, adapters[1])  # version 2 serves; a job starts from it
    store.set_serving("liver", 1)  # the admin rolls back while it trains
    third = _add(store, adapters[2], parent=2)  # it passed its comparison with version 2
    assert not third.serving and store.serving("liver").version == 1
    assert store.set_serving("liver", 3).serving  # an admin can still promote it
    fourth = _add(store, adapters[1], parent=3)
    assert fourth.serving and store.serving("liver").version == 4


def test_parse_ref():
    assert parse_ref("liver") == ("liver", None)
    assert parse_ref("liver@12") == ("liver", 12)
    for bad in ("liver@", "liver@0", "liver@x", "liver@1@2"):
        with pytest.raises(VersionError, match="NAME@N"):
            parse_ref(bad)


# ---------------------------------------------------------------- bad input


def test_an_unknown_version_is_refused_in_one_line_listing_the_versions(store, adapters):
    _add(store, adapters[1], serve=False)
    for call in (lambda: store.get("liver", 7), lambda: store.set_serving("liver", 7),
                 lambda: _add(store, adapters[2], parent=7)):
        with pytest.raises(UnknownVersionError) as err:
            call()
        assert "\n" not in str(err.value) and "no version 7 (versions: 1, 2)" in str(err.value)
    with pytest.raises(UnknownVersionError, match="versions: none yet"):
        store.get("kidney", 1)
    assert store.serving("liver").version == 1 and len(store.versions("liver")) == 2


def test_a_version_file_changed_after_it_was_recorded_is_not_served(store, adapters):
    _add(store, adapters[1], serve=False)
    before = store.get("liver", 2)
    adapters[2].save(before.path)  # someone replaced the file
    with pytest.raises(VersionFileError, match="changed after it was recorded") as err:
        store.set_serving("liver", 2)
    assert "\n" not in str(err.value)
    with pytest.raises(VersionFileError):
        store.load("liver", 2)
    assert store.serving("liver").version == 1
    before.path.unlink()
    with pytest.raises(VersionFileError, match="cannot be read"):
        store.set_serving("liver", 2)
    assert store.find("liver", adapters[1].fingerprint) is None  # its file is gone: nothing to load


def test_bad_names_and_non_json_figures_are_refused_before_anything_is_written(store, adapters):
    files = _files(store)
    with pytest.raises(VersionError, match="adapter name"):
        store.versions("../etc")
    with pytest.raises(VersionError, match="must be JSON"):
        store.add("liver", adapters[1], parent=1, figures={"dice": float("nan")}, items=[], holdout=[], serve=True)
    with pytest.raises(VersionError, match="must be JSON"):
        store.add("liver", adapters[1], parent=1, figures={"t": object()}, items=[], holdout=[], serve=True)
    assert _files(store) == files


def test_a_damaged_versions_json_is_a_format_error(store):
    path = store.root / "liver" / "versions.json"
    path.write_text('{"format": "samed-adapter-versions", "versions": [{"version": "one"}]}')
    with pytest.raises(VersionFormatError, match="restore it from a backup"):
        store.versions("liver")
    path.write_text("{not json")
    with pytest.raises(VersionFormatError, match="cannot be read"):
        VersionStore(store.root).serving("liver")


# ---------------------------------------------------------------- faults


def _enospc_after(monkeypatch, calls: int) -> None:
    """``os.fsync`` fails with ENOSPC from its ``calls``-th call on (a full disk shows at fsync)."""
    real, count = os.fsync, [0]

    def fsync(fd: int) -> None:
        count[0] += 1
        if count[0] >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(versions_module.os, "fsync", fsync)


@pytest.mark.parametrize("calls", [1, 2, 3], ids=["version-file", "version-entry", "json"])
def test_a_full_disk_while_saving_a_version_changes_nothing_that_serves_or_is_stored(store, adapters, monkeypatch,
                                                                                     calls):
    _add(store, adapters[1])
    files, serving = _files(store), store.serving("liver")
    _enospc_after(monkeypatch, calls)
    with pytest.raises(OSError) as err:
        _add(store, adapters[2])
    assert err.value.errno == errno.ENOSPC
    assert _files(store) == files  # every file as it was, no temporary and no version file left
    with pytest.raises(OSError):  # a rollback on the full disk is refused as well
        store.set_serving("liver", 1)
    monkeypatch.undo()
    assert _files(store) == files
    assert VersionStore(store.root).serving("liver") == serving == store.serving("liver")


def test_a_safetensors_write_failing_half_way_leaves_no_file(store, adapters, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def half(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    files = _files(store)
    monkeypatch.setattr(safetensors.torch, "save_file", half)
    with pytest.raises(OSError, match="No space"):
        _add(store, adapters[1])
    assert _files(store) == files and store.serving("liver").version == 1


_KILLED_WRITER = """
import os, signal, sys
from samed_adapter.adapter_file.adapter import Adapter
from samed_adapter.learning.versions import VersionStore

def killed(self, name, data):  # SIGKILL: no cleanup of any kind runs
    os.kill(os.getpid(), signal.SIGKILL)

VersionStore._write_json = killed
VersionStore(sys.argv[1]).add("liver", Adapter.load(sys.argv[2]), parent=1, figures={}, items=[], holdout=[],
                              serve=True)
"""


def test_a_kill_between_the_file_and_the_json_leaves_an_orphan_never_served_and_cleaned(store, adapters, tmp_path):
    import subprocess
    import sys

    adapters[1].save(tmp_path / "new.safetensors")
    run = subprocess.run([sys.executable, "-c", _KILLED_WRITER, os.fspath(store.root),
                          os.fspath(tmp_path / "new.safetensors")], capture_output=True, timeout=120)
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    orphan = store.root / "liver" / "liver@2.safetensors"
    assert orphan.is_file()  # what the kill left: the file, flushed, that no JSON names
    (store.root / "liver" / ".liver@3.0123456789ab.tmp.safetensors").write_bytes(b"half")  # and a temporary
    assert [v.version for v in store.versions("liver")] == [1] and store.serving("liver").version == 1
    assert store.find("liver", adapters[1].fingerprint) is None
    with pytest.raises(UnknownVersionError):
        store.get("liver", 2)
    second = _add(store, adapters[2])  # the next writer removes both and numbers its version 2
    assert (second.version, second.fingerprint) == (2, adapters[2].fingerprint)
    assert Adapter.load(second.path).fingerprint == adapters[2].fingerprint
    assert sorted(p.name for p in (store.root / "liver").iterdir()) == ["liver@1.safetensors", "liver@2.safetensors",
                                                                      "versions.json"]


def test_two_writers_never_number_two_versions_alike(store, adapters):
    stores = [VersionStore(store.root) for _ in range(4)]  # as separate processes would: one object each
    errors: list[BaseException] = []

    def write(s: VersionStore, adapter: Adapter) -> None:
        try:
            _add(s, adapter)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(s, adapters[1 + i % 2])) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    recorded = VersionStore(store.root).versions("liver")
    assert [v.version for v in recorded] == [1, 2, 3, 4, 5]
    for v in recorded:
        assert Adapter.load(v.path).fingerprint == v.fingerprint
    assert json.loads((store.root / "liver" / "versions.json").read_text())["serving"] in (2, 3, 4, 5)


# ---------------------------------------------------------------- the file's lineage


def test_lineage_travels_in_the_file_but_not_in_the_fingerprint(tmp_path, adapters):
    plain = adapters[0]
    lineage = {"parent": 1, "items": ITEMS, "holdout": ["ct9"], "datastore": "/data/store"}
    marked = Adapter(plain.config, plain.tensors, plain.base_fingerprint, lineage=lineage)
    assert marked.fingerprint == plain.fingerprint
    marked.save(tmp_path / "marked.safetensors")
    plain.save(tmp_path / "plain.safetensors")
    assert Adapter.load(tmp_path / "marked.safetensors").lineage == lineage
    assert Adapter.load(tmp_path / "plain.safetensors").lineage is None  # files without it load as before
    assert Adapter.load(tmp_path / "marked.safetensors").fingerprint == plain.fingerprint
    assert marked.to(torch.float16).lineage == lineage
    from samed_adapter.adapter_file.adapter import describe

    assert describe(Adapter(plain.config, plain.tensors, plain.base_fingerprint, lineage={
        **lineage, "adapter": "liver", "version": 2})).splitlines()[-1] == \
        "lineage           liver@2 from version 1: 2 datastore items, 1 held out (/data/store)"
    assert "lineage" not in describe(plain)
    with pytest.raises(AdapterFormatError, match="JSON"):
        Adapter(plain.config, plain.tensors, plain.base_fingerprint, lineage={"x": {1, 2}})


# ---------------------------------------------------------------- the catalog and the replicas


@pytest.fixture
def served(tmp_path, adapters):
    """A catalog of one adapter folder ("liver", "kidney") with versions of "liver": 1 (adopted), 2 serving."""
    from samed_adapter.serve.catalog import AdapterCatalog

    (tmp_path / "adapters").mkdir()
    adapters[0].save(tmp_path / "adapters" / "liver.safetensors")
    adapters[2].save(tmp_path / "adapters" / "kidney.safetensors")
    store = VersionStore(tmp_path / "versions")
    store.adopt("liver", tmp_path / "adapters" / "liver.safetensors")
    _add(store, adapters[1])
    return AdapterCatalog([tmp_path / "adapters"], versions=store)


def test_the_catalog_serves_the_serving_version_and_names_each_one(served, adapters, tmp_path):
    from samed_adapter.serve.catalog import AdapterCatalog, UnknownAdapterError

    store = served.versions
    assert served.names() == ["kidney", "liver"]  # versions are listed per adapter, not as names
    assert served.path("liver") == store.get("liver", 2).path
    assert served.path("liver@1") == store.get("liver", 1).path
    assert served.path("kidney") == tmp_path / "adapters" / "kidney.safetensors"
    assert (served.pin("liver")["version"], served.pin("liver")["fingerprint"]) == (2, adapters[1].fingerprint)
    assert (served.describe("liver@1")["version"], served.describe("liver@1")["fingerprint"]) == \
        (1, adapters[0].fingerprint)
    assert served.describe("kidney")["version"] is None
    store.set_serving("liver", 1)  # a rollback shows on the next lookup, the describe cache included
    assert (served.describe("liver")["version"], served.describe("liver")["fingerprint"]) == \
        (1, adapters[0].fingerprint)
    for ref, said in (("liver@7", "no version 7 (versions: 1, 2)"), ("kidney@1", "versions: none yet"),
                      ("liver@x", "NAME@N")):
        with pytest.raises(UnknownAdapterError, match=said.replace("(", r"\(").replace(")", r"\)")):
            served.path(ref)
    unversioned = AdapterCatalog([tmp_path / "adapters"])
    with pytest.raises(UnknownAdapterError, match="--versions FOLDER"):
        unversioned.path("liver@1")
    assert unversioned.path("liver") == tmp_path / "adapters" / "liver.safetensors"
    assert served.find("liver@1", adapters[1].fingerprint) == store.get("liver", 2).path
    assert unversioned.find("liver", adapters[0].fingerprint) is None


def test_a_version_file_changed_after_it_was_recorded_is_not_pinned(served, adapters):
    path = served.versions.get("liver", 2).path
    adapters[2].save(path)
    with pytest.raises(VersionFileError, match="changed after it was recorded") as err:
        served.pin("liver")
    assert "\n" not in str(err.value)


def _model(catalog):
    from samed_adapter.segment.pipeline import SamSource
    from samed_adapter.serve.residents import ServingModel

    return ServingModel(SamSource(backbone="tiny", seed=0), catalog, max_resident=4)


def test_a_request_pinned_before_a_swap_is_answered_by_its_version_after_it(served, adapters, tmp_path):
    import numpy as np

    from samed_adapter.serve.catalog import AdapterCatalog
    from samed_adapter.serve.residents import AdapterChangedError, SliceRequest, SliceResult

    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    alone = {}
    for number in (1, 2):  # each version alone on a replica of its own
        own = AdapterCatalog([], {"liver": served.versions.get("liver", number).path})
        alone[number] = _model(own).predict([SliceRequest("liver", image)])[0].labels
    assert not np.array_equal(alone[1], alone[2])

    model = _model(served)
    pinned = served.pin("liver")  # the front pins a request to version 2 ...
    served.versions.set_serving("liver", 1)  # ... a rollback happens before its slices reach the replica
    [late] = model.predict([SliceRequest("liver", image, fingerprint=pinned["fingerprint"])])
    assert isinstance(late, SliceResult), late
    np.testing.assert_array_equal(late.labels, alone[2])
    [fresh] = model.predict([SliceRequest("liver", image)])  # an unpinned slice takes the serving version
    np.testing.assert_array_equal(fresh.labels, alone[1])
    [named] = model.predict([SliceRequest("liver@2", image)])  # NAME@N: that version, the same resident
    np.testing.assert_array_equal(named.labels, alone[2])
    assert sorted(model.resident) == sorted([("liver", adapters[0].fingerprint), ("liver", adapters[1].fingerprint)])
    [gone] = model.predict([SliceRequest("liver", image, fingerprint=adapters[2].fingerprint)])
    assert isinstance(gone, AdapterChangedError) and gone.status == 409  # no file holds it: 409 as before


def test_a_damaged_versions_json_fails_only_that_adapters_slices(served):
    import numpy as np

    from samed_adapter.serve.errors import UnprocessableError
    from samed_adapter.serve.residents import SliceRequest, SliceResult

    (served.versions.root / "liver" / "versions.json").write_text("{not json")
    image = np.zeros((64, 64), np.float32)
    liver, kidney = _model(served).predict([SliceRequest("liver", image), SliceRequest("kidney", image)])
    assert isinstance(liver, UnprocessableError) and "restore it from a backup" in str(liver)
    assert isinstance(kidney, SliceResult)
