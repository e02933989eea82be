"""Clicks: one click with the slice's embedding kept, against the whole model run on that slice.

A click-trained adapter (random values, K = 8) on ViT-B-shaped random weights at S = 512:
  full model     the encoder and the decoder on one slice (what a click would cost without a
                 session: `model(x)`),
  click          `session.click(...)` on a 1-slice session: the prompt encoder and the decoder
                 of one class, the refined mask resized and merged (embeddings kept),
  first click    the same for a class not yet clicked on that slice: the decoder also runs once
                 without clicks, the reference a refinement is measured against (then kept),
  click, decoder the decoder call alone inside it (`decode_clicks` on the kept embedding),
  start          `model.interactive(image)` on a 16-slice volume (the encoder once per slice),
                 per slice,
and with --service, through `samed-adapter serve` (local Ray Serve, one replica) with MONAI
Label's own client, as 3D Slicer's module calls it:
  service click  `/infer/{model}?session_id=...` with one foreground click on a 1-slice session
                 whose embedding the replica keeps (end to end: HTTP, Ray, refine, NIfTI answer).
Rows are timed in turn (round-robin) in one run; ratios to the full-model row. The goal of
issue 31 is a click at most 5 % of the full run.

    python benchmarks/bench_clicks.py [--backbone vit_b] [--image-size 512] [--repeats 5] [--device cpu] [--service]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import samed_adapter as sa
from samed_adapter.interactive import SliceClick, click_coords, decode_clicks, mask_prompt
from samed_adapter.testing import random_adapter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args) -> tuple[sa.SAMed, torch.device]:
    device = torch.device(args.device)
    sam = sa.build_sam(args.backbone, seed=0)
    config = sa.AdapterConfig(num_classes=8, image_size=args.image_size, intensity_window=None, clicks=True)
    adapter = random_adapter(sam, config, seed=1)
    model = sa.patch(sam.to(device), adapter).eval()
    return model, device


def rows(model: sa.SAMed, device: torch.device, args) -> dict[str, Callable[[], None]]:
    size = args.image_size
    rng = np.random.default_rng(0)
    slice_ = rng.random((1, size, size)).astype(np.float32)
    session = model.interactive(slice_)
    x = torch.from_numpy(slice_)[None].expand(-1, 3, -1, -1).to(device)
    embeddings, extra = session.embedding(0)
    clicks = [SliceClick(5, 0, size // 2, size // 2, True)]
    coords, labels = click_coords([clicks], (size, size), size)
    masks = mask_prompt(torch.from_numpy(session.slice_labels[:1] == 5), model.config.grid_size)
    classes = torch.tensor([5])
    state = {"n": 0}

    def full() -> None:
        with torch.inference_mode():
            model(x)

    def click() -> None:
        state["n"] += 1  # a new point each time, so every call refines with one more click
        session.click(5, (0, (size // 2 + state["n"]) % size, size // 3), positive=bool(state["n"] % 2))
        if len(session.clicks(5)) > 8:
            session.reset(5)

    def decoder() -> None:
        with torch.inference_mode():
            decode_clicks(model, embeddings, extra, coords, labels, classes, masks)

    # Every call needs a (slice, class) never clicked: K = 8 classes per 1-slice session.
    fresh = [(model.interactive(slice_), label) for _ in range(-(-(args.repeats + 1) // 8))
             for label in range(1, 9)]

    def first_click() -> None:
        first, label = fresh.pop()
        first.click(label, (0, size // 2, size // 3), positive=True)

    volume = rng.random((16, size, size)).astype(np.float32)

    def start() -> None:
        model.interactive(volume)

    return {"full model": full, "click": click, "first click": first_click, "click, decoder": decoder,
            "start (16 slices)": start}


def service_row(args, adapter: sa.Adapter, folder: Path) -> tuple[Callable[[], None], Any]:
    """A click through a local service holding one session; returns the call and the running server."""
    import nibabel as nib
    from monailabel.client import MONAILabelClient

    from samed_adapter.segment.pipeline import SamSource
    from samed_adapter.serve import ServeSettings, start

    (folder / "adapters").mkdir()
    (folder / "tmp").mkdir()
    adapter.save(folder / "adapters" / "clicks.safetensors")
    size = args.image_size
    image = np.random.default_rng(0).random((size, size, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "slice.nii.gz")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ServeSettings(sam=SamSource(backbone=args.backbone, seed=0), adapters=[str(folder / "adapters")],
                             port=port, replicas=1, device=args.device, tmp_dir=str(folder / "tmp"))
    server = start(settings)
    running = server.__enter__()
    url = f"http://127.0.0.1:{port}"
    sid = MONAILabelClient(url, tmpdir=str(folder)).create_session(str(folder / "slice.nii.gz"))["session_id"]
    state = {"n": 0}

    def click() -> None:
        state["n"] += 1
        point = [size // 2 + state["n"] % 7, size // 3, 0]
        MONAILabelClient(url, tmpdir=str(folder)).infer(
            "clicks", "", {"label": "class_5", "foreground": [point], "background": []}, session_id=sid)

    return click, (server, running)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--service", action="store_true", help="also time a click through a local `serve`")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, device = build(args)
    table = rows(model, device, args)
    folder = Path(tempfile.mkdtemp(prefix="bench-clicks-"))
    server = None
    if args.service:
        table["service click"], server = service_row(args, model.adapter(), folder)
    try:
        report(table, model, device, args)
    finally:
        if server is not None:
            server[0].__exit__(None, None, None)
        shutil.rmtree(folder, ignore_errors=True)


def report(table: dict[str, Callable[[], None]], model: sa.SAMed, device: torch.device, args) -> None:
    times: dict[str, list[float]] = {name: [] for name in table}
    for repeat in range(-1, args.repeats):
        for name, run in table.items():
            if name.startswith("start") and repeat > 0:
                continue  # 16 encoder passes: one timed run is enough
            sync(device)
            began = time.perf_counter()
            run()
            sync(device)
            if repeat >= 0:
                times[name].append(time.perf_counter() - began)
    median = {name: statistics.median(t) for name, t in times.items()}
    median["start (16 slices)"] /= 16
    base = median["full model"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.backbone} at {args.image_size}, K = 8, click adapter {model.adapter().nbytes / 2**20:.2f} MiB; "
          f"{name}; median of {args.repeats}")
    print(f"| {'row':<28} | {'ms':>9} | {'x full model':>12} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 14}|")
    for row, seconds in median.items():
        label = row + (" per slice" if row.startswith("start") else "")
        print(f"| {label:<28} | {seconds * 1000:9.1f} | {seconds / base:12.3f} |")


if __name__ == "__main__":
    main()
