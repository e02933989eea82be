"""What one server replica computes (samed_adapter.serve.residents), without Ray: mixed batches
equal per-adapter ones, the resident set stays bounded, a bad adapter fails only its slices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.segment.pipeline import SamSource
from samed_adapter.serve.catalog import AdapterCatalog
from samed_adapter.serve.errors import NotFoundError, ServeError, UnprocessableError
from samed_adapter.serve.residents import ServingModel, SliceRequest, SliceResult
from samed_adapter.testing import random_adapter

K3 = sa.AdapterConfig(num_classes=3, image_size=64, class_names=["a", "b", "c"])


@pytest.fixture
def folder(tmp_path):
    sam = sa.build_sam("tiny", seed=0)
    for i, config in enumerate([K3, K3, dataclasses.replace(K3, num_classes=1, class_names=["a"]),
                                dataclasses.replace(K3, rank=2)]):
        random_adapter(sam, config, seed=40 + i).save(tmp_path / f"a{i}.safetensors")
    return tmp_path


def _model(folder, **kwargs) -> ServingModel:
    return ServingModel(SamSource(backbone="tiny", seed=0), AdapterCatalog([folder]), **kwargs)


def _slices(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((64, 64), dtype=np.float32) for _ in range(n)]


def _alone(folder, name: str, image: np.ndarray) -> np.ndarray:
    model = sa.patch(sa.build_sam("tiny", seed=0), sa.Adapter.load(folder / f"{name}.safetensors")).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(image)[None, None].expand(-1, 3, -1, -1))["masks"][0]
    return logits.max(dim=0).indices.to(torch.uint8).numpy()


def test_a_mixed_batch_gives_each_slice_its_own_adapters_labels(folder):
    names = ["a0", "a2", "a1", "a3", "a0", "a2"]  # two K's and two ranks in one batch
    items = [SliceRequest(n, s, probabilities=(i == 1)) for i, (n, s) in enumerate(zip(names, _slices(6)))]
    mixed = _model(folder).predict(items)
    per_adapter = _model(folder, batching="per-adapter").predict(items)
    for item, a, b in zip(items, mixed, per_adapter):
        assert isinstance(a, SliceResult) and isinstance(b, SliceResult)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.labels, _alone(folder, item.adapter, item.image))
    assert mixed[0].batch["adapters"] == 4 and mixed[0].batch["forwards"] == 1
    assert per_adapter[0].batch["forwards"] == 4
    assert mixed[1].probs.shape == (2, 64, 64) and mixed[0].probs is None
    np.testing.assert_array_equal(mixed[1].probs.argmax(0), mixed[1].labels)


def test_the_resident_set_stays_bounded_and_reloads_a_changed_file(folder):
    model = _model(folder, max_resident=2)
    image = _slices(1)[0]
    for name in ["a0", "a1", "a2", "a0"]:
        assert isinstance(model.predict([SliceRequest(name, image)])[0], SliceResult)
        assert len(model.model.adapter_names) <= 2 and len(model.resident) <= 2
    assert model.loads == 4  # a0 was the least recently used when a2 came, so it was loaded again
    # A file replaced under the same name is loaded again, and its labels are the new adapter's.
    (folder / "a0.safetensors").write_bytes((folder / "a2.safetensors").read_bytes())
    result = model.predict([SliceRequest("a0", image)])[0]
    np.testing.assert_array_equal(result.labels, _alone(folder, "a2", image))
    assert model.loads == 5


def test_a_bad_adapter_fails_only_its_own_slices(folder):
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    model = _model(folder)
    slices = _slices(4, seed=2)
    items = [SliceRequest("a0", slices[0]), SliceRequest("broken", slices[1]), SliceRequest("missing", slices[2]),
             SliceRequest("a1", slices[3])]
    out = model.predict(items)
    assert isinstance(out[1], UnprocessableError) and out[1].status == 422 and "broken" in str(out[1])
    assert isinstance(out[2], NotFoundError) and out[2].status == 404 and "a0, a1" in str(out[2])
    np.testing.assert_array_equal(out[0].labels, _alone(folder, "a0", slices[0]))
    np.testing.assert_array_equal(out[3].labels, _alone(folder, "a1", slices[3]))
    assert all(isinstance(e, ServeError) for e in out[1:3])


def test_hub_ids_and_named_files_are_served_by_name(folder, offline_cache, tmp_path):
    """Clients name adapters; the catalog maps names to files, a Hub id through the usual cache."""
    from samed_adapter.serve.catalog import UnknownAdapterError, parse_pairs
    from samed_adapter.testing.hub import lay_out_cache

    lay_out_cache(offline_cache, "org/organs", {"adapter.safetensors": (folder / "a2.safetensors").read_bytes()})
    catalog = AdapterCatalog([], parse_pairs([f"liver={folder / 'a0.safetensors'}"], "--adapter"),
                             parse_pairs(["organs=org/organs"], "--hub-adapter"), local_files_only=True)
    assert catalog.names() == ["liver", "organs"]
    assert catalog.describe("organs")["fingerprint"] == sa.Adapter.load(folder / "a2.safetensors").fingerprint
    model = ServingModel(SamSource(backbone="tiny", seed=0), catalog)
    image = _slices(1)[0]
    np.testing.assert_array_equal(model.predict([SliceRequest("organs", image)])[0].labels,
                                  _alone(folder, "a2", image))
    with pytest.raises(UnknownAdapterError, match="served: liver, organs"):
        catalog.path("../a1")  # a name is never a path
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_pairs(["organs"], "--hub-adapter")
