"""`segment --dicomweb URL`: segment studies on a PACS and store the results back (DICOMweb).

`add_arguments` declares the options on the `segment` parser; `check_arguments` runs first in
`cmd_segment` (so a wrong combination fails before any model is loaded) and says whether this
is a DICOMweb run; `run` takes over once `cmd_segment` has set up the SAM, the adapter and the
request, so that both paths check and build them the same way.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

__all__ = ["add_arguments", "check_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The DICOMweb options of `segment`."""
    web = parser.add_argument_group(
        "from a PACS (DICOMweb: QIDO-RS, WADO-RS, STOW-RS); no INPUT then, outputs as a local run on each series "
        "folder writes them")
    web.add_argument("--dicomweb", metavar="URL", help="the server's DICOMweb root, e.g. http://pacs:8042/dicom-web")
    web.add_argument("--study", metavar="UID", help="segment the series of this study (StudyInstanceUID)")
    web.add_argument("--series", metavar="UID", action="append",
                     help="only this series of the study (SeriesInstanceUID; repeat for several)")
    web.add_argument("--query", action="store_true",
                     help="segment every study matching --patient-id, --modality and --study-date (at least one); "
                          "each study's outputs go to OUTDIR/<StudyInstanceUID>/")
    web.add_argument("--patient-id", metavar="ID", help="with --query: studies of this PatientID")
    web.add_argument("--modality", metavar="M", help="with --query: studies holding this modality, e.g. CT")
    web.add_argument("--study-date", metavar="DATES",
                     help="with --query: studies of this date or range, e.g. 20240101-20241231 (also -20241231, "
                          "20240101-)")
    web.add_argument("--store", action="store_true",
                     help="send the DICOM-SEG / RTSTRUCT results back to the server (STOW-RS), one request per "
                          "series once all are segmented; a DICOM-SEG is made if --output-type asks for no DICOM "
                          "type. Without -o the outputs go to a temporary folder")
    web.add_argument("--store-to", metavar="URL", help="store on this DICOMweb server instead (implies --store)")
    web.add_argument("--dicomweb-user", metavar="NAME",
                     help="HTTP basic user; the password comes from SAMED_DICOMWEB_PASSWORD or a prompt, never a flag")
    web.add_argument("--dicomweb-token-env", metavar="VAR",
                     help="the environment variable holding a bearer token (default: SAMED_DICOMWEB_TOKEN, if set)")
    _add_limits(web)


def _typed(parse: Any) -> Any:
    """``parse`` for argparse: its ValueError's own words instead of argparse's "invalid value"."""
    def typed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    typed.__name__ = parse.__name__
    return typed


def _add_limits(web: Any) -> None:
    """What a run accepts from a server (a broken or hostile PACS): defaults no real study reaches."""
    from ..dicomweb.limits import Limits, parse_duration, parse_size, shown_size

    default = Limits()
    web.add_argument("--max-instance-size", metavar="SIZE", type=_typed(parse_size),
                     help=f"the most bytes of one instance (or one QIDO-RS answer) a server may send, e.g. 4G "
                          f"(default {shown_size(default.max_instance_bytes)})")
    web.add_argument("--max-series-size", metavar="SIZE", type=_typed(parse_size),
                     help=f"the most bytes of one series a server may send (default "
                          f"{shown_size(default.max_series_bytes)})")
    web.add_argument("--max-series", metavar="N", type=_typed(_positive),
                     help=f"the most series a study may have (default {default.max_series})")
    web.add_argument("--max-pages", metavar="N", type=_typed(_positive),
                     help=f"the most pages of one QIDO-RS search (default {default.max_pages})")
    web.add_argument("--max-run-time", metavar="TIME", type=_typed(parse_duration),
                     help=f"the most time the whole run may take, e.g. 90m, 48h; a server that sends slower is "
                          f"given up (default {int(default.max_run_time // 3600)}h)")


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a positive whole number")
    return int(text)


_LIMITS = ("max_instance_size", "max_series_size", "max_series", "max_pages", "max_run_time")
_WEB_ONLY = ("study", "series", "query", "patient_id", "modality", "study_date", "store", "store_to", "dicomweb_user",
             "dicomweb_token_env", *_LIMITS)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_arguments(args: argparse.Namespace) -> bool:
    """Whether this `segment` reads from a DICOMweb server; ValueError for options that do not go
    together (before any model is loaded)."""
    if args.dicomweb is None:
        given = [_flag(n) for n in _WEB_ONLY if getattr(args, n, None)]
        if given:
            raise ValueError(f"{given[0]} goes with --dicomweb URL (a DICOMweb server)")
        if not args.inputs:
            raise ValueError("give the inputs to segment (files or folders), or a study on a PACS with --dicomweb URL "
                             "--study UID")
        if args.output is None:
            raise ValueError("give the output folder with -o OUTDIR")
        return False
    if args.inputs:
        raise ValueError(f"--dicomweb segments a server's studies, so it takes no INPUT (got {args.inputs[0]}); "
                         "segment local files in another run")
    if (args.study is None) == (not args.query):
        raise ValueError("--dicomweb needs one of --study UID and --query (with --patient-id, --modality or "
                         "--study-date)")
    if args.series and args.study is None:
        raise ValueError("--series picks series of --study UID; give the study")
    if not args.query:
        given = [_flag(n) for n in ("patient_id", "modality", "study_date") if getattr(args, n)]
        if given:
            raise ValueError(f"{given[0]} is a filter of --query; add --query, or drop it with --study")
    if args.store_to is not None:
        args.store = True
    if args.output is None and not args.store:
        raise ValueError("give -o OUTDIR for the outputs, --store to send them back to the server, or both")
    if getattr(args, "server", None) is not None:
        raise ValueError("--dicomweb segments here; drop --server (a samed-adapter server cannot read from a PACS)")
    if args.num_parts != 1:
        raise ValueError("--num-parts splits local archives; with --dicomweb give each machine its own --study or "
                         "--query")
    if args.query:
        from ..dicomweb.query import check_study_date

        if not (args.patient_id or args.modality or args.study_date):
            raise ValueError("--query needs at least one of --patient-id, --modality and --study-date: without one "
                             "it would segment every study on the server")
        if args.study_date:
            check_study_date(args.study_date)
    return True


