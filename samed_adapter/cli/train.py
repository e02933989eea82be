"""Command-line front of training, shared by `examples/train.py` and `samed-adapter train`.

    python examples/train.py --data DIR --format nifti --num-classes 8 --sam sam_vit_b_01ec64.pth -o runs/x
    torchrun --nproc_per_node 2 examples/train.py ...      # DistributedDataParallel, one process per GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from .arguments import orientation_argument, pair_argument
from .train_datastore import add_datastore_arguments
from .common import SubParsers, example_parser
from ..adapter_file.config import CT_ABDOMEN_WINDOW
from ..training.config import RECIPES, TrainConfig
from ..training.errors import TrainingError, TrainingInterrupted, cli_spelling

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# Whether a new run trains clicks when neither --clicks nor --no-clicks is given. Off: a step
# costs only 1.05x (512) to 1.12x (256) with ViT-B (bench_train_step, 2 CPU cores), but on the
# quick start the automatic Dice fell by 0.2, 9.4 and 0.7 points (seeds 0, 1, 2) with clicks.
DEFAULT_CLICKS = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    # Required unless --datastore (checked in run(): argparse has no "one of these two groups").
    data.add_argument("--data", help="dataset folder (or where to write the MNI demo task)")
    data.add_argument("--format", choices=["nifti", "synapse", "mni"], default="nifti",
                      help="nifti: imagesTr/labelsTr (nnU-Net/Decathlon); synapse: the preprocessed "
                           "train_npz + lists_Synapse layout; mni: build the bundled MNI152 demo task in --data")
    data.add_argument("--num-classes", type=int, help="K foreground classes (default: 8, or 2 for mni)")
    data.add_argument("--class-names", help="comma-separated K class names")
    data.add_argument("--label-map", choices=["synapse"], help="remap raw labels (synapse: raw 1,2,3,4,6,7,8,11 -> 1..8)")
    data.add_argument("--window", type=pair_argument, default=CT_ABDOMEN_WINDOW,
                      help="CT intensity window LO,HI, or none (default -125,275; for --format synapse: the window "
                           "the preprocessed data was made with, recorded in the adapter)")
    data.add_argument("--percentiles", type=pair_argument,
                      help="MR: per-volume percentile normalisation LO,HI, replacing the window (mni default 0.5,99.5)")
    data.add_argument("--orientation", type=orientation_argument, metavar="CODES",
                      help="reorient every volume to these axis codes before slicing, e.g. LPS or RAS (default: the "
                           "first training case's own orientation; --format synapse: not recorded)")
    data.add_argument("--slice-axis", type=int, choices=[0, 1, 2], default=2,
                      help="axis of the reoriented volume to cut slices along (default 2)")
    data.add_argument("--max-voxels", type=int, metavar="N",
                      help="refuse images and labels holding more voxels than this, checked from their headers "
                           "before reading (default 2**30, as for segment)")
    data.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of cases for validation")

    model = parser.add_argument_group("model")
    model.add_argument("--sam", help="stock SAM or SAM 2 checkpoint (e.g. sam_vit_b_01ec64.pth, sam2.1_hiera_tiny.pt)")
    model.add_argument("--sam2-config", metavar="NAME",
                       help="with --sam: the SAM 2 backbone the checkpoint holds (e.g. sam2.1_hiera_t); default: "
                            "read from its tensors")
    model.add_argument("--sam-backbone", help="with --random-sam-seed: build a SAM with random weights (tests, demos); "
                                              "vit_b, tiny, sam2.1_hiera_t, ...")
    model.add_argument("--random-sam-seed", type=int, help="seed of the random SAM weights")
    model.add_argument("--image-size", type=int, default=512)
    model.add_argument("--rank", type=int, default=4)
    model.add_argument("--decoder-lora", action="store_true", help="the SAMed_s variant (LoRA in the decoder)")
    model.add_argument("--clicks", action=argparse.BooleanOptionalAction, default=None,
                       help="also teach the adapter to refine one class from clicks (simulated clicks in every step, "
                            "see --click-rounds, --click-weight; a (K+1, 256) class embedding in the file); default "
                            f"{'on' if DEFAULT_CLICKS else 'off'} for a new run, a resumed run keeps its own")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when available)")

    run = parser.add_argument_group("training (defaults: the published ViT-B recipe)")
    run.add_argument("-o", "--output", help="output folder")
    run.add_argument("--recipe", choices=sorted(RECIPES), help="published recipe presets; flags given override them")
    run.add_argument("--resume", action="store_true", help="continue the run in OUTPUT from its train_state.pt")
    run.add_argument("--overwrite", action="store_true",
                     help="delete the run files in OUTPUT (adapters, train_state.pt, log.jsonl, TensorBoard events; "
                          "nothing else) and start over; without it or --resume a folder holding a run is refused")
    add_datastore_arguments(parser)
    for name, f in _FIELDS.items():
        if name == "output_dir" or name == "betas":
            continue
        flag = "--" + name.replace("_", "-")
        if f.type in ("bool", bool):
            run.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        elif name == "precision":
            run.add_argument(flag, choices=["fp32", "bf16", "fp16"], default=None, help=f.metadata["help"])
        else:
            kind = float if "float" in str(f.type) else int
            run.add_argument(flag, type=kind, default=None, help=f"{f.metadata['help']} (default {f.default})")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags ask for; a refused value is told with its flag (--save-every, not save_every)."""
    values = dict(RECIPES[args.recipe]) if args.recipe else {}
    for name in _FIELDS:
        value = getattr(args, name, None)
        if value is not None and name != "output_dir":
            values[name] = value
    try:
        return TrainConfig(output_dir=args.output, **values)
    except ValueError as err:
        message = str(err)
        for name in _FIELDS:
            message = re.sub(rf"\b{name}\b", cli_spelling(name), message)
        raise ValueError(message) from None


