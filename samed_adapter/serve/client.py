"""A client of a samed-adapter server: ``segment --server URL`` plans and writes here, the
server segments.

Inputs are found, checked and skipped (``--continue``) exactly as by a local run
(:func:`samed_adapter.segment.pipeline.segment_files` with a ``runner``); each input goes up as
it is (NIfTI) or zipped (one DICOM series), and the files that come back are written where a
local run writes them, atomically, and only those a local run would write.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Sequence, Union

from ..adapter_file.config import AdapterConfig
from ..io.files import atomic_path
from .settings import TOKEN_VARIABLE
from .uploads import UPLOAD

#: environment variable a client's token may come from (the server's own name for it).
CLIENT_TOKEN_VARIABLE = TOKEN_VARIABLE


class ServerError(OSError):
    """The server refused or failed a request; ``status`` is its HTTP code (0: not reached).

    An OSError, as a file that cannot be read is: the command line reports it in one line."""

    def __init__(self, message: str, status: int = 0, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class RemoteAdapter:
    """What a client knows of an adapter on a server: enough to plan outputs and compare records."""

    name: str
    config: AdapterConfig
    fingerprint: str
    base_fingerprint: str


class ServerClient:
    """``ServerClient(url, token=...)``: the native API of `samed-adapter serve`.

    Args:
        url: e.g. ``http://127.0.0.1:8000``.
        token: the server's bearer token (None: ``SAMED_SERVE_TOKEN`` if set).
        timeout: seconds to wait for one answer.
        retries: how often a request answered 503 (the server's queue is full, or a replica is
            being replaced) is sent again, after the wait the server asks for.
    """

    def __init__(self, url: str, token: Optional[str] = None, *, timeout: float = 600.0, retries: int = 5) -> None:
        import requests

        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--server {url}: give an http:// or https:// address, e.g. http://127.0.0.1:8000")
        self.session = requests.Session()
        token = token if token is not None else os.environ.get(CLIENT_TOKEN_VARIABLE)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout
        self.retries = retries
        self._allow_base_mismatch = False

    def _request(self, method: str, route: str, **kwargs: Any) -> Any:
        import requests

        try:
            answer = self.session.request(method, self.url + route, timeout=self.timeout, **kwargs)
        except requests.RequestException as err:
            raise ServerError(f"cannot reach the server at {self.url} ({type(err).__name__}); is `samed-adapter "
                              "serve` running there?") from None
        if answer.status_code != 200:
            try:
                why = answer.json().get("error") or answer.text
            except (ValueError, AttributeError):  # not JSON, or JSON but not an object
                why = answer.text.strip()[:300] or answer.reason
            try:
                wait = float(answer.headers.get("Retry-After", 0))
            except ValueError:
                wait = 0.0
            raise ServerError(f"the server answered {answer.status_code}: {why}", answer.status_code, wait)
        return answer

    def adapters(self) -> list[dict[str, Any]]:
        """``GET /v1/adapters``: one dict per adapter (name, class_names, backbone, fingerprint, ...)."""
        body = self._json("/v1/adapters", "adapters")
        self._allow_base_mismatch = bool(body.get("allow_base_mismatch", False))
        return body["adapters"]

    def _json(self, route: str, key: str) -> dict[str, Any]:
        """``GET route``'s JSON object, which must hold a list of objects under ``key`` (ServerError
        otherwise: a peer that is not a samed-adapter server, or answers something else)."""
        try:
            body = self._request("GET", route).json()
        except ValueError:
            body = None
        listed = body.get(key) if isinstance(body, dict) else None
        if not isinstance(listed, list) or not all(isinstance(item, dict) for item in listed):
            raise ServerError(f"the server at {self.url} answered GET {route} without a list of {key}: is it a "
                              "samed-adapter server (`samed-adapter serve`), of this version?", 502)
        return body

    def adapter(self, name: str) -> RemoteAdapter:
        """The adapter ``name`` as the server serves it, or its version N for ``NAME@N`` (as
        ``GET /v1/adapters/NAME/versions`` lists it); ServerError listing what it serves otherwise."""
        from urllib.parse import quote

        from ..learning.versions import VersionError, parse_ref

        try:
            base, number = parse_ref(name)
        except VersionError as err:
            raise ServerError(str(err), 400) from None
        entries = {str(entry.get("name")): entry for entry in self.adapters()}
        if base not in entries:
            raise ServerError(f"the server at {self.url} serves no adapter named {base!r}; it serves: "
                              f"{', '.join(entries) or '(none)'}", 404)
        entry = entries[base]
        config = AdapterConfig.from_dict(_config(entry))
        fingerprint = self._text(entry, "fingerprint", base)
        if number is not None:
            listed = self._json(f"/v1/adapters/{quote(base, safe='')}/versions", "versions")["versions"]
            found = next((v for v in listed if v.get("version") == number), None)
            if found is None:
                raise ServerError(f"adapter {base!r} on the server at {self.url} has no version {number}; it has "
                                  f"{', '.join(str(v.get('version')) for v in listed) or 'none'}", 404)
            fingerprint = self._text(found, "fingerprint", name)
        return RemoteAdapter(name, config, fingerprint, self._text(entry, "base_fingerprint", base))

    def _text(self, entry: dict[str, Any], key: str, name: str) -> str:
        """``entry[key]`` of a listed adapter, a string (ServerError where the server sent none)."""
        value = entry.get(key)
        if not isinstance(value, str) or not value:
            raise ServerError(f"the server at {self.url} lists adapter {name!r} without its {key}: is it a "
                              "samed-adapter server (`samed-adapter serve`), of this version?", 502)
        return value

    @property
    def allow_base_mismatch(self) -> bool:
        """Whether the server applies adapters made for other SAM weights (part of each record)."""
        return self._allow_base_mismatch

    def segment(self, job: Any, options: Any, adapter: RemoteAdapter) -> tuple[list[Path], list[str]]:
        """Send one job's input, write what comes back where a local run writes it: (files, messages)."""
        from ..segment.outputs import output_files, writing_outputs

        names = list(adapter.config.class_names or [])
        opts = job.options(options)
        planned = output_files(job.out, opts, names)
        # The server knows the input by a plain name of ours, so that every name a local run takes
        # (".ct.nii.gz", "a\\b.nii.gz", any character) goes up too; what it sends back for that name
        # is written under the input's own, file for file in the order output_files lists them.
        remote = _remote_label(job.out)
        with tempfile.TemporaryDirectory(prefix="samed-client-") as tmp:
            upload, upload_name = _upload(job, Path(tmp))
            for attempt in range(self.retries + 1):
                try:
                    with open(upload, "rb") as fh:
                        answer = self._request("POST", "/v1/segment", data=_form(opts, adapter, remote.name),
                                               files={"file": (upload_name, fh)})
                    break
                except ServerError as err:
                    if err.status != 503 or attempt == self.retries:
                        raise
                    time.sleep(min(30.0, err.retry_after or 2.0**attempt))
        try:
            archive = zipfile.ZipFile(io.BytesIO(answer.content))
            # The server names the input "the upload"; here it has its own name again.
            messages = [str(m).replace(UPLOAD, str(job.source))
                        for m in json.loads(archive.comment or b"{}").get("messages", [])]
        except (zipfile.BadZipFile, ValueError) as err:
            raise ServerError(f"the server's answer is not a zip of outputs ({err})") from None
        allowed = {r.relative_to(remote.parent).as_posix(): p
                   for r, p in zip(output_files(remote, opts, names), planned, strict=True)}
        members = archive.namelist()
        unexpected = [m for m in members if m not in allowed or PurePosixPath(m).is_absolute()]
        if unexpected or len(members) != len(planned):
            raise ServerError(f"the server sent {members} but a local run writes {sorted(allowed)}; nothing was "
                              "written (is the server's samed-adapter another version?)")
        # Under the same claim as a local run's: another run writing these outputs is waited for.
        with writing_outputs(job.out, planned, opts.record) as written:
            for member in members:  # in the server's order: the record last, so it says all the rest is complete
                path = allowed[member]
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp_path, open(tmp_path, "xb") as out:
                    out.write(archive.read(member))
                written.append(path)
        return written, messages

    def runner(self, adapter: RemoteAdapter, workers: int = 2) -> Callable[[Sequence[Any], Any, Callable], None]:
        """A ``segment_files`` runner: ``workers`` inputs in flight at once, so that the server's
        batches fill with slices of several of them."""

        def run(jobs: Sequence[Any], options: Any, report: Callable) -> None:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="samed-client")
            try:
                futures = [(job, pool.submit(self.segment, job, options, adapter)) for job in jobs]
                for job, future in futures:
                    try:
                        files, messages = future.result()
                    except Exception as err:  # noqa: BLE001 - reported per input; the others go on
                        report(job, err, [])
                    else:
                        report(job, files, messages)
            finally:
                # Ctrl-C (or an error) stops the run: inputs not yet sent are dropped, the few in
                # flight finish writing. A plain `with` would send every input left first.
                pool.shutdown(wait=True, cancel_futures=True)

        return run


