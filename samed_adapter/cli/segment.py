"""`samed-adapter segment`: files and folders (or PACS studies, or a server) -> label files and more."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ..io.printable import printable
from ..volume.preprocessing import WindowChoice
from .arguments import pair_argument, window_argument
from .common import SubParsers, escaped, example_parser, fail, parse_device, segment_sam


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
            parse_device(args.device)
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
        source = SamSource(segment_sam(args, adapter), backbone=args.sam_backbone, seed=args.random_sam_seed)
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
            bar.write(f"samed-adapter segment: note: not segmented: {escaped(result.message)}", file=sys.stderr)
            return
        if result.status == "failed":
            bar.write(f"samed-adapter segment: error: {escaped(result.message)} (skipped; continuing with the other "
                      "inputs)", file=sys.stderr)
            bar.update(1)
            return
        for line in result.message.splitlines() if result.status == "written" else []:
            bar.write(f"samed-adapter segment: warning: {escaped(line)}", file=sys.stderr)
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
        fail("segment", _interrupted(counts, planned["inputs"], args.output))
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


def add_segment_parser(sub: SubParsers) -> None:
    """Declare `segment` and its arguments."""
    p = example_parser(
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
