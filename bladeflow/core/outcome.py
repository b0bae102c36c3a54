"""One vocabulary of outcomes: for stages, candidates, runs, nightly checks and releases.

Every status bladeflow records or prints is one of these enum members plus a free-text reason.
The string values are part of the registry schema (the ``bladeflow.outcome`` run tag, nightly's
table, ``--json`` output): keep them.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel


class Status(enum.StrEnum):
    """How a stage or a candidate ended."""

    OK = "OK"  # done; for a candidate: built and passed the accuracy gate
    FAILED = "FAILED"  # tried and failed: the reason says where and why
    SKIPPED = "SKIPPED"  # not tried here (e.g. TensorRT without a GPU): the reason says why


class Outcome(enum.StrEnum):
    """How a run ended, as written to the ``bladeflow.outcome`` tag and reported to users."""

    # optimize runs
    REGISTERED = "registered"  # a validated version was registered
    NOT_IMPROVED = "not_improved"  # must_beat: not significantly faster, nothing registered
    ACCURACY_GATE_FAILED = "accuracy_gate_failed"  # no candidate passed, nothing registered
    ERROR = "error"  # bad input or a failure; the reason says which
    KILLED = "killed"  # the process running it died; marked by the next run (stale-run reaping)
    # nightly checks
    IMPROVED = "improved"  # re-optimized and registered a faster version
    UNCHANGED = "skipped"  # nothing that makes up the nightly key changed
    FAILED = "failed"  # the re-optimization failed
    # releases
    IN_PROGRESS = "in_progress"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class Verdict(BaseModel):
    """A status with its reason, e.g. a candidate SKIPPED because the machine has no GPU."""

    status: Status
    reason: str = ""
