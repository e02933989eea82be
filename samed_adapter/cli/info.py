"""`samed-adapter info`: an adapter's config and sizes."""

from __future__ import annotations

import argparse

from ..io.printable import printable
from .common import SubParsers, example_parser


def cmd_info(args: argparse.Namespace) -> int:
    """`info`: print an adapter's config and sizes (a file or a Hub id)."""
    from ..adapter_file.adapter import Adapter, describe

    adapter = Adapter.load(args.adapter, revision=args.revision)
    print(f"file              {printable(args.adapter)}")
    # Class names come from the file: escape sequences in them are shown, never obeyed.
    print("\n".join(printable(line) for line in describe(adapter).splitlines()))
    return 0


def add_info_parser(sub: SubParsers) -> None:
    """Declare `info` and its arguments."""
    p = example_parser(
        sub, "info", "print an adapter's config, tensor count, size and fingerprint",
        "examples:\n  samed-adapter info synapse.safetensors\n  samed-adapter info org/synapse-adapter@v1",
    )
    p.add_argument("adapter", help="an adapter .safetensors file or a Hub id org/name[@revision]")
    p.add_argument("--revision", help="Hub branch, tag or commit (Hub ids only)")
    p.set_defaults(func=cmd_info)
