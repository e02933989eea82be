"""`samed-adapter convert`: a published SAMed checkpoint (or an adapter) -> an adapter file."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io.printable import printable
from .arguments import orientation_argument, pair_argument, window_argument
from .common import DTYPES, SubParsers, adapter_output, example_parser, stock_sam


def _setting(field: str, value: object) -> str:
    """A config value as `convert` reports it: LPS, -125,275, liver,spleen, or none."""
    if value is None:
        return "not recorded" if field == "orientation" else "none"
    if isinstance(value, (list, tuple)):
        if field == "orientation":
            return "".join(value)  # axis codes, as --orientation takes them
        return ",".join(f"{v:g}" if isinstance(v, float) else printable(v) for v in value)
    return printable(value)


def cmd_convert(args: argparse.Namespace) -> int:
    """`convert`: published SAMed .pth -> adapter .safetensors, or an adapter with new settings."""
    import dataclasses

    from ..adapter_file.adapter import Adapter
    from ..convert import convert_published

    output = adapter_output(Path(args.output), inputs=[args.checkpoint], overwrite=args.overwrite)
    kwargs: dict[str, object] = {}
    if args.window is not None and args.percentiles is not None:
        raise ValueError("--window and --percentiles exclude each other; give one")
    if args.window is not None:
        kwargs["intensity_window"] = args.window.bounds  # none: the adapter records no preprocessing
    if args.percentiles is not None:
        kwargs.update(intensity_window=None, intensity_percentiles=args.percentiles)
    if args.orientation is not None:
        kwargs["orientation"] = args.orientation
    if args.slice_axis is not None:
        kwargs["slice_axis"] = args.slice_axis
    if args.class_names:
        kwargs["class_names"] = args.class_names.split(",")
    if args.checkpoint.lower().endswith(".safetensors"):  # an adapter: rewrite its settings
        adapter = Adapter.load(args.checkpoint)
        config = dataclasses.replace(adapter.config, **kwargs)
        # A recorded setting replaced is said, old -> new: an orientation or window changed by a
        # flag changes every label the adapter gives.
        for field in kwargs:
            old, new = getattr(adapter.config, field), getattr(config, field)
            if old != new:
                print(f"{field}: {_setting(field, old)} -> {_setting(field, new)}")
        adapter = Adapter(config, adapter.tensors, adapter.base_fingerprint)
    else:
        if args.sam is None:
            raise ValueError("converting a published .pth needs --sam, the stock SAM checkpoint it was trained on")
        percentiles = kwargs.pop("intensity_percentiles", None)
        adapter = convert_published(args.checkpoint, stock_sam(args.sam), image_size=args.image_size, **kwargs)
        if percentiles is not None:
            config = dataclasses.replace(adapter.config, intensity_percentiles=percentiles)
            adapter = Adapter(config, adapter.tensors, adapter.base_fingerprint)
    import torch

    path = adapter.save(output, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"wrote {printable(path)} ({path.stat().st_size / 2**20:.2f} MiB, {adapter.num_parameters:,} values)")
    return 0


def add_convert_parser(sub: SubParsers) -> None:
    """Declare `convert` and its arguments."""
    p = example_parser(
        sub, "convert", "published SAMed .pth -> adapter .safetensors (or new settings for an adapter)",
        "examples:\n"
        "  samed-adapter convert epoch_159.pth synapse.safetensors --sam sam_vit_b_01ec64.pth\n"
        "  samed-adapter convert old.safetensors new.safetensors --orientation LPS   # record the orientation",
        "Convert a published SAMed checkpoint (either variant) into an adapter file. Given an adapter "
        ".safetensors instead, write a copy with the settings given (orientation, preprocessing, class names).",
    )
    p.add_argument("checkpoint", help="the published SAMed .pth (read with weights_only=True), or an adapter")
    p.add_argument("output", help="the adapter .safetensors to write (an existing adapter file is replaced)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT even if it exists and is not an adapter file (never the input)")
    p.add_argument("--sam", help="the stock SAM checkpoint it was trained on (needed for a .pth)")
    p.add_argument("--image-size", type=int, default=512, help="input size it was trained at (default 512)")
    p.add_argument("--class-names", help="comma-separated K names (default: Synapse organs when K = 8)")
    p.add_argument("--window", type=window_argument, help="intensity window LO,HI, or none (default -125,275)")
    p.add_argument("--percentiles", type=pair_argument, metavar="LO,HI", help="MR percentile normalisation instead")
    p.add_argument("--orientation", type=orientation_argument, metavar="CODES",
                   help="axis codes the training volumes were cut in, e.g. LPS (default: not recorded, as stored)")
    p.add_argument("--slice-axis", type=int, choices=[0, 1, 2], help="the axis slices were cut along (default 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="store tensors as this dtype")
    p.set_defaults(func=cmd_convert)