def _config(entry: dict[str, Any]) -> dict[str, Any]:
    config = entry.get("config")
    if isinstance(config, dict):
        return config
    raise ServerError("the server's adapter list carries no config (is it another version of samed-adapter?)")


def _form(options: Any, adapter: RemoteAdapter, name: str) -> dict[str, str]:
    """``options`` as ``POST /v1/segment``'s form fields (the command line's names)."""
    form = {"adapter": adapter.name, "name": name, "output_type": ",".join(options.output_types),
            "statistics": str(options.statistics).lower(), "split": str(options.split).lower(),
            "probabilities": str(options.save_probabilities).lower(), "overlay": str(options.overlay).lower()}
    names = list(adapter.config.class_names or [])
    if options.classes is not None:
        form["classes"] = ",".join(names[c - 1] for c in options.classes)
    if options.preprocessed:
        form["window"] = "none"
    elif options.window is not None:
        form["window"] = ",".join(repr(float(v)) for v in options.window)
    if options.percentiles is not None:
        form["percentiles"] = ",".join(repr(float(v)) for v in options.percentiles)
    return form


def _remote_label(label_path: Path) -> Path:
    """What the server is asked to call ``label_path`` (``input.nii.gz`` or ``input.nii`` beside it),
    a name its plain-file-name rule takes whatever the input is called here."""
    return label_path.with_name("input.nii" if label_path.name.lower().endswith(".nii") else "input.nii.gz")


