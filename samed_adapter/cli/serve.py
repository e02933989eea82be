"""`samed-adapter serve`: many adapters on one SAM over HTTP (the native API and MONAI Label's)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the server and answer until Ctrl-C (or SIGTERM); 0 when stopped that way."""
    from ..segment.pipeline import SamSource
    from ..serve.catalog import parse_pairs
    from ..serve.server import DeployError, start
    from ..serve.sessions import memory_bytes
    from ..serve.settings import ServeSettings
    from .common import fail as _fail, warn as _warn

    if args.sam is None and args.random_sam_seed is None:
        raise ValueError("--sam-backbone builds a SAM with random weights and needs --random-sam-seed N (for tests and "
                         "demos only); pass --sam CKPT to serve real SAM weights")
    if args.sam is not None:
        if args.random_sam_seed is not None:
            raise ValueError("--random-sam-seed goes with --sam-backbone, not with --sam")
        sam = SamSource(checkpoint=args.sam, sam2_config=args.sam2_config)
    else:
        sam = SamSource(backbone=args.sam_backbone, seed=args.random_sam_seed)
        _warn("serve", f"serving on random SAM weights (backbone {args.sam_backbone}, seed {args.random_sam_seed}): "
                       "only adapters made on that very SAM give meaningful labels; pass --sam CKPT for real ones")
    settings = ServeSettings(
        sam=sam, adapters=args.adapters or [], adapter_files=parse_pairs(args.adapter or [], "--adapter"),
        hub_adapters=parse_pairs(args.hub_adapter or [], "--hub-adapter"), host=args.host, port=args.port,
        token=args.token, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica, device=args.device,
        max_resident=args.max_resident, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        batching=args.batching, max_queue=args.max_queue, max_upload_mb=args.max_upload_mb,
        body_timeout_s=args.body_timeout,
        max_voxels=args.max_voxels, allow_base_mismatch=args.allow_base_mismatch, ray_address=args.ray_address,
        local_files_only=args.local_files_only, max_sessions=args.max_sessions,
        session_memory=memory_bytes(args.session_memory), datastore=args.datastore,
        datastore_dicomweb=args.datastore_dicomweb, datastore_cache=args.datastore_cache, versions=args.versions,
        admin_token=args.admin_token,
    )
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = start(settings)
        try:
            print(f"samed-adapter serve: serving at {server.url} (native API: {server.url}/v1/adapters; 3D Slicer's "
                  f"MONAI Label module: server address {server.url}); Ctrl-C stops", flush=True)
            while not stop.wait(1.0):
                server.check()  # a model replica that failed to start after the front answered
        finally:
            server.shutdown()
    except DeployError as err:
        _fail("serve", str(err))
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("samed-adapter serve: stopped", file=sys.stderr)
    return 0


