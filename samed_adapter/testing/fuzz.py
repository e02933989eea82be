"""The adapter-loading fuzz harness: run mutated adapter files through `samed_adapter.patch`.

A case (see `samed_adapter.testing.mutations`) passes when it ends in

  (a) an `AdapterError` subclass or a `FileNotFoundError` with a non-empty message, and the SAM
      is exactly as it was (state_dict bytes, module types, requires_grad, adapter config), or
  (b) a clean successful patch (the result is a SAMed model of the file's class count).

Anything else is a failure: another exception type (RuntimeError, ValueError, KeyError,
MemoryError, ...), an empty message, a changed SAM after an error, a case over the time limit (a
hang). `run_in_process` runs cases here (what the tests use); `benchmarks/fuzz_adapter.py` runs
them in worker subprocesses as well and prints the report.

A second harness (`IMAGE_KINDS`, `run_image_cases`) reads hostile images with
`samed_adapter.io.read_image`: NIfTI headers with huge, negative or zero dimensions, NaN pixdim or
affines, bad vox_offset or datatype, and gzip streams that are bombs, cut off, padded, followed by
garbage or a second member. Each must end in an `ImageReadError` (or a subclass) with a one-line
message, or a Volume, under `IMAGE_MEMORY_BOUND` of traced memory.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import shutil
import signal
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .fuzz_files import Fixture
from .mutations import KINDS, Case, make_case

# torch and samed_adapter are imported lazily: a process that only reads results does not pay for them.

SUCCESS = "success"
ALLOWED_NAMES = ("AdapterFormatError", "AdapterMismatchError", "BaseMismatchError", "FileNotFoundError",
                 "AdapterNotFoundError")


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process now (VmRSS of /proc/self/status), 0 where unavailable."""
    return rss_of("self")


def rss_of(pid) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0



class CaseTimeout(BaseException):
    """Raised by the alarm inside a case that ran past its time limit (a BaseException, so that no
    `except Exception` in the library turns it into an ordinary error)."""


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def state_digest(sam) -> dict[str, str]:
    """A fast fingerprint of everything a failed patch must leave alone: {part: digest}.

    Every state_dict tensor (its dtype, shape and bytes; byte equality is torch.equal for
    finite tensors), the module types, requires_grad flags, the patched config and image size.
    """
    import torch

    from samed_adapter.surgery.structure import get_stock_state

    parts: dict[str, str] = {}
    for name, tensor in sam.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h = hashlib.blake2b(f"{t.dtype}{tuple(tensor.shape)}".encode(), digest_size=16)
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
        parts[name] = h.hexdigest()
    parts["<module types>"] = _digest(f"{n}:{type(m).__module__}.{type(m).__qualname__}"
                                      for n, m in sam.named_modules())
    parts["<requires_grad>"] = _digest(f"{n}:{p.requires_grad}" for n, p in sam.named_parameters())
    stock = get_stock_state(sam)
    parts["<patched config>"] = _digest([stock.config.to_json() if stock is not None else "stock",
                                         str(sam.image_encoder.img_size)])
    return parts


def _digest(items) -> str:
    h = hashlib.blake2b(digest_size=16)
    for item in items:
        h.update(item.encode())
        h.update(b"\n")
    return h.hexdigest()


