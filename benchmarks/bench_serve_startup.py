"""How long `samed-adapter serve` takes to start: from the command to its first answered request,
against Ray Serve's own floor on the same machine in the same run.

Rows, each started --runs times as a fresh process, the rows interleaved run by run and each in
turn first (so that load from elsewhere, and a stopped Ray's cleanup, fall on every row alike),
a process's time measured from its start:
  baseline        `ray.init()` and a trivial Serve app (one deployment answering "ok" at /),
                  `serve.run`: what Ray and Ray Serve cost before any model;
  baseline, lean  the same with the options serve gives ray.init (no dashboard, no worker logs);
  serve           `samed-adapter serve --sam-backbone tiny` with one adapter, as a user starts it;
  serve + ENV     the same with Ray settings given by --variant (candidate cuts).
For each serve row: the first answer of any kind (Ray Serve's proxy answers 404 until the app's
route is there), the first 200 from /healthz, the "serving at" line, and the first POST
/v1/segment answered (the model replicas running: the front answers before them). Medians, min
and max over the runs, and each row's median / the baseline's. Then where the time goes: one start
in a child process that times its steps (imports, ray.init, serve.start, the deployment until the
front answers /healthz, until every replica runs, the first segment request; `serve` used to wait
for serve.run, which returns after every replica runs). Nothing here is asserted.

    python benchmarks/bench_serve_startup.py [--runs 3] [--out results.json]
        [--variant "prestart off=RAY_prestart_worker_first_driver=0"]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import requests

BASELINE = """
import sys, time
import ray
from ray import serve
if sys.argv[2] == "lean":  # the options serve starts its Ray with
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
else:
    ray.init()
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})

@serve.deployment
class Ok:
    async def __call__(self, request):
        return "ok"

serve.run(Ok.bind(), name="ok", route_prefix="/", blocking=False)
while True:
    time.sleep(1)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(root: Path) -> tuple[Path, Path]:
    """An adapter made on the tiny SAM of seed 0, and a small scan to segment."""
    import samed_adapter as sa
    from samed_adapter.testing import random_adapter
    from samed_adapter.testing.cli import random_scan

    (root / "adapters").mkdir()
    config = sa.AdapterConfig(num_classes=1, image_size=64, class_names=["liver"])
    random_adapter(sa.build_sam("tiny", seed=0), config, seed=1).save(root / "adapters" / "liver.safetensors")
    return root / "adapters", random_scan(root / "ct.nii.gz", shape=(40, 36, 2))


class Watch:
    """A started process: when its first line with ``marker`` came (seconds from its start)."""

    def __init__(self, argv: list[str], env: dict[str, str], marker: Optional[str]) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        self.marked: Optional[float] = None
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(marker,), daemon=True).start()

    def _read(self, marker: Optional[str]) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if marker and self.marked is None and marker in line:
                self.marked = time.monotonic() - self.t0

    def since(self) -> float:
        return time.monotonic() - self.t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def first_answers(watch: Watch, url: str, timeout_s: float) -> dict[str, float]:
    """Poll ``url`` every 50 ms: when anything first answered, and when it first answered 200."""
    times: dict[str, float] = {}
    while watch.since() < timeout_s:
        if watch.proc.poll() is not None:
            raise RuntimeError("the process ended:\n" + "\n".join(watch.lines[-20:]))
        try:
            status = requests.get(url, timeout=2).status_code
            times.setdefault("any answer", watch.since())
            if status == 200:
                times["200"] = watch.since()
                return times
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def run_baseline(timeout_s: float, kind: str = "plain") -> dict[str, float]:
    port = free_port()
    watch = Watch([sys.executable, "-c", BASELINE, str(port), kind], dict(os.environ), None)
    try:
        return {"first 200": first_answers(watch, f"http://127.0.0.1:{port}/", timeout_s)["200"]}
    finally:
        watch.stop()


def run_serve(adapters: Path, scan: Path, env: dict[str, str], timeout_s: float) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    watch = Watch([sys.executable, "-m", "samed_adapter.cli", "serve", "--sam-backbone", "tiny", "--random-sam-seed",
                   "0", "--adapters", str(adapters), "--port", str(port)], {**os.environ, **env}, "serving at")
    try:
        answers = first_answers(watch, f"{url}/healthz", timeout_s)
        with open(scan, "rb") as f:
            answer = requests.post(f"{url}/v1/segment", data={"adapter": "liver"}, files={"file": ("ct.nii.gz", f)},
                                   timeout=timeout_s)
        segmented = watch.since()
        if answer.status_code != 200:
            raise RuntimeError(f"/v1/segment answered {answer.status_code}: {answer.text[:300]}")
        deadline = time.monotonic() + 10
        while watch.marked is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"any answer": answers["any answer"], "first 200": answers["200"],
                "'serving at' line": watch.marked if watch.marked is not None else float("nan"),
                "first segment": segmented}
    finally:
        watch.stop()


