"""Release outcomes the CLI reports without a traceback (see ``bladeflow/errors.py``)."""

from __future__ import annotations

from bladeflow.core.errors import BladeflowError, UserInputError


class NotValidatedError(UserInputError):
    """The version is not tagged ``bladeflow.validated=true``: it may never get an alias."""


class ReleaseConflictError(BladeflowError):
    """Another release of the model holds the lease. Exit code 5."""

    exit_code = 5


class ReleaseRolledBackError(BladeflowError):
    """A gate failed (or approval was refused) and the new version was rolled back. Exit code 3.

    Attributes:
        reason: Why, as recorded in ``bladeflow.release.reason``.
        run_id: The MLflow run of the release.
    """

    exit_code = 3

    def __init__(self, message: str, reason: str, run_id: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.run_id = run_id
