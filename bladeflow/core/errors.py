"""Exceptions: what the user can fix, versus what is our bug.

Every ``BladeflowError`` carries a message a person can act on; the CLI prints it as one paragraph
and exits with ``exit_code``. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class BladeflowError(Exception):
    """Base class for errors bladeflow reports without a traceback."""

    exit_code = 1


class UserInputError(BladeflowError):
    """The model, data, name or option given cannot be used. Exit code 2."""

    exit_code = 2


class ModelFileError(UserInputError):
    """A model file is missing, empty, corrupt or of an unsupported kind."""


class DataError(UserInputError):
    """Validation data does not match the model (names, shapes, dtypes, values)."""


class AccuracyGateError(BladeflowError):
    """No candidate passed the accuracy gate. Exit code 3.

    Attributes:
        reasons: Candidate name -> why it was rejected.
        run_id: The MLflow run that records the failed attempt.
    """

    exit_code = 3

    def __init__(self, message: str, reasons: dict[str, str], run_id: str | None = None):
        super().__init__(message)
        self.reasons = reasons
        self.run_id = run_id


class RegistryError(BladeflowError):
    """The MLflow tracking server or registry could not be used."""

    exit_code = 4
