"""`samed-adapter evaluate`: Dice and HD95 tables of an adapter on a labelled data set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io.files import atomic_path
from ..io.printable import printable
from ..version import __version__
from .arguments import pair_argument, window_argument
from .common import SubParsers, escaped, example_parser, parse_device, segment_sam, warn

EVALUATION_TABLES = ("evaluation.md", "evaluation.csv", "summary.json", "clicks.csv")
EVALUATION_RECORD = ".samed-adapter-evaluation.json"


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`evaluate`: per-class, per-case Dice and HD95 tables (Markdown and CSV); with --clicks N,
    Dice after each of N rounds of simulated clicks and NoC@85/90 as well (clicks.csv)."""
    from ..adapter_file.adapter import Adapter
    from ..evaluation.evaluate import evaluate
    from ..interactive.prompts import require_clicks
    from ..patching import patch
    from ..training.data import SYNAPSE_LABEL_MAP, NiftiVolumes, SynapseVolumes

    # Every option is checked before the SAM is built and the volumes read: a bad one found after
    # evaluating everything would lose the whole run.
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"-o {printable(out)} is a file; give the folder for evaluation.md, evaluation.csv "
                              "and summary.json")
    # summary.json has nnU-Net's shape and name: an nnU-Net validation folder holds one. Tables
    # with our record beside them are ours to replace; any other is kept unless --overwrite.
    record = out / EVALUATION_RECORD
    ours = record.exists()
    theirs = [name for name in EVALUATION_TABLES if (out / name).exists()] if not ours else []
    if theirs and not args.overwrite:
        raise FileExistsError(f"{printable(out / theirs[0])} exists and samed-adapter did not write it; it is kept: "
                              "choose another -o, or pass --overwrite to replace it")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.clicks < 0:
        raise ValueError(f"--clicks must be a number of rounds >= 0, got {args.clicks}")
    if args.clicks and args.protocol != "default":
        raise ValueError("--clicks scores under --protocol default (a click session's labels are segment's, not the "
                         "published 224 round trip); drop --protocol samed")
    if args.window is not None and args.percentiles is not None:
        raise ValueError("--window and --percentiles exclude each other; give one")
    if args.format == "synapse" and (args.window is not None or args.percentiles is not None):
        raise ValueError("--window and --percentiles apply to --format nifti; the Synapse .h5 volumes are "
                         "already preprocessed (in [0, 1])")
    device = parse_device(args.device)
    adapter = Adapter.load(args.adapter)
    if args.clicks:
        require_clicks(adapter.config, printable(args.adapter))
    if args.window is not None or args.percentiles is not None:
        from ..volume.preprocessing import Intensity

        try:
            Intensity.from_config(adapter.config, None if args.window is None else args.window.bounds,
                                  args.percentiles)
        except ValueError as err:
            raise ValueError(f"{'--percentiles' if args.percentiles is not None else '--window'}: {err}") from None
    model = patch(segment_sam(args, adapter).to(device), adapter, allow_base_mismatch=args.allow_base_mismatch)
    config = model.config
    if args.format == "synapse":
        volumes = SynapseVolumes(args.data)
    else:
        if args.window is None and args.percentiles is None:  # the adapter's own preprocessing
            window, percentiles = config.intensity_window, config.intensity_percentiles
        else:
            window = None if args.window is None else args.window.bounds  # none: volumes as stored
            percentiles = args.percentiles
        if config.orientation is None:
            warn("evaluate", "the adapter records no orientation: volumes are cut as stored")
        volumes = NiftiVolumes(args.data, args.cases.split(",") if args.cases else None,
                               window=window, percentiles=percentiles,
                               label_map=SYNAPSE_LABEL_MAP if args.label_map == "synapse" else None,
                               orientation=config.orientation, slice_axis=config.slice_axis)
    summary, _ = evaluate(model, volumes, protocol=args.protocol, batch_size=args.batch_size, progress=True,
                          clicks=args.clicks)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"adapter_fingerprint": adapter.fingerprint, "version": __version__}) + "\n")
    with atomic_path(out / "evaluation.md") as tmp:  # never half a table where a whole one was
        tmp.write_text(summary.to_markdown())
    with atomic_path(out / "evaluation.csv") as tmp:
        summary.to_csv(tmp)
    summary.to_json(out / "summary.json")  # atomic itself
    tables = [out / "evaluation.md", out / "evaluation.csv", out / "summary.json"]
    if summary.clicks is not None:
        with atomic_path(out / "clicks.csv") as tmp:
            summary.clicks.to_csv(tmp)
        tables.append(out / "clicks.csv")
    elif ours and (out / "clicks.csv").exists():  # a --clicks run's of ours, which these tables no longer match
        (out / "clicks.csv").unlink()
    print(escaped(summary.to_markdown()))  # class names from the adapter, shown escaped (the files keep them)
    print(f"tables: {', '.join(str(t) for t in tables)} (summary.json in nnU-Net's shape)")
    return 0


def add_evaluate_parser(sub: SubParsers) -> None:
    p = example_parser(
        sub, "evaluate", "score an adapter on labelled volumes (Dice, HD95)",
        "example: samed-adapter evaluate --sam sam_vit_b_01ec64.pth --adapter synapse.safetensors \\\n"
        "             --data Synapse --format synapse --protocol samed -o eval/",
        description="Segment every labelled volume and write per-class, per-case Dice and HD95 tables. "
                    "--protocol samed reproduces the published evaluation (224 round trip, HD95 in voxels, "
                    "empty-class rules); the default uses the voxel spacing (HD95 in mm) and reports cases "
                    "without a class apart.",
    )
    p.add_argument("--adapter", required=True, help="adapter file or Hub id")
    p.add_argument("--sam", help="stock SAM (or SAM 2) checkpoint")
    p.add_argument("--sam2-config", metavar="NAME",
                   help="with --sam: the SAM 2 backbone the checkpoint holds (default: read from its tensors)")
    p.add_argument("--sam-backbone", default="vit_b", help="with --random-sam-seed: a random SAM (tests only)")
    p.add_argument("--random-sam-seed", type=int, help="seed of random SAM weights (tests only)")
    p.add_argument("--data", required=True, help="imagesTr/labelsTr folder, or the Synapse root (test_vol_h5)")
    p.add_argument("--format", choices=["nifti", "synapse"], default="nifti")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--protocol", choices=["default", "samed"], default="default")
    p.add_argument("--window", type=window_argument, help="LO,HI or none (default: the adapter's preprocessing)")
    p.add_argument("--percentiles", type=pair_argument, help="MR: per-volume percentile normalisation LO,HI "
                                                     "(default: the adapter's preprocessing)")
    p.add_argument("--label-map", choices=["synapse"], help="remap raw labels (synapse: 1,2,3,4,6,7,8,11 -> 1..8)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="apply the adapter even if it was made for other stock SAM weights")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clicks", type=int, default=0, metavar="N",
                   help="also run N rounds of simulated clicks per case (a click-trained adapter, see train --clicks): "
                        "Dice after each round and NoC@85/90 in evaluation.md, clicks.csv and summary.json")
    p.add_argument("-o", "--output", default=".", help="folder for evaluation.md, evaluation.csv and summary.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace tables in -o that samed-adapter did not write (e.g. nnU-Net's summary.json)")
    p.set_defaults(func=cmd_evaluate)
