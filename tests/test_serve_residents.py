"""What one server replica computes (samed_adapter.serve.residents), without Ray: mixed batches
equal per-adapter ones, the resident set stays bounded, a bad adapter fails only its slices, and
the replica's queue packs the slices of whole requests (one call each) into batches that mix
them, every request answered with its own labels in its own order."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.segment.pipeline import SamSource
from samed_adapter.serve.catalog import AdapterCatalog
from samed_adapter.serve.errors import NotFoundError, ServeError, UnprocessableError
from samed_adapter.serve.residents import (ServingModel, SliceQueue, SliceRequest, SliceResult, VolumeRequest,
                                           VolumeResult)
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


def _drain(queue: SliceQueue, model: ServingModel) -> list[list[tuple[str, int]]]:
    """Run every batch the queue gives through ``model``; each batch as (adapter, slice index) pairs."""
    batches = []
    while batch := queue.take():
        batches.append([(ticket.request.adapter, i) for ticket, i in batch])
        start = time.perf_counter()
        results = model.predict(SliceQueue.items(batch))
        queue.deliver(batch, results, time.perf_counter() - start)
    return batches


def test_the_queue_mixes_requests_in_a_batch_and_answers_each_with_its_own_labels(folder):
    volumes = {"a0": np.stack(_slices(5, seed=3)), "a1": np.stack(_slices(2, seed=4)), "a3": np.stack(_slices(3, seed=5))}
    queue, futures = SliceQueue(4, "mixed"), {}
    for name, images in volumes.items():
        futures[name] = Future()
        queue.put(VolumeRequest(name, images, probabilities=(name == "a1")), futures[name])
    assert queue.waiting() == 10
    batches = _drain(queue, _model(folder))
    # The oldest slices first, whatever their adapter: a batch one request cannot fill takes the next ones'.
    assert batches == [[("a0", 0), ("a0", 1), ("a0", 2), ("a0", 3)], [("a0", 4), ("a1", 0), ("a1", 1), ("a3", 0)],
                       [("a3", 1), ("a3", 2)]]
    for name, images in volumes.items():
        result = futures[name].result(timeout=0)
        assert isinstance(result, VolumeResult) and result.labels.shape == (len(images), 64, 64)
        for image, labels in zip(images, result.labels):
            np.testing.assert_array_equal(labels, _alone(folder, name, image))
        assert result.times["replica"] >= result.times["model"] > 0
    mixed = futures["a1"].result(timeout=0).batches
    assert [b["adapters"] for b in mixed] == [3] and mixed[0]["size"] == 4
    assert [b["size"] for b in futures["a0"].result(timeout=0).batches] == [4, 4]
    assert futures["a1"].result(timeout=0).probs.shape == (2, 4, 64, 64) and futures["a0"].result(timeout=0).probs is None


def test_per_adapter_batches_take_one_adapter_version_from_every_request(folder):
    queue, futures = SliceQueue(4, "per-adapter"), [Future() for _ in range(4)]
    for future, (name, n) in zip(futures, [("a0", 3), ("a1", 2), ("a0", 2), ("a1", 1)]):
        queue.put(VolumeRequest(name, np.stack(_slices(n, seed=n))), future)
    batches = _drain(queue, _model(folder, batching="per-adapter"))
    assert batches == [[("a0", 0), ("a0", 1), ("a0", 2), ("a0", 0)], [("a1", 0), ("a1", 1), ("a1", 0)], [("a0", 1)]]
    assert all(isinstance(f.result(timeout=0), VolumeResult) for f in futures)
    assert [b["adapters"] for f in futures for b in f.result(timeout=0).batches] == [1] * 5


def test_a_failing_adapter_or_a_gone_caller_leaves_the_other_requests_answered(folder):
    queue, good, missing, gone = SliceQueue(8, "mixed"), Future(), Future(), Future()
    images = np.stack(_slices(3, seed=6))
    queue.put(VolumeRequest("missing", images[:2]), missing)
    queue.put(VolumeRequest("a0", images[:2]), gone)
    queue.put(VolumeRequest("a2", images), good)
    assert gone.cancel()  # its caller went away before its slices were taken: they are not predicted
    assert _drain(queue, _model(folder)) == [[("missing", 0), ("missing", 1), ("a2", 0), ("a2", 1), ("a2", 2)]]
    assert isinstance(missing.result(timeout=0), NotFoundError) and "a0, a1" in str(missing.result(timeout=0))
    for image, labels in zip(images, good.result(timeout=0).labels):
        np.testing.assert_array_equal(labels, _alone(folder, "a2", image))
    # A batch that fails as a whole fails its requests, and the queue goes on with the next.
    broken = Future()
    queue.put(VolumeRequest("a0", images), broken)
    SliceQueue.fail(queue.take(), RuntimeError("the model thread died"))
    with pytest.raises(RuntimeError, match="died"):
        broken.result(timeout=0)
    assert queue.take() == [] and queue.waiting() == 0
    # A request that came alone to its front runs alone; another one waiting in the queue ends that.
    queue.put(VolumeRequest("a0", images, alone=True), Future())
    first = queue.take()
    assert len(first) == 3 and queue.alone(first)
    queue.put(VolumeRequest("a1", images), Future())
    assert not queue.alone(first)


def test_a_replica_batches_calls_in_flight_together_and_runs_a_full_batch_without_waiting(folder):
    """The replica's loop (serve.segmenter, its class without Ray Serve): calls that arrive while
    a partial batch waits share it; a full batch never waits --batch-wait-ms (an hour here)."""
    import asyncio

    from samed_adapter.serve.segmenter import Segmenter
    from samed_adapter.serve.settings import ServeSettings

    images = np.stack(_slices(4, seed=8))

    async def calls(replica, requests):
        first = asyncio.ensure_future(replica(requests[0]))
        await asyncio.sleep(0.2)  # the others come later, while the first one's partial batch waits
        return await asyncio.wait_for(asyncio.gather(first, *[replica(r) for r in requests[1:]]), 120)

    settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapters=[str(folder)], max_batch_size=4,
                             batch_wait_ms=3_600_000)
    replica = Segmenter.func_or_class(settings)
    # One call of a full batch, then four of one slice each, which fill the next one together.
    full = asyncio.run(calls(replica, [VolumeRequest("a0", images)]))[0]
    assert [b["size"] for b in full.batches] == [4]
    small = asyncio.run(calls(replica, [VolumeRequest(n, images[i:i + 1]) for i, n in enumerate(["a1", "a3", "a0", "a2"])]))
    assert all(isinstance(r, VolumeResult) for r in small), small
    assert {b["batch"] for r in small for b in r.batches} == {2} and small[0].batches[0]["adapters"] == 4
    for i, (name, result) in enumerate(zip(["a1", "a3", "a0", "a2"], small)):
        np.testing.assert_array_equal(result.labels[0], _alone(folder, name, images[i]))
    np.testing.assert_array_equal(full.labels[2], _alone(folder, "a0", images[2]))


def test_non_finite_logits_fail_only_their_own_slice_of_a_batch(folder):
    """Labels and the finiteness check run on the whole batch at once, the verdict still per slice."""
    slices = _slices(3, seed=9)
    slices[1] = slices[1].copy()
    slices[1][10, 10] = np.nan  # a NaN pixel: that image's logits are NaN, its neighbours' are not
    for batching in ("mixed", "per-adapter"):
        out = _model(folder, batching=batching).predict([SliceRequest("a0", slices[0]), SliceRequest("a1", slices[1]),
                                                         SliceRequest("a1", slices[2])])
        assert isinstance(out[1], UnprocessableError) and "NaN or infinite logits" in str(out[1]), out[1]
        np.testing.assert_array_equal(out[0].labels, _alone(folder, "a0", slices[0]))
        np.testing.assert_array_equal(out[2].labels, _alone(folder, "a1", slices[2]))


def test_cpu_replicas_leave_a_core_to_the_front():
    from samed_adapter.serve.segmenter import cpu_threads

    assert [cpu_threads(2, 1), cpu_threads(16, 1), cpu_threads(16, 4), cpu_threads(1, 1), cpu_threads(2, 3)] == \
        [1, 15, 3, 1, 1]
    assert [cpu_threads(2, 1, alone=True), cpu_threads(16, 4, alone=True), cpu_threads(1, 1, alone=True)] == [2, 4, 1]
