"""The segmentation service under load: adapter-mixed batches against per-adapter batches and
one `samed-adapter segment` process per request, all through the real HTTP path.

A real local server (`samed_adapter.serve.start`: local Ray, Ray Serve's HTTP proxy, one model
replica) is started for each batching mode in turn. C client threads (`requests`) POST volumes to
`/v1/segment`, request i asking for adapter i mod N (N = 1, 4, 16: adapters interleaved round
robin), after a warm-up that makes every adapter resident (`--max-resident` defaults to the
largest N, so the throughput rows measure batching, not reloads; `/metrics` gives each row's
adapter loads, slices per batch and adapters per batch). Rows:
  (a) mixed        `batching="mixed"`: slices of several adapters share one encoder pass,
  (b) per-adapter  `batching="per-adapter"`: one adapter per forward (Ray Serve multiplexing),
  (c) processes    one `samed-adapter segment` subprocess per request (loads SAM and its adapter
                   each time), C at once, for the largest N only (it does not depend on N).
Each batching mode also gets a row of small requests (`--few-slices`, 2) from more clients
(`--few-clients`, 8) over the largest N adapters: there per-adapter batches cannot fill (each
adapter has a few slices in flight) and a mixed batch can (issue 30).
Slices per second (all the slices answered / wall time of the row) and p50 / p95 request
latency, then the ratios: each mode with 1 adapter / the model alone (goal >= 0.70), mixed /
per-adapter (full volumes and small requests), mixed with 16 adapters / with 1 (goal >= 0.90),
mixed / processes. The header gives the model alone's slices/s on the same slices in batches of
`--batch-size`, `--few-slices` and 1 in this process (what the service's overhead is measured
against), and the last lines where the time of one request alone goes, a whole volume and one
slice, on each server, hop by hop (MONAI Label's `/infer?output=json` latencies: read + prepare,
the call to the replica, resize + write on the front; queued and in its batches on the replica;
the rest of the call is Ray's; the client's time beyond the front's is HTTP and the upload), and
what the service adds to the model and the file work (goal <= 20 ms).

Cold adapter: a mixed server with `--max-resident 2`, one client, cycling over 4 adapters so
that each one is evicted before it comes back: each round times a request for an adapter that
is not resident (cold) and the same request again (warm). One file swap alone is timed in this
process: `Adapter.load(path)` + `model.load_adapter` + `set_adapter` on the same SAM; and the
same rounds run on one replica's model (`ServingModel.predict`) in this process, without HTTP
and Ray, where the request-to-request spread is small. Goal:
(cold - warm) / swap <= 1, cold - warm the median of the rounds' differences (on the tiny
model a swap takes ~2 ms, less than the spread of one request's latency: the ratio is noisy).

Volumes: nilearn's MNI152 T1 template resampled to S x S x `--slices` (S = `--image-size`, so
the server does not resize), or random if nilearn is missing. Timings are printed and written
as JSON with `--out`; nothing here is asserted.

    python benchmarks/bench_serve.py [--backbone tiny] [--clients 4] [--requests 32] [--slices 16]
        [--image-size 256] [--adapters 1,4,16] [--few-slices 2] [--few-clients 8] [--skip-processes]
        [--out results.json]
    python benchmarks/bench_serve.py --backbone vit_b --random-sam-seed 0 --device cuda --image-size 512
    python benchmarks/bench_serve.py --backbone vit_b --sam sam_vit_b_01ec64.pth --device cuda
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import nibabel as nib
import numpy as np
import requests
import torch

import samed_adapter as sa
from samed_adapter.segment.pipeline import SamSource
from samed_adapter.serve import ServeSettings, start
from samed_adapter.testing import random_adapter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_volume(size: int, slices: int) -> np.ndarray:
    """(size, size, slices) float32 in [0, 1]: the MNI152 T1 resampled, or noise without nilearn."""
    try:
        from nilearn.datasets import load_mni152_template
        from scipy import ndimage

        t1 = np.asarray(load_mni152_template(resolution=2).dataobj, dtype=np.float32)  # (99, 117, 95)
        slab = t1[:, :, 30:70]
        volume = ndimage.zoom(slab, (size / slab.shape[0], size / slab.shape[1], slices / slab.shape[2]), order=1)
        return np.clip(volume / max(float(volume.max()), 1e-6), 0, 1).astype(np.float32)
    except ImportError:
        return np.random.default_rng(0).random((size, size, slices), dtype=np.float32)


def nifti_bytes(volume: np.ndarray) -> bytes:
    image = nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.5, 1.0]))
    return gzip.compress(image.to_bytes(), compresslevel=1)


def metrics(url: str) -> dict[str, float]:
    """The counters this benchmark reads from GET /metrics (summed over labels)."""
    wanted = ("samed_batch_slices_sum", "samed_batch_slices_count", "samed_batch_adapters_sum",
              "samed_adapter_loads")
    out = dict.fromkeys(wanted, 0.0)
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.split()[-1])
    return out


def post(url: str, adapter: str, data: bytes) -> float:
    """One /v1/segment request; its latency in seconds (raises on anything but 200)."""
    start_time = time.perf_counter()
    answer = requests.post(f"{url}/v1/segment", data={"adapter": adapter}, files={"file": ("scan.nii.gz", data)},
                           timeout=600)
    seconds = time.perf_counter() - start_time
    if answer.status_code != 200:
        raise RuntimeError(f"{adapter}: HTTP {answer.status_code}: {answer.text[:300]}")
    return seconds


def concurrently(clients: int, count: int, one: Callable[[int], float]) -> tuple[float, list[float]]:
    """Run one(i) for i in 0..count-1 on `clients` threads taking the next i in turn: (wall s, latencies)."""
    latencies: list[Optional[float]] = [None] * count
    errors: list[BaseException] = []
    turn = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        while not errors:
            with lock:
                i = next(turn, None)
            if i is None:
                return
            try:
                latencies[i] = one(i)
            except BaseException as err:  # noqa: BLE001 - reported after the threads end
                errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start_time = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start_time
    if errors:
        raise errors[0]
    return wall, [x for x in latencies if x is not None]


def row(path: str, n: int, requests_done: int, slices: int, wall: float, latencies: list[float],
        before: Optional[dict[str, float]] = None, after: Optional[dict[str, float]] = None) -> dict[str, Any]:
    out = {"path": path, "adapters": n, "requests": requests_done, "slices_per_s": requests_done * slices / wall,
           "p50_ms": float(np.percentile(latencies, 50)) * 1e3, "p95_ms": float(np.percentile(latencies, 95)) * 1e3,
           "wall_s": wall}
    if before is not None and after is not None:
        batches = after["samed_batch_slices_count"] - before["samed_batch_slices_count"]
        out.update(batches=int(batches),
                   slices_per_batch=(after["samed_batch_slices_sum"] - before["samed_batch_slices_sum"])
                   / max(batches, 1),
                   adapters_per_batch=(after["samed_batch_adapters_sum"] - before["samed_batch_adapters_sum"])
                   / max(batches, 1),
                   loads=int(after["samed_adapter_loads"] - before["samed_adapter_loads"]))
    return out


def settings_for(args: argparse.Namespace, source: SamSource, folder: Path, **changes: Any) -> ServeSettings:
    cuda = args.device.startswith("cuda")
    options = dict(sam=source, adapters=[str(folder)], port=free_port(), device=args.device,
                   gpus_per_replica=1.0 if cuda else 0.0, max_batch_size=args.batch_size,
                   batch_wait_ms=args.batch_wait_ms, max_resident=max(args.adapters),
                   max_queue=max(32, 2 * args.clients), max_upload_mb=1024.0)
    options.update(changes)
    return ServeSettings(**options)


#: where one request's time goes, as MONAI Label's /infer?output=json reports it (seconds): on
#: the front, reading + preparing (pre), the call to a model replica (infer), resizing + writing
#: (post), all of it (total); on the replica, arrival to its first batch (replica_queued), its
#: batches' forward passes (replica_model), arrival to answer (replica_replica)
HOPS = ("pre", "infer", "post", "total", "replica_queued", "replica_model", "replica_replica")


def breakdown(url: str, adapter: str, data: bytes, repeats: int = 3) -> dict[str, float]:
    """Where one request's time goes, alone on the server (medians in ms, ``HOPS``); "client":
    the whole HTTP request as the client times it."""
    times = []
    for _ in range(repeats):
        start_time = time.perf_counter()
        answer = requests.post(f"{url}/infer/{adapter}", params={"output": "json"},
                               files={"file": ("scan.nii.gz", data)}, timeout=600)
        client = time.perf_counter() - start_time
        answer.raise_for_status()
        times.append({**answer.json()["latencies"], "client": client})
    return {key: statistics.median(t.get(key, float("nan")) for t in times) * 1e3 for key in (*HOPS, "client")}


def hop_lines(name: str, t: dict[str, float], model_ms: float, slices: int) -> list[str]:
    """One request's hops, in words: what the service adds to the model and the file work."""
    return [f"{name}: client {t['client']:.1f} ms = HTTP + upload {t['client'] - t['total']:.1f} + front "
            f"{t['total']:.1f} (read + prepare {t['pre']:.1f}, replica call {t['infer']:.1f}, resize + write "
            f"{t['post']:.1f}); the replica call = Ray's hops {t['infer'] - t['replica_replica']:.1f} + on the "
            f"replica {t['replica_replica']:.1f} (queued {t['replica_queued']:.1f}, its batches "
            f"{t['replica_model']:.1f}); the model alone {model_ms:.1f} ms for its {slices} slice(s): the service "
            f"adds {t['infer'] - model_ms:.1f} ms to the model and the file work (goal <= 20)"]