def _upload(job: Any, tmp: Path) -> tuple[Path, str]:
    """The file to send for ``job`` and the name it goes up under: a NIfTI as it is, a DICOM
    series zipped (its slice files only)."""
    from ..io.dicom_folders import list_dicom_series
    from ..io.paths import image_suffix

    source = Path(job.source)
    if job.series is None and source.is_file() and image_suffix(source) in (".nii", ".nii.gz"):
        return source, f"input{image_suffix(source)}"
    if not job.is_dicom:
        raise ServerError(f"{source}: a server segments NIfTI volumes and DICOM series; segment 2-D PNG and NPY "
                          "images locally (without --server)")
    if job.series is not None:
        files: Sequence[Path] = job.series.files
    elif source.is_dir():
        series = list_dicom_series(source)
        files = series[0].files if len(series) == 1 else [p for s in series for p in s.files]
    else:
        files = [source]
    archive = tmp / "series.zip"
    with zipfile.ZipFile(archive, "x", compression=zipfile.ZIP_STORED) as zf:
        for i, path in enumerate(files):
            zf.write(path, f"{i:06d}.dcm")
    return archive, "input.zip"


def segment_on_server(inputs: Sequence[Union[str, os.PathLike]], output_dir: Union[str, os.PathLike], *,
                      server: str, adapter: str, token: Optional[str] = None, workers: int = 2,
                      **kwargs: Any) -> list[Any]:
    """:func:`samed_adapter.segment.pipeline.segment_files` with a server doing the segmenting:
    the same outputs, and the same results (``on_result``, ``skip_existing``, ...)."""
    from ..segment.pipeline import segment_files

    client = ServerClient(server, token)
    remote = client.adapter(adapter)
    kwargs.setdefault("adapter_name", adapter)
    return segment_files(inputs, output_dir, sam=None, adapter=remote, runner=client.runner(remote, workers),
                         allow_base_mismatch=client.allow_base_mismatch, **kwargs)
