"""`samed-adapter` command line: a thin front over the Python API.

Each subcommand has one `add_<name>_parser(sub)` function that declares its arguments and sets
`func` to its `cmd_<name>(args) -> int`; `build_parser` calls them in order, so adding a command
is one more pair. Exit codes: 0 success, 1 some `segment` inputs failed (the others were
written), 2 an error that stopped the command (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

try:  # a Ctrl-C while these load (numpy, PIL: a second on a busy machine) is one line too, as in main()
    from ..io.files import atomic_path
    from ..io.printable import printable
    from ..version import __version__
    from ..volume.preprocessing import WindowChoice
    from .arguments import orientation_argument, pair_argument, window_argument
except KeyboardInterrupt:  # pragma: no cover - a matter of timing
    print("samed-adapter: interrupted (Ctrl-C)", file=sys.stderr)
    raise SystemExit(130) from None

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from segment_anything.modeling import Sam

    from ..adapter_file.adapter import Adapter

_SubParsers = argparse._SubParsersAction  # what add_subparsers returns

# Storage dtypes by name; torch is imported only by the commands that run (fast --help).
_DTYPES = ("bfloat16", "float16", "float32")


def _stock_sam(checkpoint: str, sam2_config: Optional[str] = None) -> "Sam":
    from ..hosts.backbones import load_stock_sam

    return load_stock_sam(checkpoint, sam2_config=sam2_config)


def _shown(message: str) -> str:
    """`message` with the control characters of each line escaped (file and class names in it
    come from files and folders anyone can name); its own line breaks are kept."""
    return "\n".join(printable(line) for line in message.split("\n"))


def _warn(command: str, message: str) -> None:
    """Print a warning for `command` on stderr."""
    print(f"samed-adapter {command}: warning: {_shown(message)}", file=sys.stderr)


def _fail(command: str, message: str) -> None:
    """Print an error for `command` on stderr (the caller decides the exit code)."""
    print(f"samed-adapter {command}: error: {_shown(message)}", file=sys.stderr)


def _example_parser(
    sub: _SubParsers, name: str, summary: str, example: str, description: Optional[str] = None
) -> argparse.ArgumentParser:
    """A subparser whose --help ends with a usage example."""
    text = description or summary[:1].upper() + summary[1:] + "."
    return sub.add_parser(
        name, help=summary, description=textwrap.fill(text, 88), epilog=example,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the example's lines as written
    )


# --------------------------------------------------------------------------- convert


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


def _adapter_output(path: Path, *, inputs: Sequence[str] = (), overwrite: bool = False) -> Path:
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

    output = _adapter_output(Path(args.output), inputs=[args.checkpoint], overwrite=args.overwrite)
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
        adapter = convert_published(args.checkpoint, _stock_sam(args.sam), image_size=args.image_size, **kwargs)
        if percentiles is not None:
            config = dataclasses.replace(adapter.config, intensity_percentiles=percentiles)
            adapter = Adapter(config, adapter.tensors, adapter.base_fingerprint)
    import torch

    path = adapter.save(output, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"wrote {printable(path)} ({path.stat().st_size / 2**20:.2f} MiB, {adapter.num_parameters:,} values)")
    return 0


def add_convert_parser(sub: _SubParsers) -> None:
    """Declare `convert` and its arguments."""
    p = _example_parser(
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
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="store tensors as this dtype")
    p.set_defaults(func=cmd_convert)


# --------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    """`info`: print an adapter's config and sizes (a file or a Hub id)."""
    from ..adapter_file.adapter import Adapter, describe

    adapter = Adapter.load(args.adapter, revision=args.revision)
    print(f"file              {printable(args.adapter)}")
    # Class names come from the file: escape sequences in them are shown, never obeyed.
    print("\n".join(printable(line) for line in describe(adapter).splitlines()))
    return 0


def add_info_parser(sub: _SubParsers) -> None:
    """Declare `info` and its arguments."""
    p = _example_parser(
        sub, "info", "print an adapter's config, tensor count, size and fingerprint",
        "examples:\n  samed-adapter info synapse.safetensors\n  samed-adapter info org/synapse-adapter@v1",
    )
    p.add_argument("adapter", help="an adapter .safetensors file or a Hub id org/name[@revision]")
    p.add_argument("--revision", help="Hub branch, tag or commit (Hub ids only)")
    p.set_defaults(func=cmd_info)