class Runner:
    """Runs cases in this process, on one reusable tiny SAM per starting state (`TARGETS`).

    A SAM is re-prepared (unpatched, then patched with the valid adapter) only after a case
    changed it, i.e. after a successful patch; its digest is taken once per preparation, and
    compared with a new one only after a failed patch.
    """

    def __init__(self, fx: Fixture, workdir: Path, timeout: Optional[float] = 5.0) -> None:
        self.fx = fx
        self.workdir = Path(workdir)
        self.timeout = timeout
        self.sams: dict = {}  # target -> SAM
        self.clean: set[str] = set()  # targets whose SAM is in its prepared state
        self.before: dict[str, dict[str, str]] = {}  # target -> digest of the prepared state

    def prepare(self, target: str):
        """The SAM of `target`, put (back) in that state if a case changed it."""
        import samed_adapter as sa

        if target in self.clean:
            return self.sams[target]
        sam = self.sams.get(target)
        if sam is None:
            sam = self.sams[target] = sa.build_sam("tiny", seed=0)
        sa.unpatch(sam)
        if target != "stock":
            variant = "decoder" if target == "decoder" else "plain"
            sa.patch(sam, self.fx.adapters[variant], merge=target == "merged")
        self.before[target] = state_digest(sam)
        self.clean.add(target)
        return sam

    def discard(self, target: str) -> None:
        """Forget a SAM whose state is unknown (interrupted, or changed by a failed patch)."""
        self.sams.pop(target, None)
        self.clean.discard(target)

    def materialize(self, case: Case) -> Path:
        """Lay the case out on disk: the mutated file, a folder, or nothing at the path."""
        for old in self.workdir.iterdir():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        path = self.workdir / f"case{case.index}.safetensors"
        if case.mutation.layout == "dir":
            path.mkdir()
        elif case.mutation.layout == "file":
            path.write_bytes(case.mutation.data)
        return path

    def run(self, case: Case) -> dict:
        """Run one case; returns {"outcome", "failed", "message", "seconds"}."""
        import samed_adapter as sa

        sam = self.prepare(case.target)
        path = self.materialize(case)
        arg = str(path) if case.index % 2 else path
        start = time.perf_counter()
        error: Optional[BaseException] = None
        model = None
        try:
            with time_limit(self.timeout):
                model = sa.patch(sam, arg, merge=case.merge)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # CaseTimeout and every other type are classified below
            error = err
        seconds = time.perf_counter() - start
        if isinstance(error, CaseTimeout):
            self.discard(case.target)  # interrupted mid-patch: start again from a fresh SAM
            return _result("hang", True, f"no result within {self.timeout:g} s", seconds)
        if error is None:
            self.clean.discard(case.target)
            return self._check_success(case, sam, model, seconds)
        name = type(error).__name__
        message = _safe_str(error)
        try:
            after = state_digest(sam)
        except Exception as err:  # the failed patch left a SAM that cannot even be read
            self.discard(case.target)
            return _result(f"SAM broken after {name}", True, f"state_dict() raised {type(err).__name__}: "
                           f"{_safe_str(err)[:200]}; {name}: {message[:300]}", seconds)
        before = self.before[case.target]
        changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
        if changed:
            self.discard(case.target)
            return _result(f"SAM changed after {name}", True,
                           f"{len(changed)} parts differ (e.g. {', '.join(changed[:3])}); {name}: {message[:300]}",
                           seconds)
        if not isinstance(error, (sa.AdapterError, FileNotFoundError)):
            return _result(name, True, message[:500], seconds)
        if not message.strip():
            return _result(f"{name} (empty message)", True, "", seconds)
        return _result(name, False, message[:200], seconds)

    def _check_success(self, case: Case, sam, model, seconds: float) -> dict:
        import torch

        import samed_adapter as sa

        if not isinstance(model, sa.SAMed) or model.sam is not sam:
            return _result("success without a SAMed model", True, repr(type(model)), seconds)
        k = model.config.num_classes
        if sam.mask_decoder.num_mask_tokens != k + 1:
            return _result("success with the wrong decoder", True,
                           f"{sam.mask_decoder.num_mask_tokens} mask tokens for K={k}", seconds)
        size = model.config.image_size
        if case.index % 10 == 0 and size <= 256:
            try:
                with torch.no_grad():
                    out = model(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(case.index)))
            except Exception as err:
                return _result("success but forward fails", True, f"{type(err).__name__}: {_safe_str(err)[:300]}",
                               seconds)
            if out["masks"].shape != (1, k + 1, size, size):
                return _result("success but wrong output shape", True, str(tuple(out["masks"].shape)), seconds)
        return _result(SUCCESS, False, "", seconds)


def _safe_str(err: BaseException) -> str:
    try:
        return str(err)
    except Exception as inner:  # a message that cannot be formatted is itself a failure of clarity
        return f"<str() raised {type(inner).__name__}>"


def _result(outcome: str, failed: bool, message: str, seconds: float) -> dict:
    return {"outcome": outcome, "failed": failed, "message": message, "seconds": round(seconds, 4)}


# --------------------------------------------------------------------------- running many


@dataclass
class Report:
    results: list[dict]  # one per case: index, kind, variant, target, merge, note, outcome, failed, message, seconds
    seconds: float
    rss: dict  # memory figures

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.results if r["failed"]]


