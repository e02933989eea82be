"""Learning from corrections on the service: from `POST /train` to the new version serving, under load.

The end-to-end test's setting (tests/test_learn_e2e.py): a tiny random SAM, an adapter trained on
the quick start's MNI152 T1 slabs (version 1), and the same head in inverted contrast
(samed_adapter.testing.domains) as the site's data: its 8 slabs uploaded to `serve --datastore`
and their corrected labels submitted as `final` with MONAI Label's own client. Then `--clients`
threads send a steady load (`POST /v1/segment` of a held-out slab, as `segment --server` does)
while `/train/brain` runs (MONAI Label's `train_start`, admin token) and its version is swapped in.

Printed: the job's held-out Dice (version 1 and the new version), the time from `POST /train` to
the job's end and to the first answer made by the new version, and the load's throughput and
failures in each phase, as ratios to the phase before training:
  before     the steady load alone (the baseline),
  training   while the job trains (on one machine its Ray Train workers share the cores with the
             replica; on a cluster they run on other nodes),
  swap-in    from the job's end to `--window` seconds after the first new-version answer,
  after      the new version serving, for `--after` seconds,
  rollback   `--window` seconds from `POST /v1/adapters/brain/serve?version=1` (a swap with no job
             around it, to tell the swap's cost from the job's end on shared cores).
The goal of issue 32: no failed request, and the swap-in's dip under 10 %.

    python benchmarks/bench_learn.py [--clients 2] [--epochs 20] [--before 10] [--after 15] [--window 3]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

TOKEN, ADMIN = "bench-token", "bench-admin"
TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]


@dataclass
class Answer:
    start: float
    end: float
    ok: bool
    fingerprint: str


def train_first_version(root: Path) -> Path:
    """Version 1: `samed-adapter train` on the quick start's T1 slabs (as tests/conftest.py's `trained`)."""
    from samed_adapter.cli import main as cli
    from samed_adapter.cli.demo import build_mni_task

    data = build_mni_task(root / "data")
    code = cli.main(["train", "--data", str(data), "--format", "nifti", "--num-classes", "2",
                     "--class-names", "grey matter,white matter", "--window", "none", "--percentiles", "0.5,99.5",
                     *TINY, "--image-size", "128", "--batch-size", "8", "--max-epochs", "12", "--stop-epoch", "12",
                     "--warmup-iters", "4", "--no-progress", "--device", "cpu", "-o", str(root / "v1")])
    if code != 0:
        sys.exit("training version 1 failed")
    return root / "v1" / "adapter.safetensors"


def load(url: str, upload: Path, stop: threading.Event, answers: list[Answer]) -> None:
    """One client: segment ``upload`` again and again until ``stop``, keeping each answer's time and version."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    data = upload.read_bytes()
    while not stop.is_set():
        start = time.monotonic()
        try:
            got = session.post(f"{url}/v1/segment", data={"adapter": "brain"},
                               files={"file": (upload.name, data)}, timeout=120)
            ok, fingerprint = got.status_code == 200, got.headers.get("X-Adapter-Fingerprint", "")
        except requests.RequestException:
            ok, fingerprint = False, ""
        answers.append(Answer(start, time.monotonic(), ok, fingerprint))