def _build_sam(args: argparse.Namespace):
    from ..hosts.backbones import build_sam

    if args.sam:
        from ..hosts.backbones import load_stock_sam

        return load_stock_sam(args.sam, sam2_config=args.sam2_config)
    if args.sam_backbone and args.random_sam_seed is not None:
        print(f"warning: using a SAM with RANDOM weights ({args.sam_backbone}, seed {args.random_sam_seed}); "
              "pass --sam sam_vit_b_01ec64.pth for real results")
        return build_sam(args.sam_backbone, seed=args.random_sam_seed)
    raise SystemExit("error: give --sam CHECKPOINT (or --sam-backbone NAME --random-sam-seed N for a random SAM)")


def _preprocessing(args: argparse.Namespace) -> tuple[Optional[tuple[float, float]], Optional[tuple[float, float]]]:
    """(window, percentiles) the training data is scaled with, and so the adapter records."""
    if args.format == "mni":
        from .demo import MNI_PERCENTILES

        return None, args.percentiles or MNI_PERCENTILES
    if args.percentiles is not None:
        return None, args.percentiles
    return args.window, None


def _orientation(args: argparse.Namespace, root: str, cases: Sequence[str]) -> Optional[tuple[str, str, str]]:
    """--orientation, or the first training case's own (closest axis-aligned) orientation."""
    if args.orientation is not None or args.format == "synapse":
        return args.orientation
    import nibabel as nib

    from ..volume.geometry import axis_codes
    from ..training.data import find_nifti_images

    first = find_nifti_images(root)[cases[0]]
    codes = axis_codes(nib.load(first).affine)
    print(f"orientation: {''.join(codes)}, the first case's ({first.name}); every volume is reoriented to it and "
          f"cut along axis {args.slice_axis} ({codes[args.slice_axis]}); --orientation sets another")
    return codes


def _datasets(args: argparse.Namespace, window, percentiles):
    """(training slices, validation volumes or None, orientation the slices were cut in)."""
    from ..training.data import SYNAPSE_LABEL_MAP, NiftiSlices, NiftiVolumes, SynapseSlices, find_nifti_cases, split_cases

    if args.format == "synapse":
        return SynapseSlices(args.data), None, _orientation(args, args.data, [])
    if args.format == "mni":
        from .demo import build_mni_task

        build_mni_task(args.data)
        train_cases, val_cases = ["mni_train"], ["mni_val"]
    else:
        cases = find_nifti_cases(args.data)
        train_cases, val_cases = split_cases(cases, args.val_fraction, seed=0) if args.val_fraction else (cases, [])
    orientation = _orientation(args, args.data, train_cases)
    label_map = SYNAPSE_LABEL_MAP if args.label_map == "synapse" else None
    kwargs = dict(window=window, percentiles=percentiles, label_map=label_map, orientation=orientation,
                  slice_axis=args.slice_axis, max_voxels=args.max_voxels)
    slices = NiftiSlices(args.data, train_cases, **kwargs)
    _warn_on_flat_contrast(slices)
    volumes = NiftiVolumes(args.data, val_cases, **kwargs) if val_cases else None
    return slices, volumes, orientation


