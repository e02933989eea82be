"""Fuzz adapter loading: mutate valid adapter files and patch each one onto a tiny SAM.

The mutations live in `samed_adapter.testing.mutations`, the harness in
`samed_adapter.testing.fuzz` (both used by tests/test_fuzz.py); this script runs them at scale.
Two valid adapter files are made from a tiny random SAM (`build_sam("tiny", seed=0)`): the plain
one and the decoder-LoRA variant (K = 3, image size 128). Every case takes one of them, applies
one mutation (see `KINDS`: truncation, flipped bytes, a wrong header length, hostile metadata
JSON, wrong dtypes/shapes/names, non-finite values, a wrong version or backbone, ...) and calls
`samed_adapter.patch` with the file on a SAM that is stock, patched (plain or decoder variant)
or patched and merged. A case passes when it ends in

  (a) an `AdapterError` subclass or a `FileNotFoundError` with a non-empty message, and the SAM
      is exactly as it was (state_dict bytes, module types, requires_grad, adapter config), or
  (b) a clean successful patch (the result is a SAMed model of the file's class count).

Anything else is a failure: another exception type (RuntimeError, ValueError, KeyError,
MemoryError, ...), an empty message, a changed SAM after an error, a case over the time limit
(`--timeout`, a hang), a worker that dies (a crash) or grows past `--max-rss-mib`.

Cases are reproducible: case i of seed s is drawn from `random.Random(f"samed-fuzz/{s}/{i}")`,
so `--case I` reruns one case alone and `--dump DIR` writes its mutated file. Cases run in
`--workers` subprocesses (each keeps one SAM; a hung or crashed worker is killed and replaced),
or in this process with `--workers 0` (the tests do that).

    python benchmarks/fuzz_adapter.py [--cases 10000] [--seed 0] [--workers 2] [--timeout 5]
    python benchmarks/fuzz_adapter.py --case 1234 --dump /tmp/case   # one case, verbosely

Prints a Markdown table of outcomes per mutation kind and exits 1 if any case failed.
"""


from __future__ import annotations

import argparse
import gc
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from samed_adapter.testing.fuzz import (Report, Runner, case_record, failure_examples, markdown, memory_summary,
                                        rss_bytes, rss_of, run_in_process)
from samed_adapter.testing.fuzz_files import Fixture
from samed_adapter.testing.mutations import KINDS, make_case

# torch and samed_adapter's model code are imported lazily: the orchestrating process only reads results.

_PROTOCOL = "@@fuzz "


def _worker(seed: int, timeout: float, kinds: Optional[list[str]]) -> None:
    """Subprocess loop: read case indices from stdin, write one JSON line per case to stdout."""
    import warnings

    warnings.simplefilter("ignore")
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the library prints stays off the protocol channel
    fx = Fixture()
    with tempfile.TemporaryDirectory(prefix="samed-fuzz-") as tmp:
        runner = Runner(fx, Path(tmp), timeout)
        out.write(_PROTOCOL + json.dumps({"ready": True, "rss": rss_bytes()}) + "\n")
        out.flush()
        done = 0
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            index = int(line)
            case = make_case(seed, index, fx, kinds)
            out.write(_PROTOCOL + json.dumps({"begin": index, "kind": case.kind, "variant": case.variant,
                                               "target": case.target, "merge": case.merge,
                                               "note": case.mutation.note[:200]}) + "\n")
            out.flush()
            result = case_record(case, runner.run(case))
            done += 1
            if done % 50 == 0:
                gc.collect()
            result["rss"] = rss_bytes()
            out.write(_PROTOCOL + json.dumps({"end": index, **result}) + "\n")
            out.flush()