def run(args: argparse.Namespace, *, sam: Any, adapter: Any, request: dict[str, Any]) -> int:
    """Segment the study (or the studies a query finds) and print what became of each series.

    ``sam``, ``adapter`` and ``request`` are what `cmd_segment` built for a local run. Returns
    0, 1 when some series failed (the others went on), 2 for an error that stopped the run
    (one line on stderr), 130 for Ctrl-C.
    """
    from ..dicomweb import DicomWebError, segment_studies, segment_study
    from ..dicomweb.errors import shown_url
    from ..dicomweb.session import Credentials
    from ..io.printable import printable
    from .common import escaped, fail

    counts = {"stored": 0, "written": 0, "skipped": 0, "not segmented": 0, "failed": 0, "made again": 0}

    def show(result: Any) -> None:
        counts[result.status] += 1
        if result.redone:
            counts["made again"] += 1
            print(f"samed-adapter segment: note: {escaped(result.redone)}", file=sys.stderr)
        if result.status == "not segmented":
            print(f"samed-adapter segment: note: not segmented: {escaped(result.message)}", file=sys.stderr)
            return
        if result.status == "failed":
            print(f"samed-adapter segment: error: {escaped(result.message)} (skipped; continuing with the other "
                  "series)", file=sys.stderr)
            return
        for line in result.message.splitlines() if result.status != "skipped" else []:
            print(f"samed-adapter segment: warning: {escaped(line)}", file=sys.stderr)
        # Without -o the files lie in a temporary folder that is gone by the end: not worth naming.
        shown = "" if args.output is None else ", ".join(
            printable(str(f)) for f in result.files if not f.name.endswith(".samed-adapter.json"))
        what = {"skipped": "skipped, " + result.message.split(": ", 1)[-1],
                "stored": f"{shown}{'; ' if shown else ''}stored {len(result.stored)} instance(s)"}.get(result.status,
                                                                                                   shown)
        print(f"series {printable(result.name)} -> {what}")

    def list_studies(studies: list) -> None:
        print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} match the query"
              + (":" if studies else ""))
        for study in studies:
            print(f"  {study.uid}  patient {printable(study.patient_id) or '-'}  {study.date or '-'}  "
                  f"{'/'.join(study.modalities) or '-'}  {printable(study.description)}")

    prompt = getpass.getpass if sys.stdin is not None and sys.stdin.isatty() else None
    common = dict(
        sam=sam, adapter=adapter, store=args.store, store_to=args.store_to, skip_stored=args.continue_,
        overwrite=args.overwrite,
        device=args.device, merge=args.merge, allow_base_mismatch=args.allow_base_mismatch,
        engine="ray" if args.ray else args.engine, num_workers=args.num_workers, ray_address=args.ray_address,
        ray_workers=args.ray_workers, gpus_per_worker=args.gpus_per_worker, on_series=show, **request,
        max_instance_bytes=args.max_instance_size, max_series_bytes=args.max_series_size,
        max_series=args.max_series, max_pages=args.max_pages, max_run_time=args.max_run_time,
    )
    try:
        credentials = Credentials.resolve(args.dicomweb_user, token_env=args.dicomweb_token_env, prompt=prompt)
        if args.query:
            studies = segment_studies(args.dicomweb, patient_id=args.patient_id, modality=args.modality,
                                      study_date=args.study_date, output_dir=args.output, credentials=credentials,
                                      on_studies=list_studies, **common)
        else:
            studies = [segment_study(args.dicomweb, args.study, series=args.series, output_dir=args.output,
                                     credentials=credentials, **common)]
    except DicomWebError as err:
        fail("segment", str(err))
        return 2
    except KeyboardInterrupt:
        fail("segment", "interrupted; what was stored before is complete (one request per series), and a request "
                         "under way may be stored in part; run the same command with --continue to do the rest")
        return 130
    where = f" into {args.output}" if args.output is not None else ""
    stored = f", {counts['stored']} stored on {shown_url(args.store_to or args.dicomweb)}" if args.store else ""
    parts = [f"{counts['skipped']} skipped (results existed)"] if counts["skipped"] else []
    parts += [f"{counts['made again']} made again (the server's results did not count, listed above)"] \
        if counts["made again"] else []
    parts += [f"{counts['failed']} failed"] if counts["failed"] else []
    parts += [f"{counts['not segmented']} not segmented (listed above)"] if counts["not segmented"] else []
    total = sum(counts.values()) - counts["not segmented"] - counts["made again"]
    print(f"segmented {counts['stored'] + counts['written']} of {total} series of {len(studies)} "
          f"stud{'y' if len(studies) == 1 else 'ies'}{where}{stored}" + "".join(f", {p}" for p in parts))
    return 1 if counts["failed"] else 0
