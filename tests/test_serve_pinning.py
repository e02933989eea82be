"""One request, one adapter version (samed_adapter.serve.residents and .catalog, without Ray).

A request is pinned to the fingerprint that its adapter's file held when it started; a file
replaced while it is answered (also with the same size and mtime, as `cp -p` and `rsync -t`
leave it) never gives it slices of the new version: the former one answers while it is
resident, else the request fails with 409.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.segment.pipeline import SamSource
from samed_adapter.serve.catalog import AdapterCatalog, Stamp
from samed_adapter.serve.residents import AdapterChangedError, ServingModel, SliceRequest, SliceResult
from samed_adapter.testing import random_adapter

K3 = sa.AdapterConfig(num_classes=3, image_size=64, class_names=["a", "b", "c"])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """a0..a3: four adapters of one config (so their files have one size) on the tiny SAM of seed 0."""
    sam = sa.build_sam("tiny", seed=0)
    (tmp_path / "served").mkdir()
    for i in range(4):
        random_adapter(sam, K3, seed=60 + i).save(tmp_path / "served" / f"a{i}.safetensors")
    return tmp_path / "served"


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.random((64, 64), dtype=np.float32) for _ in range(n)]


def _labels(adapter: sa.Adapter, image: np.ndarray) -> np.ndarray:
    model = sa.patch(sa.build_sam("tiny", seed=0), adapter).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(image)[None, None].expand(-1, 3, -1, -1))["masks"][0]
    return logits.max(dim=0).indices.to(torch.uint8).numpy()


def _replace_keeping_size_and_mtime(path: Path, source: Path) -> None:
    """Overwrite ``path`` in place with ``source``'s bytes and put its mtime back, as `cp -p` does."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(source.read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def test_a_replacement_with_the_same_size_and_mtime_is_noticed(folder, monkeypatch):
    catalog = AdapterCatalog([folder])
    old = catalog.describe("a0")["fingerprint"]
    _replace_keeping_size_and_mtime(folder / "a0.safetensors", folder / "a1.safetensors")
    new = sa.Adapter.load(folder / "a1.safetensors").fingerprint
    assert new != old
    assert catalog.describe("a0")["fingerprint"] == new  # the listing's cache sees the ctime move
    assert catalog.pin("a0")["fingerprint"] == new  # a request reads the content
    # A request's pin does not rest on any stamp: with every stat alike, it still sees the bytes change.
    frozen = Stamp.of(folder / "a0.safetensors")
    monkeypatch.setattr(Stamp, "of", classmethod(lambda cls, path: frozen))
    _replace_keeping_size_and_mtime(folder / "a0.safetensors", folder / "a2.safetensors")
    assert catalog.pin("a0")["fingerprint"] == sa.Adapter.load(folder / "a2.safetensors").fingerprint


def test_a_request_is_answered_by_the_version_it_started_with(folder, tmp_path):
    catalog = AdapterCatalog([folder])
    model = ServingModel(SamSource(backbone="tiny", seed=0), catalog, max_resident=2)
    first, second = sa.Adapter.load(folder / "a0.safetensors"), sa.Adapter.load(folder / "a1.safetensors")
    images = _images(4)
    want_first = [_labels(first, image) for image in images]
    want_second = [_labels(second, image) for image in images]
    assert any((a != b).any() for a, b in zip(want_first, want_second))  # the versions tell apart

    pinned = catalog.pin("a0")["fingerprint"]
    assert pinned == first.fingerprint
    head = model.predict([SliceRequest("a0", images[0], fingerprint=pinned)])[0]
    np.testing.assert_array_equal(head.labels, want_first[0])
    # The file is replaced (same size, same mtime) while the request's other slices are on their way.
    _replace_keeping_size_and_mtime(folder / "a0.safetensors", folder / "a1.safetensors")
    later = catalog.pin("a0")["fingerprint"]  # a request that starts now
    assert later == second.fingerprint
    batch = model.predict([SliceRequest("a0", images[1], fingerprint=pinned),
                           SliceRequest("a0", images[2], fingerprint=later),
                           SliceRequest("a0", images[3], fingerprint=pinned)])
    assert all(isinstance(r, SliceResult) for r in batch), batch
    np.testing.assert_array_equal(batch[0].labels, want_first[1])  # the pinned request: still the first version
    np.testing.assert_array_equal(batch[2].labels, want_first[3])
    np.testing.assert_array_equal(batch[1].labels, want_second[2])  # the new request: the new version
    assert batch[0].batch["adapters"] == 2 and model.resident_versions() == [["a0", pinned], ["a0", later]]
    assert model.loads == 2


def test_a_pinned_version_gone_from_the_replica_fails_with_409_never_mixed(folder):
    catalog = AdapterCatalog([folder])
    model = ServingModel(SamSource(backbone="tiny", seed=0), catalog, max_resident=1)
    image = _images(1)[0]
    pinned = catalog.pin("a0")["fingerprint"]
    assert isinstance(model.predict([SliceRequest("a0", image, fingerprint=pinned)])[0], SliceResult)
    shutil.copyfile(folder / "a2.safetensors", folder / "a0.safetensors")
    assert isinstance(model.predict([SliceRequest("a1", image)])[0], SliceResult)  # evicts a0's version
    assert model.resident_versions() == [["a1", sa.Adapter.load(folder / "a1.safetensors").fingerprint]]
    changed = model.predict([SliceRequest("a0", image, fingerprint=pinned)])[0]
    assert isinstance(changed, AdapterChangedError) and changed.status == 409
    assert "'a0' was replaced" in str(changed) and "send the request again" in str(changed)
    assert pinned[:19] in str(changed)
    # Removed: a request pinned to a version no replica holds fails the same way.
    (folder / "a0.safetensors").unlink()
    gone = model.predict([SliceRequest("a0", image, fingerprint=catalog.describe("a1")["fingerprint"])])[0]
    assert isinstance(gone, AdapterChangedError) and "'a0' was removed" in str(gone)