def _warn_on_flat_contrast(slices) -> None:
    """Say so when the window squeezes the first training case into a sliver of [0, 1]."""
    import sys

    from ..volume.preprocessing import contrast_warning

    case = slices.cases[0]
    message = contrast_warning(slices._read_image(case), slices.intensity, f"training case {case!r}")
    if message:
        print(f"warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None, invocation: str = "python examples/train.py") -> int:
    """`examples/train.py`: the exit code; errors are one line on stderr (2), Ctrl-C exits with 130.

    Args:
        invocation: how the user started this script, for the ``--resume`` command printed on Ctrl-C.
    """
    parser = argparse.ArgumentParser(
        prog="train", description="Fine-tune a SAMed adapter.",
        epilog="example: python examples/train.py --format mni --data runs/mni --sam-backbone tiny "
               "--random-sam-seed 0 --image-size 128 --batch-size 8 --max-epochs 20 --stop-epoch 20 -o runs/demo",
    )
    add_arguments(parser)
    parser.set_defaults(invocation=invocation, prog="train")
    args = parser.parse_args(argv)
    try:
        return run(args)
    # `samed-adapter` catches these in cli.main; this script has no other front.
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2


def training_device(text: Optional[str]) -> "torch.device":
    """--device as a torch.device that can train here (default: cuda when available, else cpu).

    Raises:
        ValueError: not a torch device, one that cannot train (meta), or one this machine lacks;
            the message names the device and what to use.
    """
    import torch

    from ..training.loop import TRAINING_DEVICES

    usable = "--device cuda" if torch.cuda.is_available() else "--device cpu"
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a torch device; use {usable} (or cuda:N for the N-th GPU)") from None
    if device.type not in TRAINING_DEVICES:
        why = "it holds shapes but no values" if device.type == "meta" else f"training runs on {', '.join(TRAINING_DEVICES)}"
        raise ValueError(f"--device {text} cannot train ({why}); use {usable}")
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}
    if device.type in backend:
        module = backend[device.type]
        if module is None or not module.is_available():
            raise ValueError(f"--device {text} but {device.type} is not available here; use {usable}")
        count = module.device_count() if hasattr(module, "device_count") else 1
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {text} but this machine has {count} {device.type} device(s) "
                             f"({device.type}:0 to {device.type}:{count - 1}); use one of those")
    return device


def _word(value: object) -> str:
    """A parsed flag value as the command line writes it (-125,275; LPS; none)."""
    if value is None:
        return "none"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (tuple, list)):
        if all(isinstance(v, str) and len(v) == 1 for v in value):
            return "".join(value)  # axis codes
        return ",".join(_word(v) for v in value)
    return str(value)


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues the run `args` started: every flag given (as parsed), plus --resume.

    Rebuilt from the parsed values rather than the raw words, so it is the same whichever front
    (`samed-adapter train`, `examples/train.py`) parsed them.
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    words: list[str] = []
    for action in parser._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or action.dest in ("resume", "overwrite"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))  # --output, --progress
        if isinstance(action, argparse.BooleanOptionalAction):
            words.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true
            words.append(flag)
        else:
            words += [flag, _word(value)]
    invocation = getattr(args, "invocation", "samed-adapter train")
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if world > 1 and invocation.startswith("python "):
        invocation = f"torchrun --nproc_per_node {world} " + invocation[len("python "):]
    return " ".join([invocation, shlex.join(words + ["--resume"])])


