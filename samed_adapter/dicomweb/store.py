"""STOW-RS: the DICOM results of one series go to the server in one request.

A series' SEG and RTSTRUCT are sent together, and only once every output of that series was
written (the segment job writes an input's outputs all together or not at all). A server that
refuses the request stores nothing of it; one that takes it and then goes away may hold part of
it (the client cannot know: the error says so, and ``--continue`` stores what it lacks); one
that stores some instances and refuses others (STOW-RS answers 202 with a FailedSOPSequence) is
asked to delete what it stored, and the error says whether it did.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import StoreError, shown_url, talking

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dicomweb_client import DICOMwebClient

__all__ = ["store_series"]

# PS3.18 table I.2-3 and PS3.4 annex B: why a STOW-RS server refused an instance.
_FAILURES = {0xA700: "the server is out of resources", 0xA900: "the data set does not match its SOP class",
             0xC000: "the server cannot understand the instance", 0x0110: "the server failed to process it",
             0x0122: "the server does not store this SOP class", 0x0124: "the server refused it (not authorised)",
             0xA770: "the server is out of resources"}


def _reason(item: Any) -> str:
    code = item.get("FailureReason")
    try:
        return _FAILURES.get(int(code), f"failure reason 0x{int(code):04X}")
    except (TypeError, ValueError):
        return "no reason given"


def store_series(client: "DICOMwebClient", url: str, study_uid: str, files: Sequence[Path], what: str,
                 stored_before: Sequence[str] = ()) -> list[str]:
    """Send ``files`` (the DICOM results of one series) to the study in one STOW-RS request.

    Args:
        what: how messages name the series (``series 2_axial``).
        stored_before: the names of the series whose results the run stored before, for messages.

    Returns:
        The SOPInstanceUIDs stored.

    Raises:
        StoreError: a file is not of ``study_uid`` (it would join another study), or the server
            refused some or all of the instances.
        DicomWebError: the request failed (see :mod:`.errors`): nothing of it was stored where the
            server refused it or could not be reached; where it went away or did not answer after
            taking the request, the message says that it may hold part of it (the client cannot
            know) and that ``--continue`` stores what it lacks.
    """
    import pydicom

    datasets = [pydicom.dcmread(f) for f in files]
    for path, ds in zip(files, datasets):
        if str(ds.get("StudyInstanceUID", "")) != study_uid:
            raise StoreError(f"{path}: belongs to study {ds.get('StudyInstanceUID', '(none)')}, not {study_uid}; "
                             "nothing of it was stored")
    before = f"the results of series {', '.join(stored_before)} were stored, " if stored_before else ""
    with talking(url, f"storing the results of {what} (STOW-RS)",
                 stored=f"{before}nothing of {what} and after" if before else "nothing was stored",
                 if_taken=f"{before}the server may hold part of the results of {what} (it took the request "
                          "and gave no answer), nothing after"):
        answer = client.store_instances(datasets, study_instance_uid=study_uid)
    failed = list(answer.get("FailedSOPSequence", []))
    stored = [str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])
              if "ReferencedSOPInstanceUID" in item]
    if not failed:
        return stored or [str(ds.SOPInstanceUID) for ds in datasets]  # a server may answer 200 with no body
    refused = "; ".join(f"{item.get('ReferencedSOPInstanceUID', '?')}: {_reason(item)}" for item in failed)
    undone = _delete(client, study_uid, datasets, stored)
    raise StoreError(f"{shown_url(url)}: refused {len(failed)} of the {len(datasets)} results of {what} ({refused}); "
                     f"{undone}")


def _delete(client: "DICOMwebClient", study_uid: str, datasets: Sequence[Any], stored: Sequence[str]) -> str:
    """Delete the instances of a half-stored series again; say how that went."""
    import requests

    if not stored:
        return "nothing of it was stored"
    series = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for ds in datasets}
    left = []
    for uid in stored:
        try:
            client.delete_instance(study_uid, series.get(uid, ""), uid)
        except (requests.RequestException, RuntimeError, ValueError):  # many servers do not offer DELETE
            left.append(uid)
    if not left:
        return "what it had stored of it was deleted again"
    return (f"the server keeps {len(left)} instance(s) of it ({', '.join(left)}) and did not delete them when asked: "
            "remove them in the PACS before running again")
