"""Inter-process file locks (``fcntl.flock``) for set-up steps that must not run twice at once.

MLflow creates and migrates a new SQLite database on first use, without a lock of its own that
covers every step: two ``bladeflow optimize`` runs started together on a new home race through
the Alembic migrations and one fails. :func:`sqlite_setup_lock` serializes that first touch.
The lock is advisory and held by an open file, so the kernel releases it when the holder exits,
even on SIGKILL: a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from bladeflow.core.errors import BladeflowError

# A fresh database migrates in a few seconds; a waiter gives up long after that.
DEFAULT_TIMEOUT_S = 300.0
_POLL_S = 0.05


class LockTimeoutError(BladeflowError):
    """Another process held a set-up lock for longer than the timeout (exit code 1)."""


@contextlib.contextmanager
def file_lock(path: str | Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Raises:
        LockTimeoutError: the lock was not free within ``timeout_s``.
    """
    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"another bladeflow process held {lock_path} for more than "
                        f"{timeout_s:.0f} s; if none is running, delete the file and retry"
                    ) from None
                time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI; None for any other URI (or in-memory)."""
    parts = urlsplit(uri)
    if parts.scheme != "sqlite" or not parts.path or parts.path == "/:memory:":
        return None
    # The path part keeps one "/" too many: sqlite:///rel.db -> "/rel.db" (relative to the
    # working folder), sqlite:////abs.db -> "//abs.db".
    return Path(parts.path[1:])


@contextlib.contextmanager
def sqlite_setup_lock(uri: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Serialize the first-time set-up of the SQLite database behind ``uri``; no-op otherwise.

    The lock file lies next to the database (``<home>/mlflow.db.lock`` for the default
    ``sqlite:///<home>/mlflow.db``), so every process that uses that database shares it,
    whatever its ``BLADEFLOW_HOME``.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with file_lock(db.with_name(db.name + ".lock"), timeout_s):
        yield