def run(args: argparse.Namespace) -> int:
    """Train as `args` say; the exit code.

    Errors of the run itself (a folder holding a run, a damaged state, a diverging loss) are one
    line on stderr with flags spelled as flags (2); Ctrl-C saves the checkpoint, prints the command
    that continues the run and returns 130 (the shell's code for SIGINT). Other bad input is
    raised as ValueError / OSError for the front to print.
    """
    prog = getattr(args, "prog", "samed-adapter train")
    if getattr(args, "datastore", None) is not None:
        from .train_datastore import run_datastore

        return run_datastore(args, prog, training_device)
    missing = [flag for flag, value in (("--data", args.data), ("-o/--output", args.output)) if value is None]
    if missing:
        print(f"{prog}: error: the following arguments are required: {', '.join(missing)} (or --datastore FOLDER "
              "--from NAME for a new version from a datastore's labels)", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except TrainingInterrupted as stop:
        if _rank() == 0:
            print(f"{prog}: {stop.describe(cli_spelling)}", file=sys.stderr)
            if stop.saved:
                print(f"continue with: {resume_command(args)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if _rank() == 0:
            print(f"{prog}: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    except TrainingError as err:
        if _rank() == 0:
            print(f"{prog}: error: {err.for_cli()}", file=sys.stderr)
        return 2


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from ..training.folder import check_run_folder

    config = train_config(args)
    # Before any model or data is read (or, for --format mni, written): a refused run changes nothing.
    check_run_folder(Path(args.output), resume=args.resume, overwrite=args.overwrite)
    device = training_device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(args, config, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, config: TrainConfig, device: "torch.device") -> int:
    import torch
    import torch.distributed as dist

    import samed_adapter as sa

    from ..training.loop import train

    num_classes = args.num_classes if args.num_classes is not None else (2 if args.format == "mni" else 8)
    names = args.class_names.split(",") if args.class_names else None
    if names is None and args.format == "mni":
        from .demo import MNI_CLASS_NAMES

        names = list(MNI_CLASS_NAMES)
    elif names is None and num_classes == 8 and (args.format == "synapse" or args.label_map == "synapse"):
        names = list(sa.SYNAPSE_CLASS_NAMES)
    window, percentiles = _preprocessing(args)
    clicks = run_clicks(args)
    # Checked before any data is read or written, so a bad flag changes nothing.
    sa.AdapterConfig(num_classes=num_classes, class_names=names, intensity_window=window,
                     intensity_percentiles=percentiles, slice_axis=args.slice_axis)
    sam = _build_sam(args).to(device)
    slices, volumes, orientation = _datasets(args, window, percentiles)
    adapter_config = sa.AdapterConfig(
        num_classes=num_classes, rank=args.rank, image_size=args.image_size, class_names=names,
        intensity_window=window, intensity_percentiles=percentiles, orientation=orientation,
        slice_axis=args.slice_axis, decoder_lora=args.decoder_lora, clicks=clicks,
    )
    torch.manual_seed(config.seed)  # the K-sized decoder parts start the same in every process and run
    model = sa.inject(sam, adapter_config)
    path = train(model, slices, config, val_volumes=volumes, resume=args.resume, overwrite=args.overwrite)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"adapter: {path}")
    return 0


def run_clicks(args: argparse.Namespace) -> bool:
    """Whether this run trains clicks: --clicks / --no-clicks, else, resuming, what the run in
    OUTPUT was trained with (its last checkpoint's adapter), else DEFAULT_CLICKS.

    Raises:
        ValueError: resuming with the opposite of the run's setting (its tensors would not fit).
    """
    from ..training.folder import LAST, STATE

    out = Path(args.output)
    saved = None
    if args.resume and (out / STATE).exists() and (out / LAST).exists():
        from ..adapter_file.adapter import Adapter

        saved = Adapter.load(out / LAST).config.clicks
    if args.clicks is None:
        return DEFAULT_CLICKS if saved is None else saved
    if saved is not None and args.clicks != saved:
        raise ValueError(f"the run in {out} was trained {'with' if saved else 'without'} clicks; resume it with "
                         f"{'--clicks' if saved else '--no-clicks'} (or leave the flag out), or start a new run "
                         "with --overwrite")
    return args.clicks


def add_train_parser(sub: SubParsers) -> None:
    """Declare `train` and its arguments (``examples/train.py`` has its own parser, :func:`main`)."""
    p = example_parser(
        sub, "train", "fine-tune an adapter (the published recipe by default)",
        "example: samed-adapter train --data Task03_Liver --num-classes 2 --sam sam_vit_b_01ec64.pth -o runs/liver\n"
        "         torchrun --nproc_per_node 2 examples/train.py ...   # several GPUs\n"
        "         samed-adapter train --datastore store/ --from liver --adapter liver=liver.safetensors "
        "--sam sam_vit_b_01ec64.pth   # a new version",
    )
    add_arguments(p)
    p.set_defaults(func=run)