PHASES = """
import json, socket, sys, time
t0 = time.monotonic()
marks = {}
def mark(name):
    marks[name] = round(time.monotonic() - t0, 2)
from samed_adapter.segment.pipeline import SamSource
from samed_adapter.serve import ServeSettings
from samed_adapter.serve import server as srv
from ray import serve
import requests
mark("imports (torch, ray.serve, the service)")
import ray
ray_init, serve_start = ray.init, serve.start
def timed_init(*a, **k):
    ray_init(*a, **k); mark("ray.init (a local Ray)")
def timed_start(*a, **k):
    serve_start(*a, **k); mark("serve.start (controller, HTTP proxy)")
ray.init, serve.start = timed_init, timed_start
settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapters=[sys.argv[1]], port=int(sys.argv[3]))
with srv.start(settings) as server:
    mark("deployed until the front answers /healthz")
    while serve.status().applications["samed-adapter"].status != "RUNNING":
        time.sleep(0.05)
    mark("every replica running (serve.run, polling each second, returned after this)")
    with open(sys.argv[2], "rb") as f:
        requests.post(server.url + "/v1/segment", data={"adapter": "liver"}, files={"file": ("ct.nii.gz", f)},
                      timeout=300).raise_for_status()
    mark("first segment answered (model replicas up)")
print("PHASES " + json.dumps(marks))
"""


def run_phases(adapters: Path, scan: Path) -> dict[str, float]:
    """Seconds from a child process's start to the end of each step of one start (cumulative)."""
    done = subprocess.run([sys.executable, "-c", PHASES, str(adapters), str(scan), str(free_port())],
                          capture_output=True, text=True, timeout=600)
    line = [text for text in done.stdout.splitlines() if text.startswith("PHASES ")]
    if done.returncode or not line:
        raise RuntimeError(f"the phases run failed:\n{done.stderr[-2000:]}")
    return json.loads(line[0][len("PHASES "):])


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``"name=VAR=VALUE[,VAR=VALUE]"`` -> (name, environment)."""
    name, _, assignments = text.partition("=")
    env = dict(pair.split("=", 1) for pair in assignments.split(",") if pair)
    if not name or not env:
        raise SystemExit(f"--variant {text!r}: give NAME=VAR=VALUE[,VAR=VALUE]")
    return name, env


def table(results: dict[str, list[dict[str, float]]]) -> str:
    base = statistics.median(r["first 200"] for r in results["baseline"])
    lean = statistics.median(r["first 200"] for r in results["baseline, lean"])
    lines = ["| row | measured from the command's start | median s | min s | max s | / baseline | / lean |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row, runs in results.items():
        for what in runs[0]:
            values = [r[what] for r in runs]
            median = statistics.median(values)
            lines.append(f"| {row} | {what} | {median:.1f} | {min(values):.1f} | {max(values):.1f} | "
                         f"{median / base:.2f}x | {median / lean:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a start may take")
    parser.add_argument("--variant", action="append", default=[], help="NAME=VAR=VALUE[,VAR=VALUE] (repeatable)")
    parser.add_argument("--out", type=Path, help="write the timings as JSON here")
    args = parser.parse_args()
    variants = [("serve", {})] + [(f"serve + {n}", env) for n, env in map(parse_variant, args.variant)]
    results: dict[str, list[dict[str, Any]]] = {"baseline": [], "baseline, lean": []}
    results.update({name: [] for name, _ in variants})
    with tempfile.TemporaryDirectory() as tmp:
        adapters, scan = make_inputs(Path(tmp))
        rows = [("baseline", {}), ("baseline, lean", {})] + variants
        for run in range(args.runs):
            for name, env in rows[run % len(rows):] + rows[:run % len(rows)]:  # each row in turn goes first
                for attempt in range(3):  # a free port taken by another process meanwhile ends a start
                    try:
                        results[name].append(run_baseline(args.timeout, "lean" if "lean" in name else "plain")
                                             if name.startswith("baseline") else
                                             run_serve(adapters, scan, env, args.timeout))
                        break
                    except RuntimeError as err:
                        print(f"{name}: a start failed, trying again ({str(err).splitlines()[-1][:200]})", flush=True)
                else:
                    raise SystemExit(f"{name}: three starts failed")
            print(f"run {run + 1}/{args.runs}: " + json.dumps({k: v[-1] for k, v in results.items()}), flush=True)
        phases = run_phases(adapters, scan)
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n")
    print(table(results))
    print("\n| one start, step by step (child process) | ends at s | takes s |\n|---|---:|---:|")
    last = 0.0
    for step, at in phases.items():
        print(f"| {step} | {at:.1f} | {at - last:.1f} |")
        last = at
    if args.out:
        args.out.write_text(json.dumps({"runs": results, "phases": phases}, indent=1))


if __name__ == "__main__":
    main()
