"""Segmenting an archive end to end: the plain loop against the pipeline and Ray, and the ceiling.

N CT-like volumes (real MNI152 T1 from nilearn, resampled to 512 x 512 in-plane, 40-80 slices,
scaled to HU-like values) are written as .nii.gz; then the whole `segment` job is timed, read to
written labels, with each engine. The ceiling is the model alone on the same slices already in
memory, resized and batched. Rows report slices per second and the fraction of the ceiling; the
engines' labels are checked equal to the serial ones. Also: `samed-adapter --help` start-up time.

    python benchmarks/bench_segment.py [--backbone tiny|vit_b] [--image-size 256] [--volumes 6]
                                       [--batch-size 8] [--device cuda] [--ray]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

import samed_adapter as sa
from samed_adapter.inference import stages as inference
from samed_adapter.io import read_image
from samed_adapter.segment.job import find_jobs
from samed_adapter.segment.pipeline import SamSource, segment_files
from samed_adapter.testing import random_adapter


def write_volumes(folder: Path, count: int, size: int, seed: int = 0) -> int:
    """``count`` CT-like volumes of ``size`` x ``size`` x 40..80 made from the MNI152 T1; returns slices."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2).get_fdata(dtype=np.float32)  # (99, 117, 95) in [0, 1]
    rng = np.random.default_rng(seed)
    total = 0
    for n in range(count):
        depth = int(rng.integers(40, 81))
        start = int(rng.integers(0, t1.shape[2] - 40))
        slab = t1[:, :, start : start + 40]
        zoom = (size / slab.shape[0], size / slab.shape[1], depth / slab.shape[2])
        volume = ndimage.zoom(slab, zoom, order=1) * 1400.0 - 1000.0  # air ... dense tissue, in HU
        affine = np.diag([0.7, 0.7, 2.5, 1.0])
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), folder / f"ct_{n:03d}.nii.gz")
        total += volume.shape[2]
    return total


def help_time() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "samed_adapter.cli", "--help"], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--volumes", type=int, default=6)
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the volumes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ray", action="store_true", help="also time --ray (local Ray, one actor)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_segment_"))
    try:
        inputs = work / "in"
        inputs.mkdir()
        slices = write_volumes(inputs, args.volumes, args.size)
        sam = sa.build_sam(args.backbone, seed=0)
        config = sa.AdapterConfig(num_classes=8, image_size=args.image_size, orientation="LPS")
        adapter = random_adapter(sam, config, seed=1).save(work / "adapter.safetensors")
        source = SamSource(sam, backbone=args.backbone, seed=0)  # built once, outside the timings
        print(f"{args.volumes} volumes, {slices} slices of {args.size} x {args.size}; {args.backbone} at "
              f"{args.image_size}, batch {args.batch_size}, device {args.device}, torch threads "
              f"{torch.get_num_threads()}")

        # The ceiling: the model alone on every slice, already prepared in memory.
        model = sa.patch(sam.to(args.device), adapter)
        jobs, _ = find_jobs([inputs], work / "unused")
        prepared = [inference.prepare_volume(model.config, read_image(j.source)) for j in jobs]
        batches = torch.cat([p.inputs for p in prepared]).split(args.batch_size)
        model.eval()
        inference.predict(model, batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            inference.predict(model, batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        ceiling = slices / (time.perf_counter() - start)
        sa.unpatch(sam)
        del prepared

        rows = [("model alone (ceiling)", ceiling)]
        engines = [("serial (one volume at a time)", "serial"), ("pipeline", "pipeline")]
        if args.ray:
            engines.append(("ray (local, 1 actor)", "ray"))
        reference = None
        for name, engine in engines:
            out = work / engine
            start = time.perf_counter()
            results = segment_files([inputs], out, sam=source, adapter=adapter, engine=engine, device=args.device,
                                    batch_size=args.batch_size, num_workers=args.num_workers)
            seconds = time.perf_counter() - start
            assert all(r.status == "written" for r in results), [r.message for r in results]
            labels = {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out.glob("*.nii.gz"))}
            if reference is None:
                reference = labels
            same = all(np.array_equal(labels[k], reference[k]) for k in reference)
            rows.append((f"{name}{'' if same else '  (LABELS DIFFER)'}", slices / seconds))

        print(f"\n| {'path':34s} | slices/s | of ceiling |")
        print(f"|{'-' * 36}|---------:|-----------:|")
        for name, rate in rows:
            print(f"| {name:34s} | {rate:8.1f} | {rate / ceiling:10.2f} |")
        print(f"\nsamed-adapter --help: {help_time():.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