def run_in_process(cases: int, seed: int = 0, timeout: Optional[float] = 5.0, kinds: Optional[list[str]] = None,
                   indices: Optional[list[int]] = None, fx: Optional[Fixture] = None) -> Report:
    """Run cases in this process (one SAM); what the tests use."""
    fx = fx or Fixture()
    start = time.perf_counter()
    results = []
    rss = {}
    with tempfile.TemporaryDirectory(prefix="samed-fuzz-") as tmp:
        runner = Runner(fx, Path(tmp), timeout)
        for n, index in enumerate(indices if indices is not None else range(cases)):
            case = make_case(seed, index, fx, kinds)
            results.append(case_record(case, runner.run(case)))
            if n == min(100, cases // 10):
                gc.collect()
                rss["start"] = rss_bytes()
    gc.collect()
    rss["end"] = rss_bytes()
    rss.setdefault("start", rss["end"])
    return Report(results, time.perf_counter() - start, rss)


def case_record(case: Case, result: dict) -> dict:
    return {"index": case.index, "kind": case.kind, "variant": case.variant, "target": case.target,
            "merge": case.merge, "note": case.mutation.note[:200], **result}



# --------------------------------------------------------------------------- reporting


def markdown(report: Report) -> str:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in report.results:
        by_kind[r["kind"]][r["outcome"]] += 1
    ok_columns = [SUCCESS] + [n for n in ALLOWED_NAMES if any(n in c for c in by_kind.values())]
    lines = ["| kind | cases | " + " | ".join(ok_columns) + " | failures |",
             "|---|---:|" + "---:|" * len(ok_columns) + "---|"]
    total: Counter = Counter()
    for name in [k for k in KINDS if k in by_kind] + sorted(set(by_kind) - set(KINDS)):
        counts = by_kind[name]
        total.update(counts)
        failed = {o: n for o, n in counts.items() if o not in ok_columns}
        cells = " | ".join(str(counts.get(c, 0) or "") for c in ok_columns)
        lines.append(f"| {name} | {sum(counts.values())} | " + cells
                     + " | " + (", ".join(f"{o}: {n}" for o, n in sorted(failed.items())) or "0") + " |")
    failed = {o: n for o, n in total.items() if o not in ok_columns}
    lines.append(f"| **all** | **{sum(total.values())}** | " + " | ".join(f"**{total.get(c, 0)}**" for c in ok_columns)
                 + " | **" + (", ".join(f"{o}: {n}" for o, n in sorted(failed.items())) or "0") + "** |")
    return "\n".join(lines)


def failure_examples(report: Report, per_group: int = 2) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in report.failures:
        groups[(r["kind"], r["outcome"])].append(r)
    lines = []
    for (name, outcome), items in sorted(groups.items()):
        lines.append(f"- {name} -> {outcome}: {len(items)} cases, e.g.")
        for r in items[:per_group]:
            lines.append(f"    - case {r['index']} ({r['variant']} file onto a {r['target']} SAM, merge={r['merge']}; "
                         f"{r['note']}): {r['message'][:240]}")
    return "\n".join(lines)


def memory_summary(report: Report) -> str:
    mib = 2**20
    if "workers" in report.rss:
        parts = []
        for i, w in enumerate(report.rss["workers"]):
            if not w["cases"]:
                continue
            line = (f"worker {i}: {w['cases']} cases, RSS at the end {w['last_rss'] / mib:.0f} MiB, "
                    f"max {w['max_rss'] / mib:.0f} MiB")
            if w["first_rss"]:
                line += f"; growth from case 100 to the end {(w['last_rss'] - w['first_rss']) / mib:+.1f} MiB"
            if w["rss_1000"]:
                line += f", from case 1000 to the end {(w['last_rss'] - w['rss_1000']) / mib:+.1f} MiB"
            parts.append(line)
        return "\n".join(parts)
    return (f"RSS {report.rss['start'] / mib:.0f} MiB after warm-up, {report.rss['end'] / mib:.0f} MiB at the end "
            f"({(report.rss['end'] - report.rss['start']) / mib:+.1f} MiB)")


# --------------------------------------------------------------------------- hostile images

# A second harness, for `samed_adapter.io.read_image`: hostile NIfTI headers and gzip streams. A
# case passes when it ends in an `ImageReadError` (or a subclass) with a one-line message, or in a
# Volume, and the peak of traced memory (tracemalloc: numpy buffers and Python objects) stays
# under IMAGE_MEMORY_BOUND, so no header claim or gzip stream makes the reader allocate what the
# file does not hold. Anything else (MemoryError, an OverflowError, a nibabel or zlib exception,
# a traceback in the message) is a failure.

#: Every image case's files are under 1 MiB on disk and hold at most 4 MiB of voxels; a reader
#: that allocates more was made to by a claim or a stream, not by the data.
IMAGE_MEMORY_BOUND = 32 * 2**20

#: How many MiB of zeros the gzip bomb inflates to if read to the end.
BOMB_MIB = 256


def _nifti_bytes(shape=(8, 8, 4), dtype="<i2", **fields) -> bytes:
    """A valid single-file NIfTI-1 (header, 4 extension bytes, voxels) with header ``fields`` set."""
    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.dtype(dtype))
    header.set_sform(np.diag([0.8, 0.8, 2.5, 1.0]), code=1)
    header.set_qform(np.diag([0.8, 0.8, 2.5, 1.0]), code=1)
    header["vox_offset"] = 352
    for name, value in fields.items():
        header[name] = value
    voxels = np.arange(int(np.prod(shape)), dtype=dtype).tobytes()
    return header.binaryblock + b"\x00" * 4 + voxels


