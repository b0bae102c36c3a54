"""Fault-injection points for the reliability tests (tests/reliability/test_pipeline_faults.py).

``BLADEFLOW_FAULT_PAUSE_AT=<point>`` makes the process print ``bladeflow-fault: paused at
<point> (pid N)`` on stderr when it reaches that point and then wait there until it is killed, so
a test can SIGKILL it at an exact place (a stage boundary, or between two registry writes).
With ``BLADEFLOW_FAULT_PAUSE_S=<seconds>`` it goes on after that long instead (time for a test to
stop a server under the running flow).
Unset (the default, and always in production), :func:`fault_point` only reads one environment
variable. Points: the optimize stages (``convert``, ``prepare-data``, ``optimize``, ``validate``,
``benchmark``, ``register``) and inside registration ``register.model_logged``,
``register.version_created``, ``register.validated``, ``register.alias_set``.
"""

from __future__ import annotations

import os
import sys
import time

ENV_PAUSE_AT = "BLADEFLOW_FAULT_PAUSE_AT"
ENV_PAUSE_S = "BLADEFLOW_FAULT_PAUSE_S"
# A safety net: a paused process nobody kills gives up after this long instead of hanging forever.
_MAX_PAUSE_S = 600.0


def fault_point(name: str) -> None:
    """Pause here (until killed) when ``BLADEFLOW_FAULT_PAUSE_AT`` names this point."""
    if os.environ.get(ENV_PAUSE_AT) != name:
        return
    sys.stderr.write(f"bladeflow-fault: paused at {name} (pid {os.getpid()})\n")
    sys.stderr.flush()
    resume_after = os.environ.get(ENV_PAUSE_S)
    pause = min(float(resume_after), _MAX_PAUSE_S) if resume_after else _MAX_PAUSE_S
    deadline = time.monotonic() + pause
    while time.monotonic() < deadline:
        time.sleep(0.2)
    if not resume_after:
        raise SystemExit(f"bladeflow-fault: nobody killed the process paused at {name}")
    sys.stderr.write(f"bladeflow-fault: resumed at {name}\n")
    sys.stderr.flush()
