"""HTTP Basic credentials for every API route (``--api-auth``, else ``--gradio-auth``).

Routes that we add beside Gradio are not covered by Gradio's login, so each of them checks the
``Authorization`` header itself, before the request body is read.  Comparison is constant-time over
every configured pair, so neither a user name nor a password prefix can be found by timing.
"""
from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass
from typing import Mapping

REALM = "webui"


@dataclass(frozen=True)
class BasicAuth:
    """The accepted ``(user, password)`` pairs; an empty tuple means the API is open."""

    credentials: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_settings(cls, settings) -> "BasicAuth":
        # A public listen with only --gradio-auth must not leave the API open: fall back to the UI login.
        return cls(tuple(settings.api_auth or settings.gradio_auth or ()))

    @property
    def enabled(self) -> bool:
        return bool(self.credentials)

    def check_header(self, header: str | None) -> str | None:
        """The user name if ``header`` carries valid credentials, else None."""
        given = parse_basic_header(header)
        if given is None:
            return None
        user, password = (part.encode("utf-8") for part in given)
        matched: str | None = None
        for known_user, known_password in self.credentials:
            # Evaluate both comparisons for every pair (no short-circuit) to keep timing flat.
            same_user = secrets.compare_digest(user, known_user.encode("utf-8"))
            same_password = secrets.compare_digest(password, known_password.encode("utf-8"))
            if same_user & same_password and matched is None:
                matched = known_user
        return matched

    def challenge_headers(self) -> Mapping[str, str]:
        return {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'}


def parse_basic_header(header: str | None) -> tuple[str, str] | None:
    """``"Basic dXNlcjpwYXNz"`` -> ``("user", "pass")``; None for anything else (never raises)."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def basic_header(user: str, password: str) -> str:
    """The ``Authorization`` header value for ``user``/``password`` (handy for tests and clients)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")
