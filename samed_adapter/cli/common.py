"""What the commands share: their error and warning lines, a subparser with an example, the
stock SAM (--sam or a random one), the device, and where an adapter file may be written."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from ..io.printable import printable

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from segment_anything.modeling import Sam

    from ..adapter_file.adapter import Adapter

__all__ = ["DTYPES", "SubParsers", "adapter_output", "escaped", "example_parser", "fail", "parse_device",
           "segment_sam", "stock_sam", "warn"]

SubParsers = argparse._SubParsersAction  # what add_subparsers returns

# Storage dtypes by name; torch is imported only by the commands that run (fast --help).
DTYPES = ("bfloat16", "float16", "float32")


def stock_sam(checkpoint: str, sam2_config: Optional[str] = None) -> "Sam":
    from ..hosts.backbones import load_stock_sam

    return load_stock_sam(checkpoint, sam2_config=sam2_config)


def escaped(message: str) -> str:
    """`message` with the control characters of each line escaped (file and class names in it
    come from files and folders anyone can name); its own line breaks are kept."""
    return "\n".join(printable(line) for line in message.split("\n"))


def warn(command: str, message: str) -> None:
    """Print a warning for `command` on stderr."""
    print(f"samed-adapter {command}: warning: {escaped(message)}", file=sys.stderr)


def fail(command: str, message: str) -> None:
    """Print an error for `command` on stderr (the caller decides the exit code)."""
    print(f"samed-adapter {command}: error: {escaped(message)}", file=sys.stderr)


def example_parser(
    sub: SubParsers, name: str, summary: str, example: str, description: Optional[str] = None
) -> argparse.ArgumentParser:
    """A subparser whose --help ends with a usage example."""
    text = description or summary[:1].upper() + summary[1:] + "."
    return sub.add_parser(
        name, help=summary, description=textwrap.fill(text, 88), epilog=example,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the example's lines as written
    )


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths `a` and `b` name one file (symlinks followed, hard links included)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _is_adapter_file(path: Path) -> bool:
    """Whether `path` is a .safetensors file that `Adapter.save` wrote (its header says so)."""
    from safetensors import safe_open

    from ..adapter_file.adapter import FORMAT_NAME

    try:
        with safe_open(str(path), framework="pt") as file:
            return (file.metadata() or {}).get("format") == FORMAT_NAME
    except Exception:  # noqa: BLE001 - any file safetensors cannot open is no adapter
        return False


def adapter_output(path: Path, *, inputs: Sequence[str] = (), overwrite: bool = False) -> Path:
    """`path` checked as the adapter file a command is about to write, before any work.

    It must end in .safetensors (`convert a.safetensors scan.nii.gz` would replace a scan), lie
    in an existing folder, be none of `inputs`, and be either new, an adapter (replaced, as a
    newer version of itself) or `overwrite` must be given.
    """
    shown = printable(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"the output {shown} must be an adapter file ending in .safetensors")
    if path.is_dir():
        raise ValueError(f"the output {shown} is a folder; give a file path ending in .safetensors")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise ValueError(f"the output {shown} is the input {printable(source)}; write to another file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the output's folder {printable(path.parent)} does not exist; create it first")
    if path.exists() and not overwrite and not _is_adapter_file(path):
        raise FileExistsError(f"{shown} exists and is not an adapter file; it is kept (pass --overwrite to replace it)")
    return path


def segment_sam(args: argparse.Namespace, adapter: Optional["Adapter"] = None) -> "Sam":
    """The stock SAM to patch: from --sam, or random weights from --sam-backbone/--random-sam-seed."""
    from ..hosts.backbones import build_sam
    from ..surgery.structure import stock_fingerprint

    if args.sam is not None:
        if args.random_sam_seed is not None:
            raise ValueError("--random-sam-seed goes with --sam-backbone, not with --sam")
        return stock_sam(args.sam, getattr(args, "sam2_config", None))
    if args.random_sam_seed is None:
        raise ValueError(
            "--sam-backbone builds a SAM with random weights and needs --random-sam-seed N (for tests and demos "
            "only); pass --sam CKPT to segment with real SAM weights"
        )
    _check_random_backbone(args.sam_backbone, adapter)  # before a warning about weights it cannot use
    sam = build_sam(args.sam_backbone, seed=args.random_sam_seed)
    what = f"random SAM weights (backbone {args.sam_backbone}, seed {args.random_sam_seed})"
    if adapter is not None and adapter.base_fingerprint == stock_fingerprint(sam):
        warn(args.command, f"using {what}; the adapter was trained on this very SAM (its fingerprint matches), "
                            "so the labels are as good as that adapter; pass --sam CKPT to use real SAM weights")
    else:
        warn(args.command, f"using {what}: the adapter was not trained on them, so the labels are meaningless; "
                            "pass --sam CKPT for real segmentation")
    return sam


def _check_random_backbone(backbone: str, adapter: Optional["Adapter"]) -> None:
    """ValueError, worded for the command line, when `adapter` records a backbone other than the
    --sam-backbone asked for (a random SAM of another backbone cannot take it)."""
    from ..hosts.backbones import command_line_hint

    wanted = None if adapter is None else adapter.config.backbone
    if wanted is not None and wanted != backbone:
        raise ValueError(f"the adapter is for a {wanted} backbone but --sam-backbone is {printable(backbone)}; "
                         f"use {command_line_hint(wanted)}")


def parse_device(text: str) -> "torch.device":
    """--device as a torch.device that exists here and runs models (ValueError otherwise).

    torch accepts names that run nothing (`meta` holds shapes only, `cuda:7` on a one-GPU
    machine); each would fail in the middle of a run, with a traceback.
    """
    import torch

    shown = printable(text)
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {shown} is not a torch device; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cpu":
        return device
    if device.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    elif device.type in ("cuda", "xpu") and hasattr(torch, device.type):
        backend = getattr(torch, device.type)
        available = backend.is_available()
        count = backend.device_count() if available else 0
    else:  # meta, and the types of backends this library does not run on
        raise ValueError(f"--device {shown}: models do not run on {device.type!r} devices; use --device cpu or cuda")
    if not available:
        raise ValueError(f"--device {shown} but {device.type.upper()} is not available here; use --device cpu")
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {shown} but this machine has {count} {device.type.upper()} device(s), "
                         f"{device.type}:0 to {device.type}:{count - 1}")
    return device