# --------------------------------------------------------------------------- segment


def _segment_sam(args: argparse.Namespace, adapter: Optional["Adapter"] = None) -> "Sam":
    """The stock SAM to patch: from --sam, or random weights from --sam-backbone/--random-sam-seed."""
    from ..hosts.backbones import build_sam
    from ..surgery.structure import stock_fingerprint

    if args.sam is not None:
        if args.random_sam_seed is not None:
            raise ValueError("--random-sam-seed goes with --sam-backbone, not with --sam")
        return _stock_sam(args.sam, getattr(args, "sam2_config", None))
    if args.random_sam_seed is None:
        raise ValueError(
            "--sam-backbone builds a SAM with random weights and needs --random-sam-seed N (for tests and demos "
            "only); pass --sam CKPT to segment with real SAM weights"
        )
    _check_random_backbone(args.sam_backbone, adapter)  # before a warning about weights it cannot use
    sam = build_sam(args.sam_backbone, seed=args.random_sam_seed)
    what = f"random SAM weights (backbone {args.sam_backbone}, seed {args.random_sam_seed})"
    if adapter is not None and adapter.base_fingerprint == stock_fingerprint(sam):
        _warn(args.command, f"using {what}; the adapter was trained on this very SAM (its fingerprint matches), "
                            "so the labels are as good as that adapter; pass --sam CKPT to use real SAM weights")
    else:
        _warn(args.command, f"using {what}: the adapter was not trained on them, so the labels are meaningless; "
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


def _device(text: str) -> "torch.device":
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


def _window_options(choice: Optional[WindowChoice]) -> dict[str, object]:
    """`OutputOptions`' window and preprocessed for ``--window`` (not given: the adapter's own)."""
    if choice is None:
        return {}
    return {"window": choice.bounds, "preprocessed": choice.preprocessed}


def cmd_segment(args: argparse.Namespace) -> int:
    """`segment`: labels (and the outputs asked for) for each input; 1 if some inputs failed."""
    from tqdm import tqdm

    from ..adapter_file.adapter import Adapter, BaseMismatchError
    from ..segment.pipeline import SamSource, check_request, check_run, segment_files
    from .dicomweb import check_arguments as check_dicomweb, run as run_dicomweb

    remote_study = check_dicomweb(args)  # --dicomweb: checked now, run once the SAM and adapter are set up
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_run(num_workers=args.num_workers, num_parts=args.num_parts, part_id=args.part_id)
    if args.ray_workers < 1 or args.gpus_per_worker < 0:
        raise ValueError("--ray-workers must be at least 1 and --gpus-per-worker at least 0")
    if args.ray and args.gpus_per_worker > 0 and args.device == "cpu":
        args.device = "cuda"  # a GPU reserved per actor is a GPU to run on
    client = None
    if args.server is not None:
        from ..serve.client import ServerClient

        if args.sam is not None or args.sam_backbone is not None or args.ray:
            raise ValueError("--server segments on the server, which holds the SAM: drop --sam, --sam-backbone and "
                             "--ray")
        client = ServerClient(args.server, args.token)
        adapter = client.adapter(args.adapter)
    else:
        if args.sam is None and args.sam_backbone is None:
            raise ValueError("give the stock SAM with --sam CKPT (or --sam-backbone NAME --random-sam-seed N for "
                             "demos), or segment on a server with --server URL")
        if not (args.ray and args.ray_address):  # a cluster's workers may have GPUs the driver lacks
            _device(args.device)
        adapter = Adapter.load(args.adapter, revision=args.revision)
    request = dict(
        output_types=args.output_type, classes=args.classes, statistics=args.statistics, split=args.split,
        save_probabilities=args.save_probabilities, overlay=args.overlay, batch_size=args.batch_size,
        percentiles=args.percentiles, adapter_name=args.adapter, max_voxels=args.max_voxels,
        **_window_options(args.window),
    )
    check_request(adapter, args.inputs, **request)  # every request is checked before any model work
    source = None  # a server holds its own SAM
    if client is None and args.sam is not None:
        if args.random_sam_seed is not None:
            raise ValueError("--random-sam-seed goes with --sam-backbone, not with --sam")
        source = SamSource(checkpoint=args.sam, sam2_config=args.sam2_config)
    elif client is None:  # checks the flags and says what the random SAM means for this adapter
        source = SamSource(_segment_sam(args, adapter), backbone=args.sam_backbone, seed=args.random_sam_seed)
    if remote_study:
        return run_dicomweb(args, sam=source, adapter=adapter, request=request)
    bar = tqdm(desc="segment", unit="input", disable=None)
    counts = {"written": 0, "skipped": 0, "failed": 0, "ignored": 0, "redone": 0}
    planned = {"inputs": 0}

    def plan(n: int) -> None:
        planned["inputs"] = n
        bar.reset(total=n)

    def show(result) -> None:
        counts[result.status] += 1
        counts["redone"] += result.redone
        if result.status == "ignored":
            bar.write(f"samed-adapter segment: note: not segmented: {_shown(result.message)}", file=sys.stderr)
            return
        if result.status == "failed":
            bar.write(f"samed-adapter segment: error: {_shown(result.message)} (skipped; continuing with the other "
                      "inputs)", file=sys.stderr)
            bar.update(1)
            return
        for line in result.message.splitlines() if result.status == "written" else []:
            bar.write(f"samed-adapter segment: warning: {_shown(line)}", file=sys.stderr)
        shown = [printable(f) for f in result.files if not f.name.endswith(".samed-adapter.json")]  # the record: hidden
        what = "skipped, outputs exist" if result.status == "skipped" else ", ".join(shown)
        bar.write(f"{printable(result.name)} -> {what}")
        bar.update(1)

    try:
        segment_files(
            args.inputs, args.output, sam=source, adapter=adapter, device=args.device, merge=args.merge,
            **({"allow_base_mismatch": args.allow_base_mismatch} if client is None else {}),
            engine="ray" if args.ray else args.engine,
            num_workers=args.num_workers, skip_existing=args.continue_, overwrite=args.overwrite,
            num_parts=args.num_parts,
            part_id=args.part_id, ray_address=args.ray_address, ray_workers=args.ray_workers,
            gpus_per_worker=args.gpus_per_worker, on_result=show, on_plan=plan,
            **({} if client is None else {"runner": client.runner(adapter, args.server_inputs),
                                          "allow_base_mismatch": client.allow_base_mismatch}), **request,
        )
    except KeyboardInterrupt:
        bar.close()
        _fail("segment", _interrupted(counts, planned["inputs"], args.output))
        return 130
    except BaseMismatchError as err:
        if args.sam is None:  # the wording stays the command line's (err.command_line); only the hint is added
            err.command_line = (f"{getattr(err, 'command_line', None) or err}; a random SAM matches an adapter made "
                                "on the same backbone and seed")
        raise
    finally:
        bar.close()
    total = counts["written"] + counts["skipped"] + counts["failed"]
    parts = [f"{counts['skipped']} skipped (outputs existed)"] if counts["skipped"] else []
    parts += [f"{counts['failed']} failed"] if counts["failed"] else []
    parts += [f"{counts['redone']} made again (made by another adapter or with other options)"] \
        if counts["redone"] else []
    parts += [f"{counts['ignored']} file(s) not segmented (listed above)"] if counts["ignored"] else []
    print(f"segmented {counts['written']} of {total} inputs into {args.output}" + "".join(f", {p}" for p in parts))
    return 1 if counts["failed"] else 0


def _interrupted(counts: dict[str, int], planned: int, output: str) -> str:
    """What a Ctrl-C during `segment` left: how many inputs were done of how many, and what next."""
    done = counts["written"] + counts["skipped"] + counts["failed"]
    # Outputs appear atomically and writes under way are finished, so what exists is complete.
    complete = f"every file in {output} is complete (none is left half written)"
    if planned and done >= planned:
        return f"interrupted after all {planned} inputs were done ({_tally(counts)}); {complete}"
    what = f"{done} of {planned} inputs done ({_tally(counts)})" if planned else "before any input was segmented"
    return f"interrupted with {what}; {complete}; run the same command with --continue to do the rest"


def _tally(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in ("written", "skipped", "failed") if counts[k]) or "none written"


def add_segment_parser(sub: _SubParsers) -> None:
    """Declare `segment` and its arguments."""
    p = _example_parser(
        sub, "segment", "segment images with a stock SAM patched by an adapter",
        "examples:\n"
        "  samed-adapter segment --sam sam_vit_b_01ec64.pth --adapter synapse.safetensors ct1.nii.gz ct2.nii.gz -o labels/\n"
        "  samed-adapter segment --sam sam_vit_b_01ec64.pth --adapter org/synapse-adapter dicom_series/ -o labels/ --overlay\n"
        "  samed-adapter segment ... ct.nii.gz -o out/ --statistics --split --classes liver,spleen\n"
        "  # without real weights: the quick start's adapter, trained on a random tiny SAM (seed 0)\n"
        "  samed-adapter quickstart --out runs/quickstart\n"
        "  samed-adapter segment --sam-backbone tiny --random-sam-seed 0 \\\n"
        "      --adapter runs/quickstart/mni_brain.safetensors runs/quickstart/data/imagesTr/mni_val.nii.gz -o out/",
        "Segment NIfTI volumes, DICOM series folders, and 2-D PNG/NPY images. Each volume is reoriented to the "
        "orientation the adapter was trained on (axis permutations and flips, never a resampling), scaled with "
        "the adapter's intensity preprocessing, and its labels are written on the input's own voxel grid: NIfTI "
        "and DICOM inputs give NIfTI labels with the input's geometry (one file per series for a folder holding "
        "several); PNG gives PNG and NPY gives NPY, named like the input inside OUTDIR. An input that cannot be "
        "read is reported and skipped; the exit code is then 1.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",  # none with --dicomweb (checked in cmd_segment)
                   help="NIfTI files, DICOM series folders, .png or .npy images, or folders to search")
    p.add_argument("-o", "--output", metavar="OUTDIR",
                   help="folder for the label files (required, except with --dicomweb ... --store)")
    p.add_argument("--adapter", required=True, metavar="FILE_OR_REPO",
                   help="an adapter .safetensors file or a Hub id org/name[@revision]")
    p.add_argument("--revision", help="Hub branch, tag or commit of --adapter (Hub ids only)")
    base = p.add_mutually_exclusive_group()  # one of them, or --server
    base.add_argument("--sam", metavar="CKPT", help="the stock SAM (or SAM 2) checkpoint the adapter was made for")
    base.add_argument("--sam-backbone", metavar="NAME",
                      help="build a SAM with RANDOM weights of this backbone (e.g. tiny, sam2.1_hiera_t), for tests "
                           "and demos; needs --random-sam-seed")
    p.add_argument("--sam2-config", metavar="NAME",
                   help="with --sam: the SAM 2 backbone the checkpoint holds (e.g. sam2.1_hiera_t); default: read "
                        "from its tensors")
    p.add_argument("--random-sam-seed", type=int, metavar="N", help="seed of the random SAM of --sam-backbone")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="slices per forward pass, packed across volumes (default 8)")
    p.add_argument("--window", type=window_argument, metavar="LO,HI",
                   help="CT window replacing the adapter's intensity preprocessing (none: inputs already in [0, 1])")
    p.add_argument("--percentiles", type=pair_argument, metavar="LO,HI",
                   help="MR percentile normalisation replacing the adapter's, e.g. 0.5,99.5")
    out = p.add_argument_group("outputs (beside each label file <name>.nii.gz)")
    out.add_argument("--output-type", default="nifti", metavar="TYPE",
                     help="nifti (default), dicom-seg (a DICOM Segmentation <name>_seg.dcm over the source series; "
                          "DICOM inputs only), dicom-rtstruct (a DICOM RT Structure Set <name>_rtstruct.dcm, one "
                          "contoured ROI per class; DICOM inputs only), or several: nifti,dicom-seg,dicom-rtstruct")
    out.add_argument("--classes", metavar="NAMES", help="comma-separated class names to keep, e.g. liver,spleen "
                                                        "(the others become background in every output)")
    out.add_argument("--statistics", action="store_true",
                     help="also write <name>_statistics.json: per class voxels, volume (mm3), intensity mean/std "
                          "and bounding box")
    out.add_argument("--split", action="store_true", help="also write <name>/<class>.nii.gz, one binary mask per class")
    out.add_argument("--save-probabilities", action="store_true",
                     help="also write <name>.npz: the softmax of every class, float16, on the label file's grid")
    out.add_argument("--overlay", action="store_true",
                     help="also write <name>_overlay.png, a montage of axial slices in the radiological view")
    p.add_argument("--merge", action="store_true", help="fold the LoRA into the encoder weights (faster)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="apply the adapter even if it was made for other stock SAM weights")
    run = p.add_argument_group("archives (folders are searched recursively; outputs mirror their structure)")
    run.add_argument("--continue", dest="continue_", action="store_true",
                     help="skip inputs whose outputs all exist (outputs are written atomically: an existing file "
                          "is complete)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace files at output paths that samed-adapter did not write (default: such an "
                          "input fails and the file is kept; outputs of earlier runs are made again either way)")
    p.add_argument("--max-voxels", type=int, metavar="N",
                   help="refuse inputs holding more voxels than this, checked from their headers before reading "
                        "(default 2**30, about 1 G: four times a 1024 x 1024 x 1000 CT)")
    run.add_argument("--num-parts", type=int, default=1, metavar="N", help="split the sorted inputs into N parts ...")
    run.add_argument("--part-id", type=int, default=0, metavar="I", help="... and segment part I (0..N-1) here")
    run.add_argument("--num-workers", type=int, metavar="N",
                     help="threads reading and writing in the background (default: the cores but one, at most 8)")
    run.add_argument("--engine", choices=["pipeline", "serial"], default="pipeline",
                     help="pipeline (default: reads and writes overlap the model, slices of several volumes share "
                          "a batch) or serial (one volume after the other)")
    run.add_argument("--ray", action="store_true",
                     help="run on Ray Data: local Ray started inside the command, or --ray-address "
                          "(pip install samed-adapter[ray])")
    run.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster, e.g. ray://head:10001 or auto")
    run.add_argument("--ray-workers", type=int, default=1, metavar="N",
                     help="model actors, each with its own patched SAM (default 1)")
    run.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G", help="GPUs per model actor (default 0)")
    remote = p.add_argument_group("on a server (samed-adapter serve): the same outputs, no model loaded here")
    remote.add_argument("--server", metavar="URL",
                        help="send each input to this server, e.g. http://127.0.0.1:8000; --adapter then names one of "
                             "the server's adapters")
    remote.add_argument("--token", metavar="T",
                        help="the server's bearer token (default: the SAMED_SERVE_TOKEN environment variable)")
    remote.add_argument("--server-inputs", type=int, default=2, metavar="N",
                        help="inputs sent at once, so the server's batches fill (default 2)")
    from .dicomweb import add_arguments as add_dicomweb_arguments

    add_dicomweb_arguments(p)
    p.set_defaults(func=cmd_segment)


# --------------------------------------------------------------------------- push / pull


def cmd_push(args: argparse.Namespace) -> int:
    """`push`: upload an adapter file and its model card to the Hub."""
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub import push_to_hub

    evaluation = None
    if args.evaluation is not None:
        path = Path(args.evaluation)
        if not path.is_file():
            raise FileNotFoundError(f"no evaluation file at {path}; give a Markdown file (e.g. from `evaluate`)")
        evaluation = path.read_text(encoding="utf-8")
    try:
        info = push_to_hub(
            args.adapter, args.repo_id, token=args.token, private=args.private, revision=args.revision,
            commit_message=args.commit_message, create_pr=args.create_pr, evaluation=evaluation,
            base_model=args.base_model,
        )
    except HfHubHTTPError as err:
        _fail("push", f"{err}\ncheck that you are logged in (`hf auth login`, or --token) with write access to "
                      f"{args.repo_id}")
        return 2
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info
    print(f"pushed {printable(args.adapter)} to {args.repo_id}: {url}")
    return 0


def add_push_parser(sub: _SubParsers) -> None:
    """Declare `push` and its arguments."""
    p = _example_parser(
        sub, "push", "upload an adapter and its model card to the Hugging Face Hub",
        "examples:\n  samed-adapter push synapse.safetensors my-org/samed-synapse --private\n"
        "  samed-adapter push synapse.safetensors my-org/samed-synapse --revision v2 --evaluation results.md",
    )
    p.add_argument("adapter", help="the adapter .safetensors file")
    p.add_argument("repo_id", help="the Hub model repository, org/name (created if missing)")
    p.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    p.add_argument("--revision", help="branch to commit to (created if missing)")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--token", help="Hub token with write access (default: saved login or HF_TOKEN)")
    p.add_argument("--evaluation", metavar="FILE.md", help="Markdown with evaluation results for the model card")
    p.add_argument("--base-model", help="stock SAM: Hub id or checkpoint name (default: from the backbone)")
    p.set_defaults(func=cmd_push)


def cmd_pull(args: argparse.Namespace) -> int:
    """`pull`: fetch a Hub adapter into the cache; print its path or copy it to -o."""
    from ..adapter_file.adapter import Adapter
    from ..hub import hf_hub_adapter_path, parse_repo_id

    repo, _ = parse_repo_id(args.repo_id, args.revision)
    target = None
    if args.output is not None:  # checked before the download
        target = Path(args.output)
        # A trailing slash or an existing folder means a folder (made if missing), else the file to write.
        if args.output.endswith(("/", os.sep)) or target.is_dir():
            if target.exists() and not target.is_dir():
                raise FileExistsError(f"-o {printable(args.output)} names a folder, but {printable(target)} is a file")
            target = target / f"{repo.split('/')[1]}.safetensors"
            if target.parent.is_dir():
                _adapter_output(target, overwrite=args.overwrite)
        else:
            _adapter_output(target, overwrite=args.overwrite)
    cached = hf_hub_adapter_path(args.repo_id, revision=args.revision, cache_dir=args.cache_dir, token=args.token)
    adapter = Adapter.load(cached)  # check it is a valid adapter before handing it out
    if target is None:
        print(printable(cached))
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    _adapter_output(target, overwrite=args.overwrite)
    with atomic_path(target) as tmp:
        shutil.copyfile(cached, tmp)
    print(f"wrote {printable(target)} ({adapter.config.num_classes} classes, {adapter.nbytes / 2**20:.2f} MiB)")
    return 0


def add_pull_parser(sub: _SubParsers) -> None:
    """Declare `pull` and its arguments."""
    p = _example_parser(
        sub, "pull", "download an adapter from the Hub into the cache (for offline use)",
        "examples:\n  samed-adapter pull my-org/samed-synapse          # prints the cached file's path\n"
        "  samed-adapter pull my-org/samed-synapse@v2 -o synapse.safetensors",
    )
    p.add_argument("repo_id", help="the Hub id, org/name[@revision]")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--cache-dir", help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    p.add_argument("--token", help="Hub token for private or gated repositories")
    p.add_argument("-o", "--output", metavar="PATH",
                   help="also copy the adapter here: a folder if PATH ends with / or is one (made if missing; the "
                        "file is NAME.safetensors), else the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace -o's file even if it is not an adapter file")
    p.set_defaults(func=cmd_pull)


# --------------------------------------------------------------------------- main


# --------------------------------------------------------------------------- evaluate


EVALUATION_TABLES = ("evaluation.md", "evaluation.csv", "summary.json")
EVALUATION_RECORD = ".samed-adapter-evaluation.json"


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`evaluate`: per-class, per-case Dice and HD95 tables (Markdown and CSV)."""
    from ..adapter_file.adapter import Adapter
    from ..evaluation.evaluate import evaluate
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
    theirs = [name for name in EVALUATION_TABLES if (out / name).exists()] if not record.exists() else []
    if theirs and not args.overwrite:
        raise FileExistsError(f"{printable(out / theirs[0])} exists and samed-adapter did not write it; it is kept: "
                              "choose another -o, or pass --overwrite to replace it")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.window is not None and args.percentiles is not None:
        raise ValueError("--window and --percentiles exclude each other; give one")
    if args.format == "synapse" and (args.window is not None or args.percentiles is not None):
        raise ValueError("--window and --percentiles apply to --format nifti; the Synapse .h5 volumes are "
                         "already preprocessed (in [0, 1])")
    device = _device(args.device)
    adapter = Adapter.load(args.adapter)
    if args.window is not None or args.percentiles is not None:
        from ..volume.preprocessing import Intensity

        try:
            Intensity.from_config(adapter.config, None if args.window is None else args.window.bounds,
                                  args.percentiles)
        except ValueError as err:
            raise ValueError(f"{'--percentiles' if args.percentiles is not None else '--window'}: {err}") from None
    model = patch(_segment_sam(args, adapter).to(device), adapter, allow_base_mismatch=args.allow_base_mismatch)
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
            _warn("evaluate", "the adapter records no orientation: volumes are cut as stored")
        volumes = NiftiVolumes(args.data, args.cases.split(",") if args.cases else None,
                               window=window, percentiles=percentiles,
                               label_map=SYNAPSE_LABEL_MAP if args.label_map == "synapse" else None,
                               orientation=config.orientation, slice_axis=config.slice_axis)
    summary, _ = evaluate(model, volumes, protocol=args.protocol, batch_size=args.batch_size, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"adapter_fingerprint": adapter.fingerprint, "version": __version__}) + "\n")
    with atomic_path(out / "evaluation.md") as tmp:  # never half a table where a whole one was
        tmp.write_text(summary.to_markdown())
    with atomic_path(out / "evaluation.csv") as tmp:
        summary.to_csv(tmp)
    summary.to_json(out / "summary.json")  # atomic itself
    print(_shown(summary.to_markdown()))  # class names from the adapter, shown escaped (the files keep them)
    print(f"tables: {out / 'evaluation.md'}, {out / 'evaluation.csv'}, {out / 'summary.json'} (nnU-Net's shape)")
    return 0


def add_evaluate_parser(sub: _SubParsers) -> None:
    p = _example_parser(
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
    p.add_argument("-o", "--output", default=".", help="folder for evaluation.md, evaluation.csv and summary.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace tables in -o that samed-adapter did not write (e.g. nnU-Net's summary.json)")
    p.set_defaults(func=cmd_evaluate)


# --------------------------------------------------------------------------- train, quickstart


def add_train_parser(sub: _SubParsers) -> None:
    from .train import add_arguments, run

    p = _example_parser(
        sub, "train", "fine-tune an adapter (the published recipe by default)",
        "example: samed-adapter train --data Task03_Liver --num-classes 2 --sam sam_vit_b_01ec64.pth -o runs/liver\n"
        "         torchrun --nproc_per_node 2 examples/train.py ...   # several GPUs",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_quickstart_parser(sub: _SubParsers) -> None:
    from .quickstart import add_arguments, run

    p = _example_parser(
        sub, "quickstart", "train, save, patch, segment and score on the bundled MNI152 brain data",
        "example: samed-adapter quickstart --out runs/quickstart",
    )
    add_arguments(p)
    p.set_defaults(func=run)


# The top-level --help's epilog: the main commands as a new user runs them (each command's own
# --help has more).
_EXAMPLES = """\
examples:
  samed-adapter quickstart --out runs/quickstart   # try it: no weights, no downloads
  samed-adapter convert epoch_159.pth synapse.safetensors --sam sam_vit_b_01ec64.pth
  samed-adapter info synapse.safetensors
  samed-adapter segment --sam sam_vit_b_01ec64.pth --adapter synapse.safetensors ct.nii.gz -o labels/
  samed-adapter pull org/synapse-adapter           # into the Hugging Face cache, for offline use

'samed-adapter COMMAND --help' shows each command's options and examples."""


def build_parser() -> argparse.ArgumentParser:
    """The `samed-adapter` parser: one `add_<command>_parser` per subcommand."""
    parser = argparse.ArgumentParser(
        prog="samed-adapter",
        description="Hot-swap SAMed adapters onto a stock Segment Anything Model.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from .serve import add_serve_parser

    for add in (add_convert_parser, add_info_parser, add_segment_parser, add_evaluate_parser, add_train_parser,
                add_quickstart_parser, add_push_parser, add_pull_parser, add_serve_parser):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (2 for an error, with a message on stderr;
    130 for Ctrl-C, in one line wherever it comes: loading torch, reading the SAM, ...)."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    # AdapterError and UnsafeCheckpointError are ValueErrors: no torch import needed to catch them.
    except (FileNotFoundError, ValueError, OSError) as err:
        # Errors raised by the Python API may carry the same message worded for the command line
        # (flags instead of keyword arguments; see patching._worded).
        _fail(args.command, getattr(err, "command_line", None) or str(err))
        return 2
    except KeyboardInterrupt:  # a command's own handler says more where it knows more (segment)
        print(f"samed-adapter{'' if args is None else ' ' + args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
