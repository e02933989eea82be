"""A dicomweb-client for one server, with the authentication real servers ask for.

HTTP basic: a user name with its password from the argument, the ``SAMED_DICOMWEB_PASSWORD``
environment variable, or a prompt (never a command-line flag, which ``ps`` and shell histories
show). Bearer tokens: from the argument, an environment variable the caller names, or
``SAMED_DICOMWEB_TOKEN``. Nothing here prints or logs a password or token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from .errors import DicomWebError, shown_url
from .limits import Limits, bounded_session

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dicomweb_client import DICOMwebClient

__all__ = ["PASSWORD_ENV", "TOKEN_ENV", "Credentials", "open_client"]

PASSWORD_ENV = "SAMED_DICOMWEB_PASSWORD"
TOKEN_ENV = "SAMED_DICOMWEB_TOKEN"
#: Seconds to wait for a server's answer (each request); a PACS that takes longer is taken as gone.
TIMEOUT = 60.0


@dataclass(frozen=True)
class Credentials:
    """Who a run is to the server: a user and password (HTTP basic), a bearer token, or nobody.

    The password and token are kept out of ``repr`` so that a traceback or a log line never
    shows them.
    """

    user: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    token: Optional[str] = field(default=None, repr=False)

    @classmethod
    def resolve(cls, user: Optional[str] = None, password: Optional[str] = None, token: Optional[str] = None, *,
                token_env: Optional[str] = None, prompt: Optional[Callable[[str], str]] = None) -> "Credentials":
        """The credentials a run uses, from what was given and the environment.

        Args:
            user: HTTP basic user; its password is ``password``, else ``$SAMED_DICOMWEB_PASSWORD``,
                else ``prompt("Password for USER: ")`` (e.g. :func:`getpass.getpass`).
            token: a bearer token; else the variable ``token_env`` names (which must be set),
                else ``$SAMED_DICOMWEB_TOKEN`` when no user is given.

        Raises:
            DicomWebError: both a user and a token, a named variable that is unset or empty, or
                a user without any password and no way to ask for one.
        """
        if token is None and token_env is not None:
            token = os.environ.get(token_env)
            if not token:
                raise DicomWebError(f"--dicomweb-token-env names {token_env}, which is not set (or empty); export "
                                    "the token in it")
        if token is None and user is None:
            token = os.environ.get(TOKEN_ENV) or None
        if user is not None and token is not None:
            raise DicomWebError("give either a user (HTTP basic) or a bearer token, not both; unset "
                                f"{TOKEN_ENV} or drop --dicomweb-user")
        if user is not None and password is None:
            password = os.environ.get(PASSWORD_ENV)
            if password is None and prompt is not None:
                password = prompt(f"Password for {user}: ")
            if password is None:
                raise DicomWebError(f"no password for DICOMweb user {user!r}: set {PASSWORD_ENV} (it is never "
                                    "taken from a flag)")
        return cls(user, password, token)


def open_client(url: str, credentials: Optional[Credentials] = None, *, timeout: float = TIMEOUT,
                limits: Optional[Limits] = None) -> "DICOMwebClient":
    """A ``dicomweb_client.DICOMwebClient`` for the DICOMweb root ``url`` (e.g. ``http://host:8042/dicom-web``).

    Requests that fail are not retried (dicomweb-client would retry a 503 for about 15 s): a run
    reports a failed server at once, and ``--continue`` is how to try again. Every answer is
    read under ``limits`` (default :class:`~.limits.Limits`, its clock starting now).

    Raises:
        DicomWebError: ``url`` is not an http(s) URL, or dicomweb-client is not installed.
    """
    from urllib.parse import urlsplit

    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise DicomWebError(f"--dicomweb {shown_url(url)!r} is not an http(s) URL; give the DICOMweb root, e.g. "
                            "http://host:8042/dicom-web")
    try:
        from dicomweb_client import DICOMwebClient
    except ImportError:
        raise DicomWebError("DICOMweb needs dicomweb-client; install it with pip install 'samed-adapter[dicomweb]'") \
            from None
    credentials = credentials or Credentials()
    session = bounded_session(url, limits or Limits())
    if credentials.user is not None:
        session.auth = (credentials.user, credentials.password or "")
    elif credentials.token is not None:
        session.headers["Authorization"] = f"Bearer {credentials.token}"
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)
    return client
