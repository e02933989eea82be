"""`samed-adapter` command line: a thin front over the Python API."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stock_sam(checkpoint: str):
    """Build the stock SAM a checkpoint file holds, its backbone read from the tensor shapes."""
    from .backbones import backbone_for_state_dict, build_sam
    from .checkpoints import load_state_dict_file

    backbone = backbone_for_state_dict(load_state_dict_file(checkpoint))
    return build_sam(backbone, checkpoint=checkpoint)


def _window(text: Optional[str]):
    if text is None:
        return None
    if text.lower() == "none":
        return "none"
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window takes LO,HI (e.g. -125,275) or none, got {text!r}") from None
    return (lo, hi)


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_published

    sam = _stock_sam(args.sam)
    kwargs = {}
    if args.window is not None:
        kwargs["intensity_window"] = None if args.window == "none" else args.window
    adapter = convert_published(
        args.checkpoint,
        sam,
        image_size=args.image_size,
        class_names=args.class_names.split(",") if args.class_names else None,
        **kwargs,
    )
    path = adapter.save(args.output, dtype=_DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB, {adapter.num_parameters:,} values)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .adapter import Adapter, describe

    adapter = Adapter.load(args.adapter)
    print(f"file              {args.adapter}")
    print(describe(adapter))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samed-adapter",
        description="Hot-swap SAMed adapters onto a stock Segment Anything Model.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser(
        "convert",
        help="published SAMed .pth -> adapter .safetensors",
        description="Convert a published SAMed checkpoint (either variant) into an adapter file.",
        epilog="example: samed-adapter convert epoch_159.pth synapse.safetensors --sam sam_vit_b_01ec64.pth",
    )
    convert.add_argument("checkpoint", help="the published SAMed .pth (read with weights_only=True)")
    convert.add_argument("output", help="the adapter .safetensors to write")
    convert.add_argument("--sam", required=True, help="the stock SAM checkpoint it was trained on")
    convert.add_argument("--image-size", type=int, default=512, help="input size it was trained at (default 512)")
    convert.add_argument("--class-names", help="comma-separated K names (default: Synapse organs when K = 8)")
    convert.add_argument("--window", type=_window, help="intensity window LO,HI, or none (default -125,275)")
    convert.add_argument("--dtype", choices=sorted(_DTYPES), help="store tensors as this dtype")
    convert.set_defaults(func=cmd_convert)

    info = sub.add_parser(
        "info",
        help="print an adapter's config, tensor count, size and fingerprint",
        epilog="example: samed-adapter info synapse.safetensors",
    )
    info.add_argument("adapter", help="an adapter .safetensors file")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .adapter import AdapterError
    from .checkpoints import UnsafeCheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AdapterError, UnsafeCheckpointError, FileNotFoundError, ValueError) as err:
        print(f"samed-adapter {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