def phase(answers: list[Answer], begin: float, end: float) -> tuple[int, int, float]:
    """(answers ended in [begin, end), failures among them, answers per second)."""
    inside = [a for a in answers if begin <= a.end < end]
    return len(inside), sum(not a.ok for a in inside), len(inside) / max(end - begin, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--before", type=float, default=10.0, help="seconds of load before POST /train")
    parser.add_argument("--after", type=float, default=15.0, help="seconds of load after the first new answer")
    parser.add_argument("--window", type=float, default=3.0, help="the swap-in phase lasts this long after it")
    parser.add_argument("--timeline", action="store_true", help="also print answers per second around the job's end")
    args = parser.parse_args()

    from monailabel.client import MONAILabelClient

    from samed_adapter.segment.pipeline import SamSource
    from samed_adapter.serve import ServeSettings, start
    from samed_adapter.testing.domains import write_shifted_slabs

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        first = train_first_version(root)
        slabs = write_shifted_slabs(root / "shifted")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapter_files={"brain": str(first)},
                                 port=port, token=TOKEN, admin_token=ADMIN, batch_wait_ms=2,
                                 datastore=str(root / "datastore"))
        with start(settings) as server:
            client = MONAILabelClient(server.url, tmpdir=str(root / "client"), client_id="bench")
            client.update_auth(client.auth_token("admin", ADMIN))
            for image_id, image, label in slabs:
                client.upload_image(str(image), image_id=image_id)
                client.save_label(image_id, str(label), tag="final")
            answers: list[Answer] = []
            stop = threading.Event()
            threads = [threading.Thread(target=load, args=(server.url, slabs[-1][1], stop, answers), daemon=True)
                       for _ in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(2.0)  # the replica's first batches (adapter load) are not the baseline
            t_before = time.monotonic()
            time.sleep(args.before)
            t_post = time.monotonic()
            client.train_start("brain", {"max_epochs": args.epochs, "seed": 0})
            while (state := client.train_status())["status"] == "RUNNING":
                time.sleep(0.2)
            t_done = time.monotonic()
            result = state.get("result", {})
            new = result.get("fingerprint")
            t_new = None
            deadline = t_done + 60
            while t_new is None and time.monotonic() < deadline and state["status"] == "DONE" and result.get("serving"):
                t_new = next((a.end for a in list(answers) if a.fingerprint == new), None)
                time.sleep(0.05)
            t_swapped = (t_new or t_done) + args.window
            time.sleep(max(0.0, t_swapped + args.after - time.monotonic()))
            # A swap with no job around it: back to version 1, as an admin's rollback.
            t_rollback = time.monotonic()
            rolled = requests.post(f"{server.url}/v1/adapters/brain/serve", params={"version": 1},
                                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
            rolled.raise_for_status()
            time.sleep(args.window)
            stop.set()
            for t in threads:
                t.join(timeout=180)
            t_end = time.monotonic()

    if state["status"] != "DONE":
        sys.exit(f"the job ended {state['status']}: {state.get('error')}")
    dice = result["figures"]["holdout_dice"]
    print(f"held-out Dice on the shifted domain: version 1 {dice['current']:.2f}, version {result['version']} "
          f"{dice['new']:.2f}; serves: {result['serving']}")
    print(f"POST /train -> job done: {t_done - t_post:.1f} s; -> first answer by the new version: "
          + (f"{t_new - t_post:.1f} s" if t_new else "none"))
    phases = [("before", t_before, t_post), ("training", t_post, t_done), ("swap-in", t_done, t_swapped),
              ("after", t_swapped, t_rollback), ("rollback", t_rollback, t_end)]
    base = phase(answers, t_before, t_post)[2]
    print(f"\n{args.clients} clients, POST /v1/segment of a {slabs[-1][1].name} slab; ratios to 'before'")
    print(f"{'phase':<10}{'seconds':>9}{'answers':>9}{'failed':>8}{'per s':>8}{'ratio':>8}")
    for name, begin, end in phases:
        n, failed, rate = phase(answers, begin, end)
        print(f"{name:<10}{end - begin:>9.1f}{n:>9}{failed:>8}{rate:>8.2f}{rate / base if base else 0:>8.2f}")
    if args.timeline:
        print("\nanswers per second around the job's end (t = 0):")
        for second in range(-5, int(t_end - t_done)):
            n = phase(answers, t_done + second, t_done + second + 1)[0]
            print(f"{second:>4} {n:>4} " + "#" * n)
    versions = sorted({a.fingerprint[:19] for a in answers if a.ok})
    print(f"failed requests in all: {sum(not a.ok for a in answers)} of {len(answers)}; versions answering: "
          f"{', '.join(versions)}")


if __name__ == "__main__":
    main()