#: the service's processes, by what Ray names them in their command lines
PROCESSES = {"replica": "ServeReplica:samed-adapter:Segmenter", "front": "ServeReplica:samed-adapter:Frontend",
             "proxy": "ProxyActor"}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by the service's processes (of the Ray this process
    started), this process (the clients), and the whole machine ("busy", all cores); {} without psutil."""
    try:
        import psutil
    except ImportError:
        return {}
    out = dict.fromkeys([*PROCESSES, "clients"], 0.0)
    for process in psutil.Process().children(recursive=True):  # the Ray started here: not another server's
        try:
            line, times = " ".join(process.cmdline()), process.cpu_times()
        except psutil.Error:
            continue
        for name, marker in PROCESSES.items():
            if marker in line:
                out[name] += times.user + times.system
    mine = os.times()
    out["clients"] = mine.user + mine.system
    machine = psutil.cpu_times()
    out["busy"] = machine.user + machine.nice + machine.system + getattr(machine, "irq", 0) + \
        getattr(machine, "softirq", 0)
    return out


def cpu_per_request(before: dict[str, float], after: dict[str, float], count: int) -> dict[str, float]:
    """CPU ms per request of each process, and of everything else on the machine ("others")."""
    if not before:
        return {}
    out = {k: (after[k] - before[k]) / count * 1e3 for k in before}
    out["others"] = out.pop("busy") - sum(out.values())
    return out


def load_rows(url: str, path: str, names: list[str], data: bytes, slices: int, clients: int, count: int,
              counts: list[int]) -> list[dict[str, Any]]:
    """One row per number of adapters interleaved: ``count`` requests of ``slices`` slices from
    ``clients`` threads, after a warm-up that makes every adapter resident."""
    rows = []
    for n in counts:
        use = names[:n]
        warm = max(n, clients)  # every adapter resident, Ray's handles and threads warm
        concurrently(clients, warm, lambda i: post(url, use[i % n], data))
        before, cpu = metrics(url), cpu_seconds()
        wall, latencies = concurrently(clients, count, lambda i: post(url, use[i % n], data))
        rows.append(row(path, n, count, slices, wall, latencies, before, metrics(url)))
        rows[-1]["cpu_ms_per_request"] = cpu_per_request(cpu, cpu_seconds(), count)
        print(f"    {path}, {n:2d} adapters: {rows[-1]['slices_per_s']:.1f} slices/s", flush=True)
    return rows


def served_rows(args: argparse.Namespace, source: SamSource, folder: Path, names: list[str], data: bytes,
                few: bytes, batching: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """The rows of one batching mode, on a server of its own: full volumes (--slices) and small
    requests (--few-slices) from more clients, and one request alone of each size and of one slice."""
    started = time.perf_counter()
    with start(settings_for(args, source, folder, batching=batching)) as server:
        print(f"  {batching}: server up in {time.perf_counter() - started:.1f} s", flush=True)
        post(server.url, names[0], data)
        alone = {"volume": breakdown(server.url, names[0], data, args.alone_repeats),
                 "one slice": breakdown(server.url, names[0], nifti_bytes(make_volume(args.image_size, 1)),
                                        args.alone_repeats)}
        rows = load_rows(server.url, batching, names, data, args.slices, args.clients, args.requests, args.adapters)
        rows += load_rows(server.url, f"{batching}, {args.few_slices}-slice requests", names, few, args.few_slices,
                          args.few_clients, args.few_requests, [max(args.adapters)])
    return rows, alone


def process_row(args: argparse.Namespace, folder: Path, names: list[str], volume_path: Path, work: Path,
                checkpoint: Optional[Path]) -> dict[str, Any]:
    n = max(args.adapters)
    sam = ["--sam", str(checkpoint)] if checkpoint else ["--sam-backbone", args.backbone,
                                                        "--random-sam-seed", str(args.random_sam_seed)]

    def one(i: int) -> float:
        command = [sys.executable, "-m", "samed_adapter.cli", "segment", *sam, "--adapter",
                   str(folder / f"{names[i % n]}.safetensors"), "--device", args.device, "--batch-size",
                   str(args.batch_size), str(volume_path), "-o", str(work / f"process_{i}")]
        start_time = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start_time
        if done.returncode != 0:
            raise RuntimeError(f"segment process {i} failed ({done.returncode}): {done.stderr[-800:]}")
        return seconds

    count = args.process_requests or args.clients
    wall, latencies = concurrently(args.clients, count, one)
    return row("process per request", n, count, args.slices, wall, latencies)


def cold_rows(args: argparse.Namespace, source: SamSource, folder: Path, names: list[str],
              data: bytes) -> dict[str, Any]:
    """A cold request against the same request warm, on a server with --max-resident 2."""
    cycle = names[:4]
    cold, warm = [], []
    with start(settings_for(args, source, folder, batching="mixed", max_resident=2)) as server:
        for name in cycle:  # the SAM patched, every code path warm
            post(server.url, name, data)
            post(server.url, name, data)
        before = metrics(server.url)
        for i in range(args.cold_rounds):
            name = cycle[i % len(cycle)]  # the two adapters used last are the resident ones: this one is not
            cold.append(post(server.url, name, data))
            warm.append(post(server.url, name, data))
        loads = int(metrics(server.url)["samed_adapter_loads"] - before["samed_adapter_loads"])
    q1, _, q3 = statistics.quantiles(warm, n=4)
    return {"cold_ms": statistics.median(cold) * 1e3, "warm_ms": statistics.median(warm) * 1e3,
            "extra_ms": statistics.median(c - w for c, w in zip(cold, warm)) * 1e3,
            "warm_iqr_ms": (q3 - q1) * 1e3, "rounds": args.cold_rounds, "loads": loads}


def replica_cold(args: argparse.Namespace, source: SamSource, folder: Path, names: list[str],
                 volume: np.ndarray) -> dict[str, float]:
    """The same cold / warm rounds on one replica's model in this process (no HTTP, no Ray): the
    volume's slices through `ServingModel.predict`, with --max-resident 2."""
    from samed_adapter.serve.catalog import AdapterCatalog
    from samed_adapter.serve.residents import ServingModel, SliceRequest

    model = ServingModel(source, AdapterCatalog([folder]), max_resident=2, device=args.device, batching="mixed")
    cycle = names[:4]
    slices = [np.ascontiguousarray(volume[:, :, i]) for i in range(volume.shape[2])]

    def one(name: str) -> float:
        sync(args.device)
        start_time = time.perf_counter()
        for first in range(0, len(slices), args.batch_size):
            model.predict([SliceRequest(name, image) for image in slices[first:first + args.batch_size]])
        sync(args.device)
        return time.perf_counter() - start_time

    for name in cycle:
        one(name)
        one(name)
    loads = model.loads
    cold, warm = [], []
    for i in range(args.cold_rounds):
        cold.append(one(cycle[i % len(cycle)]))
        warm.append(one(cycle[i % len(cycle)]))
    return {"cold_ms": statistics.median(cold) * 1e3, "warm_ms": statistics.median(warm) * 1e3,
            "extra_ms": statistics.median(c - w for c, w in zip(cold, warm)) * 1e3, "loads": model.loads - loads}