class _Worker:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, bufsize=1)
        self.buffer = ""
        self.ready = False
        self.current: Optional[dict] = None  # the "begin" message of the case in flight
        self.sent_at = 0.0
        self.first_rss: Optional[int] = None  # after case 100 (warm-up over)
        self.rss_1000: Optional[int] = None
        self.last_rss = 0
        self.max_rss = 0
        self.cases = 0

    def send(self, index: int) -> None:
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()
        self.sent_at = time.monotonic()
        self.current = {"begin": index}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_workers(cases: int, seed: int, workers: int, timeout: float, hard_timeout: float, max_rss: int,
                kinds: Optional[list[str]], progress: bool = True) -> Report:
    """Run cases in `workers` subprocesses; a worker that hangs, crashes or grows too big is replaced."""
    args = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(seed), "--timeout", str(timeout)]
    if kinds:
        args += ["--kinds", ",".join(kinds)]
    start = time.perf_counter()
    queue = list(range(cases))[::-1]
    results: list[dict] = []
    lifetimes: list[dict] = []
    sel = selectors.DefaultSelector()
    pool: list[_Worker] = []
    logs = Path(tempfile.mkdtemp(prefix="samed-fuzz-logs-"))
    spawned = [0]

    def spawn() -> None:
        spawned[0] += 1
        w = _Worker(args, logs / f"worker{spawned[0]}.log")
        os.set_blocking(w.proc.stdout.fileno(), False)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        pool.append(w)

    def retire(w: _Worker, outcome: Optional[str], message: str) -> None:
        if outcome is not None and w.current is not None:
            c = w.current
            results.append({"index": c["begin"], "kind": c.get("kind", "?"), "variant": c.get("variant", "?"),
                            "target": c.get("target", "?"), "merge": c.get("merge"), "note": c.get("note", ""),
                            "outcome": outcome, "failed": True, "message": message,
                            "seconds": round(time.monotonic() - w.sent_at, 3)})
        sel.unregister(w.proc.stdout)
        w.kill()
        pool.remove(w)
        lifetimes.append({"cases": w.cases, "first_rss": w.first_rss, "rss_1000": w.rss_1000, "last_rss": w.last_rss,
                          "max_rss": w.max_rss})

    for _ in range(max(1, min(workers, cases))):
        spawn()
    last_print = time.monotonic()
    while queue or any(w.current is not None for w in pool):
        for key, _ in sel.select(timeout=0.05):
            w: _Worker = key.data
            try:
                chunk = w.proc.stdout.read()
            except (BlockingIOError, ValueError):
                chunk = None
            if chunk:
                w.buffer += chunk
            while "\n" in w.buffer:
                line, w.buffer = w.buffer.split("\n", 1)
                if not line.startswith(_PROTOCOL):
                    continue
                msg = json.loads(line[len(_PROTOCOL):])
                if msg.get("ready"):
                    w.ready = True
                elif "begin" in msg:
                    w.current = msg
                elif "end" in msg:
                    rss = msg.pop("rss", 0)
                    msg["index"] = msg.pop("end")
                    results.append(msg)
                    w.current = None
                    w.cases += 1
                    w.last_rss, w.max_rss = rss, max(w.max_rss, rss)
                    if w.cases == 100:
                        w.first_rss = rss
                    elif w.cases == 1000:
                        w.rss_1000 = rss
        now = time.monotonic()
        for w in list(pool):
            if w.current is not None:
                if w.proc.poll() is not None:
                    retire(w, "crash", f"worker exited with code {w.proc.returncode}")
                elif now - w.sent_at > hard_timeout:
                    retire(w, "hang", f"no result within {hard_timeout:g} s (killed)")
                elif rss_of(w.proc.pid) > max_rss:
                    retire(w, "memory", f"worker RSS over {max_rss / 2**20:.0f} MiB (killed)")
            elif w.proc.poll() is not None:
                if not w.ready:
                    tail = w.log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"a fuzz worker failed to start (exit code {w.proc.returncode}):\n{tail}")
                retire(w, None, "")
        while queue and len(pool) < workers:
            spawn()
        for w in pool:
            if w.ready and w.current is None and queue:
                w.send(queue.pop())
        if progress and now - last_print > 30:
            last_print = now
            failed = sum(r["failed"] for r in results)
            print(f"  ... {len(results)}/{cases} cases, {failed} failures, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    for w in list(pool):
        retire(w, None, "")
    shutil.rmtree(logs, ignore_errors=True)
    results.sort(key=lambda r: r["index"])
    rss = {"workers": lifetimes}
    return Report(results, time.perf_counter() - start, rss)



def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="subprocesses (default: one per CPU); 0 runs in this process")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--max-rss-mib", type=float, default=4096, help="a worker above this RSS is killed (a failure)")
    parser.add_argument("--kinds", help="comma-separated mutation kinds to draw from (default: all)")
    parser.add_argument("--exclude-kinds", help="comma-separated mutation kinds to leave out")
    parser.add_argument("--case", type=int, help="run this one case in this process and print it")
    parser.add_argument("--dump", help="with --case: write the mutated file into this folder")
    parser.add_argument("--json", metavar="PATH", help="also write every case's result as JSON lines here")
    parser.add_argument("--list-kinds", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    kinds = args.kinds.split(",") if args.kinds else None
    if args.exclude_kinds:
        kinds = [k for k in (kinds or list(KINDS)) if k not in set(args.exclude_kinds.split(","))]
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    if args.list_kinds:
        print("\n".join(KINDS))
        return 0
    if args.worker:
        _worker(args.seed, args.timeout, kinds)
        return 0
    if args.case is not None:
        fx = Fixture()
        case = make_case(args.seed, args.case, fx, kinds)
        print(case.describe())
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            if case.mutation.data is not None:
                out = Path(args.dump) / f"case{case.index}.safetensors"
                out.write_bytes(case.mutation.data)
                print(f"wrote {out}")
        report = run_in_process(1, args.seed, args.timeout, kinds, indices=[args.case], fx=fx)
        r = report.results[0]
        print(f"-> {r['outcome']}{' (FAILURE)' if r['failed'] else ''} in {r['seconds']} s: {r['message']}")
        return 1 if r["failed"] else 0

    print(f"fuzzing adapter loading: {args.cases} cases, seed {args.seed}, {args.workers} workers, "
          f"{args.timeout:g} s per case, {len(kinds or KINDS)} mutation kinds", flush=True)
    if args.workers > 0:
        report = run_workers(args.cases, args.seed, args.workers, args.timeout, args.timeout + 30,
                             int(args.max_rss_mib * 2**20), kinds)
    else:
        report = run_in_process(args.cases, args.seed, args.timeout, kinds)
    if args.json:
        with open(args.json, "w") as fh:
            for r in report.results:
                fh.write(json.dumps(r) + "\n")
    print()
    print(markdown(report))
    print()
    seconds = [r["seconds"] for r in report.results]
    per_case = report.seconds / max(1, len(seconds)) * 1000
    print(f"{len(report.results)} cases in {report.seconds:.0f} s ({per_case:.1f} ms "
          f"per case wall; slowest case {max(seconds, default=0):.2f} s); {len(report.failures)} failures")
    print(memory_summary(report))
    if report.failures:
        print("\nfailures (rerun one with --case N):")
        print(failure_examples(report))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
