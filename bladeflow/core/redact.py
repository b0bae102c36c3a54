"""Keep credentials out of everything bladeflow records: logs, MLflow params/tags, Prefect runs.

Two rules: a password in a URI's user-info (``http://user:pass@host``) becomes ``***``, and the
value of any environment variable whose name says it is a secret (``*SECRET*``, ``*PASSWORD*``,
``*TOKEN*``, ``*_KEY`` ...) is replaced wherever it appears.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@"
)
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY")
_MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask ordinary text


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names mark them as secrets, longest first."""
    env = os.environ if environ is None else environ
    values = {
        v for k, v in env.items() if _SECRET_NAME.search(k.upper()) and len(v) >= _MIN_SECRET_LEN
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """``text`` with URI passwords and secret environment values replaced by ``***``."""
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    for value in secret_values(environ):
        out = out.replace(value, MASK)
    return out


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``http://user:pass@host/x`` -> (``http://host/x``, user, password); others unchanged.

    User and password are percent-decoded (``p%40ss`` -> ``p@ss``): a URI must encode ``@``, ``:``
    and ``/`` in its user-info, and the server expects the decoded value.
    """
    parts = urlsplit(uri)
    if parts.scheme not in {"http", "https"} or "@" not in parts.netloc:
        return uri, None, None
    host = parts.netloc.rpartition("@")[2]
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return clean, user, password