def _with_dims(*dims: int) -> bytes:
    """A NIfTI whose dim field is ``dims`` (dim[0] first), voxels of the valid 8 x 8 x 4 file after it."""
    raw = bytearray(_nifti_bytes())
    raw[40:56] = struct_pack("<8h", *(list(dims) + [1] * (8 - len(dims))))
    return bytes(raw)


def struct_pack(fmt: str, *values) -> bytes:
    import struct

    return struct.pack(fmt, *values)


def _patched(offset: int, fmt: str, *values) -> bytes:
    raw = bytearray(_nifti_bytes())
    raw[offset:offset + len(struct_pack(fmt, *values))] = struct_pack(fmt, *values)
    return bytes(raw)


def _bomb() -> bytes:
    """gzip: a 8 x 8 x 4 int16 NIfTI followed by BOMB_MIB MiB of zeros (about BOMB_MIB KiB compressed)."""
    import zlib

    stream = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [stream.compress(_nifti_bytes())]
    block = b"\x00" * 2**20
    parts += [stream.compress(block) for _ in range(BOMB_MIB)]
    return b"".join(parts) + stream.flush()


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1, mtime=0)


_NAN, _INF = float("nan"), float("inf")

#: kind -> (file suffix, a function of a random.Random giving the file's bytes).
IMAGE_KINDS: dict = {
    "valid": (".nii", lambda rng: _nifti_bytes()),
    "valid_gz": (".nii.gz", lambda rng: _gz(_nifti_bytes())),
    "huge_dims": (".nii", lambda rng: _with_dims(3, 32767, 32767, rng.choice([32767, 1024, 2]))),
    "huge_dims_gz": (".nii.gz", lambda rng: _gz(_with_dims(4, 32767, 32767, 32767, 32767))),
    "negative_dims": (".nii", lambda rng: _with_dims(3, 8, rng.choice([-1, -8, -32768]), 4)),
    "zero_dims": (".nii", lambda rng: _with_dims(3, 8, 0, 4)),
    "bad_dim0": (".nii", lambda rng: _with_dims(rng.choice([0, -1, 8, 32767]), 8, 8, 4)),
    "nan_pixdim": (".nii", lambda rng: _nifti_bytes(qform_code=0, sform_code=0,
                                                   pixdim=[1, rng.choice([_NAN, _INF, -_INF]), 1, 1, 1, 1, 1, 1])),
    "zero_pixdim": (".nii", lambda rng: _nifti_bytes(qform_code=0, sform_code=0, pixdim=[1, 0, 0, 0, 1, 1, 1, 1])),
    "nan_sform": (".nii", lambda rng: _nifti_bytes(qform_code=0, srow_x=[rng.choice([_NAN, _INF]), 0, 0, 0])),
    "nan_qform": (".nii", lambda rng: _nifti_bytes(sform_code=0, quatern_b=_NAN, qoffset_x=_NAN)),
    "bad_vox_offset": (".nii", lambda rng: _nifti_bytes(vox_offset=rng.choice([-352.0, 0.0, _NAN, _INF, 1e30,
                                                                                 2.0**31, 100.0, 351.0]))),
    "bad_vox_offset_gz": (".nii.gz", lambda rng: _gz(_nifti_bytes(vox_offset=rng.choice([2.0**40, 60e6, _NAN])))),
    "bad_datatype": (".nii", lambda rng: _patched(70, "<h", rng.choice([0, 3, 9999, -1]))),
    "bad_sizeof_hdr": (".nii", lambda rng: _patched(0, "<i", rng.choice([0, 349, -348, 2**31 - 1]))),
    "huge_scl_slope": (".nii", lambda rng: _nifti_bytes(scl_slope=rng.choice([1e38, _INF, _NAN]), scl_inter=0.0)),
    "truncated": (".nii", lambda rng: _nifti_bytes()[:rng.choice([0, 4, 200, 348, 352, 400])]),
    "header_bytes_flipped": (".nii", lambda rng: _flip(_nifti_bytes(), rng, 348)),
    "gzip_bomb": (".nii.gz", lambda rng: _bomb()),
    "gzip_truncated": (".nii.gz", lambda rng: (lambda z: z[:rng.randint(1, len(z) - 1)])(_gz(_nifti_bytes()))),
    "gzip_trailing_garbage": (".nii.gz", lambda rng: _gz(_nifti_bytes()) + rng.choice([b"garbage", b"\xff" * 64,
                                                                                    b"\x1f\x8b"])),
    # Zero bytes after the last member are padding (tape blocks), which gzip itself allows.
    "gzip_zero_padding": (".nii.gz", lambda rng: _gz(_nifti_bytes()) + b"\x00" * rng.choice([1, 64, 4096])),
    "gzip_second_member": (".nii.gz", lambda rng: _gz(_nifti_bytes()) + _gz(b"\x00" * 4096)),
    "gzip_bad_crc": (".nii.gz", lambda rng: (lambda z: z[:-8] + bytes(b ^ 0xFF for b in z[-8:-4]) + z[-4:])(
        _gz(_nifti_bytes()))),
    "gzip_not_gzip": (".nii.gz", lambda rng: _nifti_bytes()),
    "gzip_flipped": (".nii.gz", lambda rng: _flip(_gz(_nifti_bytes()), rng, None)),
}