def swap_ms(sam: Any, paths: list[Path], device: str, repeats: int, volume: np.ndarray,
            batch_sizes: list[int]) -> tuple[float, dict[int, float]]:
    """Median of one file swap: Adapter.load(path) + load_adapter + set_adapter, the previous one
    deleted after; and the model alone's slices/s on the volume's slices in batches of each of
    ``batch_sizes`` (the first: the server's --max-batch-size, the ceiling)."""
    sam = sam.to(device)
    model = sa.patch(sam, sa.Adapter.load(paths[0]), adapter_name="a0")
    images = torch.from_numpy(np.moveaxis(volume, 2, 0).copy())[:, None].expand(-1, 3, -1, -1).to(device)
    rates = {b: model_rate(model, images, b, device) for b in dict.fromkeys(batch_sizes)}
    times = []
    for i in range(1, repeats + 1):
        name, path = f"a{i}", paths[i % len(paths)]
        sync(device)
        start_time = time.perf_counter()
        model.load_adapter(sa.Adapter.load(path), name)
        model.set_adapter(name)
        sync(device)
        times.append(time.perf_counter() - start_time)
        model.delete_adapter(f"a{i - 1}")
    sa.unpatch(sam)
    return statistics.median(times) * 1e3, rates


def model_rate(model: Any, images: torch.Tensor, batch_size: int, device: str, repeats: int = 7) -> float:
    """The model alone's slices/s on (n, 3, S, S) ``images`` in batches of ``batch_size``: the best
    of ``repeats`` passes (a ceiling: on a shared machine a pass that others slowed is not the model's)."""
    model(images[:batch_size])  # warm-up
    passes = []
    for _ in range(repeats):
        sync(device)
        start_time = time.perf_counter()
        for batch in images.split(batch_size):
            model(batch)
        sync(device)
        passes.append(time.perf_counter() - start_time)
    return len(images) / min(passes)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny", help="tiny (CPU default), vit_b, ...")
    parser.add_argument("--sam", help="a stock SAM checkpoint of --backbone (default: random weights)")
    parser.add_argument("--random-sam-seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32, help="timed requests per row")
    parser.add_argument("--slices", type=int, default=16, help="slices per volume")
    parser.add_argument("--image-size", type=int, default=256, help="the adapters' image size (= the volumes' S)")
    parser.add_argument("--adapters", default="1,4,16", help="numbers of adapters interleaved, comma-separated")
    parser.add_argument("--batch-size", type=int, default=8, help="--max-batch-size of the server")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--process-requests", type=int, help="requests of row (c) (default: --clients)")
    parser.add_argument("--skip-processes", action="store_true", help="leave out row (c)")
    parser.add_argument("--few-slices", type=int, default=2,
                        help="slices per request of the rows where per-adapter batches cannot fill")
    parser.add_argument("--few-clients", type=int, default=8, help="clients of those rows")
    parser.add_argument("--few-requests", type=int, default=96, help="timed requests of those rows")
    parser.add_argument("--alone-repeats", type=int, default=7, help="requests alone timed (medians)")
    parser.add_argument("--cold-rounds", type=int, default=32)
    parser.add_argument("--swap-repeats", type=int, default=20)
    parser.add_argument("--nice", type=int, default=15,
                        help="run this process at this niceness, as Ray runs the service's workers (its raylet's "
                             "worker_niceness, 15): on a shared machine the model alone and the clients then yield "
                             "to other work as much as the service does")
    parser.add_argument("--out", help="also write the numbers here as JSON")
    args = parser.parse_args()
    os.nice(max(0, args.nice - os.nice(0)))
    args.adapters = [int(x) for x in args.adapters.split(",")]
    torch.set_grad_enabled(False)

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        folder = work / "adapters"
        folder.mkdir()
        if args.sam:
            sam = sa.build_sam(args.backbone, checkpoint=args.sam)
            source = SamSource(checkpoint=str(Path(args.sam).resolve()))
        else:
            sam = sa.build_sam(args.backbone, seed=args.random_sam_seed)
            source = SamSource(backbone=args.backbone, seed=args.random_sam_seed)
        count = max(max(args.adapters), 4)
        names = [f"organ{i:02d}" for i in range(count)]
        paths = []
        for i, name in enumerate(names):
            config = sa.AdapterConfig(num_classes=3, image_size=args.image_size, intensity_window=(0.0, 1.0))
            paths.append(random_adapter(sam, config, seed=100 + i).save(folder / f"{name}.safetensors"))
        volume = make_volume(args.image_size, args.slices)
        data = nifti_bytes(volume)
        volume_path = work / "scan.nii.gz"
        volume_path.write_bytes(data)
        swap, model_rates = swap_ms(sam, paths, args.device, args.swap_repeats, volume,
                                    [args.batch_size, args.few_slices, 1])
        ceiling = model_rates[args.batch_size]
        del sam
        where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
            f"{torch.get_num_threads()} threads"
        header = (f"{args.backbone} ({'checkpoint' if args.sam else 'random weights'}) at {args.image_size}, "
                  f"{args.device} ({where}); {args.clients} clients, {args.requests} requests per row of "
                  f"{args.slices} slices; max batch {args.batch_size}, wait {args.batch_wait_ms:g} ms; nice "
                  f"{os.nice(0)}; model alone "
                  f"{ceiling:.0f} slices/s ({', '.join(f'{r:.0f} in batches of {b}' for b, r in model_rates.items())})")
        print(header, flush=True)

        rows = []
        alone: dict[str, dict[str, dict[str, float]]] = {}
        few = nifti_bytes(volume[:, :, : args.few_slices])
        for batching in ("mixed", "per-adapter"):
            more, alone[batching] = served_rows(args, source, folder, names, data, few, batching)
            rows += more
        if not args.skip_processes:
            print("  processes ...", flush=True)
            rows.append(process_row(args, folder, names, volume_path, work, Path(args.sam) if args.sam else None))
        print("  cold adapter ...", flush=True)
        cold = cold_rows(args, source, folder, names, data)
        cold["swap_ms"] = swap
        cold["ratio"] = cold["extra_ms"] / swap
        print("  cold adapter, one replica in this process ...", flush=True)
        cold["replica"] = replica_cold(args, source, folder, names, volume)
        cold["replica"]["ratio"] = cold["replica"]["extra_ms"] / swap
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{header}\n")
    ratios = report(args, rows, cold, alone, model_rates)
    if args.out:
        numbers = {"setup": header, "args": vars(args), "ceiling_slices_per_s": ceiling, "model_rates": model_rates,
                   "alone_ms": alone, "rows": rows, "ratios": ratios, "cold": cold}
        Path(args.out).write_text(json.dumps(numbers, indent=2))


def report(args: argparse.Namespace, rows: list[dict[str, Any]], cold: dict[str, Any],
           alone: dict[str, dict[str, dict[str, float]]], model_rates: dict[int, float]) -> dict[str, float]:
    """Print the table, the ratios against the issues' goals and each request alone's hops; the ratios."""
    print("| path | adapters | slices/s | p50 ms | p95 ms | slices/batch | adapters/batch | adapter loads |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        extra = (f"{r['slices_per_batch']:.1f} | {r['adapters_per_batch']:.2f} | {r['loads']}" if "batches" in r
                 else "n/a | n/a | n/a")
        print(f"| {r['path']} | {r['adapters']} | {r['slices_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
              f"{extra} |")

    for r in rows:  # where the cores went: each process's CPU per request, against what the cores gave
        if r.get("cpu_ms_per_request"):
            capacity = (os.cpu_count() or 1) * r["wall_s"] / r["requests"] * 1e3
            print(f"CPU per request, {r['path']}, {r['adapters']} adapters (ms of one core, of {capacity:.0f} the "
                  "cores gave per request): " + ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_ms_per_request"].items()))

    def rate(path: str, n: int) -> Optional[float]:
        return next((r["slices_per_s"] for r in rows if r["path"] == path and r["adapters"] == n), None)

    ratios: dict[str, float] = {}
    print()
    low, high = min(args.adapters), max(args.adapters)
    ceiling = model_rates[args.batch_size]
    for batching in ("mixed", "per-adapter"):
        ratios[f"{batching}@{low}/model"] = rate(batching, low) / ceiling
        t = alone[batching]["volume"]
        serial = args.slices / (args.slices / ceiling + (t["pre"] + t["post"]) / 1e3)
        ratios[f"{batching}@{low}/model+files"] = rate(batching, low) / serial
        print(f"{batching}, {low} adapter(s): {ratios[f'{batching}@{low}/model']:.2f} of the model alone's slices/s "
              f"(goal >= 0.70); {ratios[f'{batching}@{low}/model+files']:.2f} of the model and one request's file "
              f"work one after the other ({serial:.0f} slices/s: read + prepare, resize + write share the cores)")
    for n in args.adapters:
        ratios[f"mixed/per-adapter@{n}"] = rate("mixed", n) / rate("per-adapter", n)
        line = f"mixed / per-adapter, {n:2d} adapters: {ratios[f'mixed/per-adapter@{n}']:.2f}x"
        if n != low == 1:  # with 1 adapter both run the same code: their ratio is the two servers' drift
            ratios[f"mixed/per-adapter@{n} / @1"] = ratios[f"mixed/per-adapter@{n}"] / ratios["mixed/per-adapter@1"]
            line += f" ({ratios[f'mixed/per-adapter@{n} / @1']:.2f}x divided by the 1-adapter ratio, same code in both)"
        print(line)
    suffix = f", {args.few_slices}-slice requests"
    ratios[f"few mixed/per-adapter@{high}"] = rate("mixed" + suffix, high) / rate("per-adapter" + suffix, high)
    print(f"mixed / per-adapter, {high} adapters, {args.few_clients} clients of {args.few_slices}-slice requests "
          f"(per-adapter batches cannot fill): {ratios[f'few mixed/per-adapter@{high}']:.2f}x (the model alone in "
          f"batches of {args.batch_size} / of {args.few_slices}: {ceiling / model_rates[args.few_slices]:.2f}x)")
    if high != low:
        ratios[f"mixed {high}/{low} adapters"] = rate("mixed", high) / rate("mixed", low)
        ratios[f"per-adapter {high}/{low} adapters"] = rate("per-adapter", high) / rate("per-adapter", low)
        print(f"mixed, {high} adapters / {low}: {ratios[f'mixed {high}/{low} adapters']:.2f} (goal >= 0.90); "
              f"per-adapter: {ratios[f'per-adapter {high}/{low} adapters']:.2f}")
    if rate("process per request", high):
        ratios[f"mixed/process@{high}"] = rate("mixed", high) / rate("process per request", high)
        print(f"mixed / process per request, {high} adapters: {ratios[f'mixed/process@{high}']:.1f}x")
    print(f"cold adapter (--max-resident 2, medians of {cold['rounds']} rounds): cold {cold['cold_ms']:.1f} ms, warm "
          f"{cold['warm_ms']:.1f} ms, cold - warm (median of the rounds' differences) {cold['extra_ms']:.1f} ms; one "
          f"file swap alone {cold['swap_ms']:.2f} ms; (cold - warm) / swap = "
          f"{cold['ratio']:.2f} (goal <= 1); {cold['loads']} loads in {cold['rounds']} cold requests; warm "
          f"latencies' interquartile range {cold['warm_iqr_ms']:.1f} ms")
    r = cold["replica"]
    print(f"the same on one replica's model in this process (no HTTP, no Ray): cold {r['cold_ms']:.1f} ms, warm "
          f"{r['warm_ms']:.1f} ms, cold - warm {r['extra_ms']:.2f} ms; (cold - warm) / swap = {r['ratio']:.2f} "
          f"(goal <= 1); {r['loads']} loads")
    for batching, both in alone.items():
        for what, t in both.items():
            slices = args.slices if what == "volume" else 1
            model_ms = slices / (ceiling if what == "volume" else model_rates[1]) * 1e3
            ratios[f"{batching} alone {what}: added ms"] = t["infer"] - model_ms
            print(*hop_lines(f"one request of {slices} slice(s) alone ({batching}, median of {args.alone_repeats})",
                             t, model_ms, slices))
    return ratios


if __name__ == "__main__":
    main()
