"""One typed error per way a DICOMweb server can fail a run, each a one-line message that says the fix.

Every call to a server goes through :func:`talking`, which turns what ``requests`` and
``dicomweb-client`` raise (HTTP errors, refused or dropped connections, timeouts) into these.
Messages name the server without any user name or password a URL may carry.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

__all__ = ["BadAnswerError", "DicomWebAuthError", "DicomWebConnectionError", "DicomWebError", "LimitError",
           "ServerFaultError", "StoreError", "StudyNotFoundError", "shown_url", "talking"]


class DicomWebError(RuntimeError):
    """A DICOMweb server could not do what a run asked; the message is one line that says the fix."""


class DicomWebAuthError(DicomWebError):
    """The server refused the credentials (HTTP 401) or the user's rights (HTTP 403)."""


class StudyNotFoundError(DicomWebError):
    """The server holds no such study (HTTP 404, or QIDO-RS found nothing), or not the series named."""


class DicomWebConnectionError(DicomWebError):
    """The server could not be reached, went away, timed out or failed (HTTP 5xx) during a run."""


class StoreError(DicomWebError):
    """STOW-RS refused some or all of the results of a series."""


class ServerFaultError(DicomWebError):
    """A server answered what no working server sends; the message names the server, the fault and the fix."""

    def __init__(self, server: str, problem: str, fix: str, what: str = "") -> None:
        self.server, self.problem, self.fix, self.what = server, problem, fix, what
        during = f" while {what}" if what else ""
        super().__init__(f"{server}: {problem}{during}; {fix}")

    def during(self, what: str) -> "ServerFaultError":
        """The same error, saying what the run was doing (the first one said wins)."""
        return self if self.what else type(self)(self.server, self.problem, self.fix, what)


class LimitError(ServerFaultError):
    """A server sent more, or took longer, than a bound of the run allows (see :mod:`.limits`)."""


class BadAnswerError(ServerFaultError):
    """A server's answer is not what was asked for: malformed DICOM JSON, a part that is not DICOM,
    an instance of another study, series or patient."""


def shown_url(url: str) -> str:
    """``url`` without the ``user:password@`` a URL may carry (never printed) and without its query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


_AUTH_HINT = ("check --dicomweb-user and the password (SAMED_DICOMWEB_PASSWORD or the prompt), or the bearer "
              "token (--dicomweb-token-env / SAMED_DICOMWEB_TOKEN)")


def _status_error(url: str, what: str, status: int, reason: str) -> DicomWebError:
    where = shown_url(url)
    if status == 401:
        return DicomWebAuthError(f"{where}: the server refused the credentials (HTTP 401) while {what}; {_AUTH_HINT}")
    if status == 403:
        return DicomWebAuthError(f"{where}: the user may not do this (HTTP 403) while {what}; ask the PACS's "
                                 "administrators for the right, or use another account")
    if status == 404:
        return StudyNotFoundError(f"{where}: not found (HTTP 404) while {what}; check the study and series UIDs "
                                  "(samed-adapter segment --dicomweb URL --query --patient-id ID lists the studies)")
    if status >= 500:
        return DicomWebConnectionError(f"{where}: the server failed (HTTP {status} {reason}) while {what}; try again "
                                       "later, with --continue to skip series already stored")
    return DicomWebError(f"{where}: the server answered HTTP {status} {reason} while {what}; check the URL (it "
                         "should be the DICOMweb root, e.g. http://host:8042/dicom-web)")


def _never_sent(err: Exception) -> bool:
    """Whether a connection error came before the request could reach the server (refused, no route)."""
    import requests
    from urllib3.exceptions import NewConnectionError

    if isinstance(err, requests.ConnectTimeout):
        return True
    cause = err.args[0] if err.args else None
    return isinstance(getattr(cause, "reason", cause), (NewConnectionError, ConnectionRefusedError))


@contextmanager
def talking(url: str, what: str, stored: Optional[str] = None, if_taken: Optional[str] = None) -> Iterator[None]:
    """Run the block's server calls; what they raise becomes a :class:`DicomWebError` about ``what``.

    ``stored``: what the run had stored before (for the message), e.g. ``"nothing was stored"``.
    ``if_taken``: instead of ``stored`` where the connection broke after the server may have
    taken the request (a STOW-RS it may have stored part of before it went away).
    """
    import json
    import logging

    import requests

    tail = f"; {stored}" if stored else ""
    # dicomweb-client's retry library logs every failed attempt as a warning with a traceback;
    # the error raised here says it in one line.
    quiet = logging.getLogger("retrying")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        yield
    except ServerFaultError as err:
        raise err.during(f"{what}{tail}") from None
    except (requests.exceptions.InvalidJSONError, json.JSONDecodeError) as err:
        raise BadAnswerError(shown_url(url), f"answered what is not JSON ({str(err)[:100]})",
                             "check the server and the URL (the DICOMweb root, e.g. http://host:8042/dicom-web)",
                             f"{what}{tail}") from None
    except requests.HTTPError as err:
        response = err.response
        status = response.status_code if response is not None else 0
        error = _status_error(url, what, status, response.reason if response is not None else "")
        raise type(error)(f"{error}{tail}") from None
    except (requests.ConnectionError, requests.Timeout) as err:
        kind = "did not answer in time" if isinstance(err, requests.Timeout) else "could not be reached or went away"
        if if_taken is not None and not _never_sent(err):
            kind = "did not answer in time" if isinstance(err, requests.Timeout) else "went away"
            raise DicomWebConnectionError(f"{shown_url(url)}: the server {kind} while {what}; {if_taken}; check that "
                                          "it runs, then run again with --continue, which stores what it lacks") \
                from None
        raise DicomWebConnectionError(f"{shown_url(url)}: the server {kind} while {what}{tail}; check that it runs "
                                      "and the URL, then run again with --continue") from None
    except requests.RequestException as err:  # a malformed URL, too many redirects, a broken answer
        detail = str(err)[:200]
        secret = urlsplit(url).password
        if secret:  # a password in the URL never reaches a message
            detail = detail.replace(secret, "***")
        raise DicomWebError(f"{shown_url(url)}: {type(err).__name__} while {what} ({detail}){tail}; check the URL "
                            "(the DICOMweb root, e.g. http://host:8042/dicom-web)") from None
    finally:
        quiet.setLevel(level)