def _flip(data: bytes, rng, within) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(within or len(raw))
        raw[at] ^= 1 << rng.randrange(8)
    return bytes(raw)


def run_image_case(path: Path, max_voxels: Optional[int] = None) -> dict:
    """Read ``path`` with ``read_image``: ``{"outcome", "failed", "message", "seconds", "peak"}``.

    outcome is "success", the exception's class name, or "over memory bound".
    """
    import tracemalloc

    from ..io import ImageReadError, read_image
    from ..io.limits import resolve_max_voxels

    limit = resolve_max_voxels(max_voxels)
    start = time.perf_counter()
    tracemalloc.start()
    try:
        read_image(path, max_voxels=limit)
        outcome, failed, message = SUCCESS, False, ""
    except ImageReadError as err:
        message = _safe_str(err)
        outcome, failed = type(err).__name__, not message or "\n" in message or "Traceback" in message
    except BaseException as err:  # noqa: BLE001 - any other type is what the harness reports
        if isinstance(err, KeyboardInterrupt):
            raise
        outcome, failed, message = type(err).__name__, True, _safe_str(err)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    if peak > IMAGE_MEMORY_BOUND:
        failed, message = True, f"peak {peak / 2**20:.1f} MiB over {IMAGE_MEMORY_BOUND / 2**20:.0f} MiB; {message}"
    result = _result(outcome, failed, message, time.perf_counter() - start)
    result["peak"] = peak
    return result


def run_image_cases(workdir: Path, kinds: Optional[list[str]] = None, repeats: int = 1, seed: int = 0) -> list[dict]:
    """Every kind (or ``kinds``) ``repeats`` times with seeds ``seed``, ``seed + 1``, ...: one record per case."""
    import random

    records = []
    for name in kinds or list(IMAGE_KINDS):
        suffix, make = IMAGE_KINDS[name]
        for r in range(repeats):
            rng = random.Random(f"{seed}:{name}:{r}")
            path = Path(workdir) / f"{name}_{r}{suffix}"
            path.write_bytes(make(rng))
            try:
                records.append({"kind": name, "repeat": r, **run_image_case(path)})
            finally:
                path.unlink()
    return records