def add_serve_parser(sub: Any) -> None:
    """Declare `serve` and its arguments."""
    from .common import example_parser as _example_parser

    p = _example_parser(
        sub, "serve", "serve many adapters from one SAM over HTTP (native API and MONAI Label's)",
        "examples:\n"
        "  samed-adapter serve --sam sam_vit_b_01ec64.pth --adapters adapters/            # http://127.0.0.1:8000\n"
        "  samed-adapter serve --sam sam_vit_b_01ec64.pth --adapter liver=liver.safetensors \\\n"
        "      --hub-adapter synapse=org/synapse-adapter --host 0.0.0.0 --token \"$TOKEN\" --replicas 2 --gpus-per-replica 1\n"
        "  curl -s http://127.0.0.1:8000/v1/adapters\n"
        "  curl -s -F adapter=liver -F file=@ct.nii.gz http://127.0.0.1:8000/v1/segment -o ct_outputs.zip\n"
        "  samed-adapter segment --server http://127.0.0.1:8000 --adapter liver ct.nii.gz -o labels/",
        "Hold one stock SAM per replica and serve any number of adapters from it, on Ray Serve (a local Ray started "
        "here, or --ray-address). Requests for different adapters are batched together: their slices share one "
        "encoder pass. Clients: `segment --server URL` (the same files as a local run), 3D Slicer and OHIF through "
        "MONAI Label's API (GET /info/, POST /infer/{adapter}), or plain HTTP (GET /v1/adapters, POST /v1/segment, "
        "GET /healthz, GET /metrics).",
    )
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--sam", metavar="CKPT", help="the stock SAM (or SAM 2) checkpoint the adapters were made for")
    base.add_argument("--sam-backbone", metavar="NAME", help="a SAM with RANDOM weights (tests and demos); needs "
                                                              "--random-sam-seed")
    p.add_argument("--sam2-config", metavar="NAME", help="with --sam: the SAM 2 backbone the checkpoint holds")
    p.add_argument("--random-sam-seed", type=int, metavar="N", help="seed of the random SAM of --sam-backbone")
    what = p.add_argument_group("adapters (clients name them; they never pass paths)")
    what.add_argument("--adapters", action="append", metavar="FOLDER",
                      help="a folder of .safetensors files, each served by its stem; files added later are found on "
                           "the first request for them (repeatable)")
    what.add_argument("--adapter", action="append", metavar="NAME=FILE", help="one adapter file (repeatable)")
    what.add_argument("--hub-adapter", action="append", metavar="NAME=ORG/REPO",
                      help="a Hub adapter, through the Hugging Face cache (repeatable)")
    what.add_argument("--local-files-only", action="store_true", help="Hub adapters from the cache only")
    what.add_argument("--allow-base-mismatch", action="store_true",
                      help="apply adapters even if they were made for other stock SAM weights")
    net = p.add_argument_group("who may call")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1, this machine only; any other needs a token)")
    net.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    net.add_argument("--token", metavar="T", help="bearer token every request needs (default: the SAMED_SERVE_TOKEN "
                                                  "environment variable); 3D Slicer logs in with it as password")
    net.add_argument("--admin-token", metavar="T",
                     help="bearer token that training, serving another adapter version and deleting datastore images "
                          "need (default: the SAMED_SERVE_ADMIN_TOKEN environment variable, else --token)")
    net.add_argument("--max-upload-mb", type=float, default=1024.0, metavar="MB", help="largest upload (default 1024)")
    net.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="an upload's body must arrive within this; a slower one gets 408 and frees its slot "
                          "(default 60)")
    net.add_argument("--max-voxels", type=int, metavar="N", help="largest scan, as segment --max-voxels")
    net.add_argument("--max-queue", type=int, default=32, metavar="N",
                     help="segment requests answered at once; more get 503 and retry (default 32)")
    run = p.add_argument_group("replicas and batching")
    run.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (default: a local Ray)")
    run.add_argument("--replicas", type=int, default=1, metavar="N", help="model replicas, one SAM each (default 1)")
    run.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G", help="GPUs per replica (default 0)")
    run.add_argument("--device", default="cpu", help="torch device of the replicas (default cpu; cuda with GPUs)")
    run.add_argument("--max-resident", type=int, default=8, metavar="N",
                     help="adapters kept on each replica's SAM; the least recently used goes first (default 8)")
    run.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="slices per forward pass (default 8)")
    run.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                     help="how long a batch waits for more slices (default 5)")
    run.add_argument("--batching", choices=["mixed", "per-adapter"], default="mixed",
                     help="mixed (default: adapters share a forward pass) or per-adapter (one forward per adapter, "
                          "as Ray Serve's model multiplexing; the benchmark's baseline)")
    clicks = p.add_argument_group("click sessions (3D Slicer's point tools; MONAI Label's /session/)")
    clicks.add_argument("--max-sessions", type=int, default=16, metavar="N",
                        help="sessions kept: uploaded images at the front, and each replica's kept embeddings; the "
                             "least recently used goes first, and a client then uploads again (default 16)")
    clicks.add_argument("--session-memory", default="4G", metavar="BYTES",
                        help="most bytes of image embeddings each replica keeps for sessions, on its device (K, M, G "
                             "suffixes; default 4G); the least recently used session goes first")
    store = p.add_argument_group("datastore and training (MONAI Label's /datastore/, /activelearning/, /train/)")
    where = store.add_mutually_exclusive_group()
    where.add_argument("--datastore", metavar="FOLDER",
                       help="images and labels in a folder, as MONAI Label's local datastore keeps them (made if "
                            "missing)")
    where.add_argument("--datastore-dicomweb", metavar="URL",
                       help="images and labels in a PACS over DICOMweb, as MONAI Label's DICOMweb datastore")
    store.add_argument("--datastore-cache", metavar="FOLDER",
                       help="with --datastore-dicomweb: local copies of its series and labels (default: "
                            "dicomweb-cache beside --versions)")
    store.add_argument("--versions", metavar="FOLDER",
                       help="where trained adapter versions are kept, NAME@1, NAME@2, ... (default: FOLDER/versions "
                            "of --datastore; needed with --datastore-dicomweb)")
    p.set_defaults(func=cmd_serve)
