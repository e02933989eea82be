"""The README's main job, end to end on real data that ships with nilearn (no downloads).

Train an adapter on MNI152 grey/white matter, save it as safetensors, patch it onto a freshly
built SAM, segment held-out slices, print Dice per class, and write a picture.

    python examples/quickstart.py                         # random tiny SAM, about 30 s on a 2-core CPU
    python examples/quickstart.py --sam sam_vit_b_01ec64.pth --device cuda
    python examples/quickstart.py --backbone sam2.1_hiera_t  # a random SAM 2 (needs the sam2 package)
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path
from shlex import quote
from typing import Optional, Sequence

from .common import SubParsers, example_parser


# What --help says: the module docstring's first two paragraphs, whole sentences, wrapped.
DESCRIPTION = textwrap.fill(" ".join(" ".join(__doc__.split("\n\n")[:2]).split()), 88)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quickstart", description=DESCRIPTION,
        epilog="examples:\n  python examples/quickstart.py --out runs/quickstart\n"
               "  python examples/quickstart.py --backbone sam2.1_hiera_t   # a random SAM 2 (needs the sam2 package)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sam", help="stock SAM or SAM 2 checkpoint; without it a SAM with random weights is used")
    parser.add_argument("--backbone", default="tiny",
                        help="without --sam: the random SAM's backbone (default tiny; sam2.1_hiera_t for SAM 2); with "
                             "--sam and a SAM 2 checkpoint: its SAM 2 config name, if not read from its tensors")
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    parser.add_argument("--image-size", type=int,
                        help="default 512 with --sam, else 256 (random tiny SAM) or 128 (random SAM 2)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clicks", type=int, default=5, metavar="N",
                        help="train the adapter to take clicks too and score N rounds of simulated clicks per class "
                             "and slice on the held-out case (default 5; 0: automatic labels only)")


def random_sam_note(backbone: str, seed: int) -> str:
    """What the run says about a random SAM: that it is one, and the real weights of its family
    to pass instead (a SAM 2 run is pointed at a SAM 2 checkpoint, not at SAM's)."""
    from ..hosts.backbones import checkpoint_name

    real = checkpoint_name(backbone) or checkpoint_name("vit_b")
    return (f"RANDOM weights (a '{backbone}' model built from the stock classes, seed {seed}); pass --sam {real} "
            "to use the real model")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import samed_adapter as sa
    from .demo import MNI_CLASS_NAMES, MNI_PERCENTILES, best_constant_dice, build_mni_task
    from ..evaluation.evaluate import evaluate
    from ..volume.geometry import axis_codes
    from ..adapter_file.adapter import Adapter
    from ..io import overlay_volume, read_image
    from ..segment.outputs import OutputOptions, provenance, write_outputs
    from ..training import NiftiSlices, NiftiVolumes
    from ..training.loop import TrainConfig, train

    out = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def fresh_sam():
        if args.sam:
            from ..hosts.backbones import load_stock_sam

            sam2_config = args.backbone if "hiera" in args.backbone else None
            return load_stock_sam(args.sam, sam2_config=sam2_config).to(device)
        return sa.build_sam(args.backbone, seed=args.seed).to(device)

    if args.sam:
        print(f"SAM: {args.sam}")
    else:
        print(f"SAM: {random_sam_note(args.backbone, args.seed)}")
    sam = fresh_sam()  # before anything is written: a missing or bad --sam changes nothing
    # A random SAM 2 trains at 128: Hiera-T costs about 10x the tiny SAM per slice on a CPU.
    image_size = args.image_size or (512 if args.sam else 128 if "hiera" in args.backbone else 256)
    root = build_mni_task(out / "data")
    held_out_path = root / "imagesTr" / "mni_val.nii.gz"
    orientation = axis_codes(read_image(root / "imagesTr" / "mni_train.nii.gz").affine)
    print(f"data: MNI152 2 mm T1 from nilearn (raw 0..255), grey/white matter; train = axial slabs in "
          f"{root / 'imagesTr'}, stored {''.join(orientation)}; percentile normalisation {MNI_PERCENTILES}")

    torch.manual_seed(args.seed)
    config = sa.AdapterConfig(num_classes=2, image_size=image_size, class_names=list(MNI_CLASS_NAMES),
                              intensity_window=None, intensity_percentiles=MNI_PERCENTILES,
                              orientation=orientation, slice_axis=2, clicks=args.clicks > 0)
    model = sa.inject(sam, config)
    data = dict(window=None, percentiles=MNI_PERCENTILES, orientation=orientation, slice_axis=2)
    slices = NiftiSlices(root, ["mni_train"], **data)
    start = time.perf_counter()
    # out/run is the quick start's own scratch run: a second quick start replaces it.
    train(model, slices, TrainConfig(output_dir=str(out / "run"), batch_size=args.batch_size, max_epochs=args.epochs,
                                     stop_epoch=args.epochs, warmup_iters=10, seed=args.seed), overwrite=True)
    print(f"trained {args.epochs} epochs on {len(slices)} slices in {time.perf_counter() - start:.0f} s")
    adapter_path = model.adapter().save(out / "mni_brain.safetensors")
    print(f"adapter: {adapter_path} ({adapter_path.stat().st_size / 2**10:.0f} KiB; it records its "
          f"preprocessing and orientation)")

    sam = fresh_sam()  # a new SAM, as a user would load it, and the adapter hot-patched onto it
    model = sa.patch(sam, adapter_path)
    volumes = NiftiVolumes(root, ["mni_val"], **data)
    summary, predictions = evaluate(model, volumes, clicks=args.clicks)
    held_out = volumes[0]
    print(f"held-out slices: {held_out['image'].shape[0]} axial slices of the upper brain")
    for name, dice in zip(MNI_CLASS_NAMES, summary.class_dice):
        print(f"  Dice {name:13s} {100 * (dice or 0):6.2f} %")
    trivial = best_constant_dice(held_out["image"], held_out["label"], 2)
    print(f"  mean Dice     {100 * (summary.mean_dice or 0):6.2f} %   (best trivial predictor: {100 * trivial:.2f} %)")
    if args.clicks:
        print_clicks(summary.clicks, list(MNI_CLASS_NAMES))

    # What `samed-adapter segment` does with the raw file: the same labels, on the file's own grid,
    # with the record beside them that says samed-adapter made them (so `segment -o` that folder
    # makes them again, and `segment --continue` skips them).
    scan = read_image(held_out_path)
    options = OutputOptions(adapter_name=str(adapter_path))
    options.record = provenance(Adapter.load(adapter_path), options, allow_base_mismatch=False)
    labels, (label_path, *_) = write_outputs(model, scan, out / "labels" / "mni_val.nii.gz", options)
    if not np.array_equal(scan.to_voxels(labels), volumes.to_stored("mni_val", predictions["mni_val"])):
        raise RuntimeError("segment and evaluate disagree on the held-out scan; please report this")
    print(f"labels: {label_path} (segment on the raw file gives exactly the labels scored above)")
    truth = read_image(root / "labelsTr" / "mni_val.nii.gz").array.astype(np.int64)
    picture = overlay_volume(scan, labels, list(MNI_CLASS_NAMES), out / "quickstart.png", truth=truth, max_slices=4)
    print(f"picture: {picture} (image | truth | prediction; radiological view)")
    backbone = f"--sam {quote(args.sam)}" if args.sam else \
        f"--sam-backbone {quote(args.backbone)} --random-sam-seed {args.seed}"
    print(f"the same from the command line:\n  samed-adapter segment {backbone} --adapter {quote(str(adapter_path))} "
          f"{quote(str(held_out_path))} -o {quote(str(out / 'labels'))} --overlay")
    sa.unpatch(sam)
    return 0


def print_clicks(clicks, names: list[str]) -> None:
    """Dice after 1, 3 and 5 rounds of simulated clicks (fewer when N is smaller), per class and on average."""
    rounds = [r for r in (0, 1, 3, 5, clicks.rounds) if r <= clicks.rounds]
    rounds = list(dict.fromkeys(rounds))
    head = "".join(f"{'automatic' if r == 0 else f'{r} click' + ('s' if r > 1 else ''):>11}" for r in rounds)
    print(f"simulated clicks on the held-out case (each round: one click per class and slice where labels and "
          f"truth differ; `samed-adapter evaluate --clicks N`):\n  {'Dice %':18s}{head}")
    for k, name in enumerate(names):
        row = "".join(f"{100 * (clicks.class_dice(r)[k] or 0):11.2f}" for r in rounds)
        print(f"  {name:18s}{row}")
    print(f"  {'mean':18s}" + "".join(f"{100 * (clicks.mean_dice(r) or 0):11.2f}" for r in rounds))
    nocs = ", ".join(f"NoC@{t}: {clicks.mean_noc(t / 100):.1f}" for t in (85, 90) if clicks.mean_noc(t / 100) is not None)
    print(f"  mean clicks per class and slice to reach 85 % / 90 % Dice (at most {clicks.rounds}): {nocs}")


__all__ = ["add_arguments", "add_quickstart_parser", "build_parser", "main", "print_clicks", "random_sam_note", "run"]


def add_quickstart_parser(sub: SubParsers) -> None:
    """Declare `quickstart` and its arguments."""
    p = example_parser(
        sub, "quickstart", "train, save, patch, segment and score on the bundled MNI152 brain data",
        "example: samed-adapter quickstart --out runs/quickstart",
    )
    add_arguments(p)
    p.set_defaults(func=run)
