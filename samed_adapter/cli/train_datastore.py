"""`samed-adapter train --datastore FOLDER --from NAME`: a new adapter version from a datastore's final labels.

The same job as the service's ``POST /train/{model}`` (:class:`~samed_adapter.learning.job.LearningJob`):
part of the final labels held out by ``--seed``, the current and the new version scored on them,
and the new one recorded in ``--versions`` (default ``FOLDER/versions``), serving only if its
held-out mean Dice is at least the current one's less ``--threshold``.

    samed-adapter train --datastore store/ --from brain --adapter brain=brain.safetensors --sam sam_vit_b_01ec64.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["add_datastore_arguments", "run_datastore"]

#: train flags that make no sense with --datastore (a version is made from the datastore, into --versions)
_NOT_WITH_DATASTORE = {"data": "--data", "output": "-o/--output", "resume": "--resume", "overwrite": "--overwrite"}


def add_datastore_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "a new version from a datastore (instead of --data and -o; with the SAM flags above, --device, "
        "--max-epochs, --batch-size, --base-lr, --warmup-iters and --seed)")
    group.add_argument("--datastore", metavar="FOLDER", help="a datastore folder (MONAI Label's local format); its "
                                                             "images' final labels train the new version")
    group.add_argument("--from", dest="from_adapter", metavar="NAME", help="the adapter to make a new version of")
    group.add_argument("--adapters", action="append", metavar="FOLDER",
                       help="a folder of adapter files (NAME.safetensors), as serve takes it")
    group.add_argument("--adapter", action="append", metavar="NAME=FILE", help="one adapter file, as serve takes it")
    group.add_argument("--versions", metavar="FOLDER", help="where versions are kept (default: FOLDER/versions, as "
                                                            "serve --datastore keeps them)")
    group.add_argument("--holdout", type=float, default=0.2,
                       help="fraction of the final-labelled images held out to score both versions (at least one; "
                            "default 0.2)")
    group.add_argument("--threshold", type=float, default=0.0,
                       help="Dice points the new version may be below the current one and still serve (default 0)")
    group.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP when more than one; default 1)")
    group.add_argument("--engine", choices=["ray", "local"], default="ray",
                       help="ray: Ray Train's TorchTrainer (default); local: this process, one worker")


def run_datastore(args: argparse.Namespace, prog: str, device: Callable[[Any], Any]) -> int:
    """Make the version; print both held-out Dice figures and whether it serves. Exit code 0, 2 for a
    refusal (one line), 130 when stopped by Ctrl-C (nothing recorded).

    ``device``: ``--device`` as a torch device that can train here (``train.training_device``).
    """
    given = [flag for name, flag in _NOT_WITH_DATASTORE.items() if getattr(args, name, None)]
    if given or not args.from_adapter or not (args.adapters or args.adapter):
        why = (f"{', '.join(given)} do not apply" if given else
               "give --from NAME and where its file is (--adapter NAME=FILE or --adapters FOLDER)")
        print(f"{prog}: error: with --datastore, {why}: a new version of adapter NAME is made from the datastore "
              "into --versions", file=sys.stderr)
        return 2
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        job = _job(args, device(args.device).type)
        result = job.run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no version was recorded", file=sys.stderr)
        return 130
    except ValueError as err:  # the job's, the datastore's and the versions' refusals, one line each
        print(f"{prog}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        if not ray_before:
            _stop_ray(args)
    if result.stopped:
        print(f"{prog}: stopped; no version was recorded", file=sys.stderr)
        return 130
    _report(result, args.from_adapter)
    return 0


def _job(args: argparse.Namespace, device: str) -> Any:
    from ..datastore.opening import open_datastore
    from ..learning.job import JobOptions, LearningJob
    from ..learning.versions import VersionStore
    from ..serve.catalog import AdapterCatalog, UnknownAdapterError, parse_pairs

    catalog = AdapterCatalog(args.adapters or [], parse_pairs(args.adapter or [], "--adapter"))
    try:
        catalog_file = catalog.path(args.from_adapter)
    except UnknownAdapterError as err:
        raise ValueError(f"--from {args.from_adapter}: {err}") from None
    values = {"epochs": args.stop_epoch or args.max_epochs, "batch_size": args.batch_size, "base_lr": args.base_lr,
              "warmup_iters": args.warmup_iters, "seed": args.seed}
    options = JobOptions(holdout=args.holdout, threshold=args.threshold, workers=args.workers, engine=args.engine,
                         device=device,
                         **{k: v for k, v in values.items() if v is not None})
    sam = _sam_source(args)
    versions = VersionStore(args.versions or Path(args.datastore) / "versions")
    return LearningJob(open_datastore(args.datastore), versions, args.from_adapter, sam, options,
                       catalog_file=catalog_file)


def _sam_source(args: argparse.Namespace) -> Any:
    from ..segment.pipeline import SamSource

    if args.sam:
        if not Path(args.sam).is_file():
            raise FileNotFoundError(f"--sam {args.sam}: no such file")
        return SamSource(checkpoint=str(Path(args.sam).resolve()), sam2_config=args.sam2_config)
    if args.sam_backbone and args.random_sam_seed is not None:
        print(f"warning: using a SAM with RANDOM weights ({args.sam_backbone}, seed {args.random_sam_seed}); "
              "pass --sam sam_vit_b_01ec64.pth for real results")
        return SamSource(backbone=args.sam_backbone, seed=args.random_sam_seed)
    raise ValueError("give --sam CHECKPOINT (or --sam-backbone NAME --random-sam-seed N for a random SAM)")


def _stop_ray(args: argparse.Namespace) -> None:
    """Shut down the Ray the job started in this process (one running before it keeps running)."""
    if args.engine != "ray" or "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _report(result: Any, name: str) -> None:
    version = result.version
    dice = version.figures["holdout_dice"]
    shown = lambda v: "none" if v is None else f"{v:.2f} %"  # noqa: E731
    print(f"held-out images ({len(version.holdout)}, never trained on): {', '.join(version.holdout)}")
    print(f"held-out mean Dice: current (version {version.parent}) {shown(dice['current'])}, new {shown(dice['new'])}")
    if result.serving:
        serving = f"{version.ref} serves"
    elif dice["current"] is None or dice["new"] is None:
        serving = f"{version.ref} is kept but does not serve (no held-out Dice to compare)"
    elif dice["new"] >= dice["current"] - version.figures["threshold"]:
        serving = (f"{version.ref} is kept but does not serve: version {version.parent}, which it beat, stopped "
                   "serving while it trained (a rollback, or another job's version); serve it with "
                   f"POST /v1/adapters/{name}/serve?version={version.version} on the server")
    else:
        serving = (f"{version.ref} is kept but does not serve (its held-out Dice is below the current one's less "
                   f"--threshold {version.figures['threshold']:g})")
    print(f"version: {version.path} ({len(version.items)} images trained on, "
          f"{version.figures['seconds']:.0f} s); {serving}")
