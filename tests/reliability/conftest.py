"""The reliability suite: faults, overload and bad input tried on purpose (docs/RELIABILITY.md).

Every test here declares its scenario with the ``scenario`` fixture::

    def test_x(scenario):
        s = scenario("optimize killed during registration", fault="SIGKILL in register",
                     expected="no alias on an unvalidated version; re-run succeeds")
        ...
        s.observe("v1 validated, alias candidate -> v2 after re-run")

The row (scenario, fault, expected, observed, pass/fail from pytest's own outcome) is appended to
the JSON-lines file named by ``BLADEFLOW_RELIABILITY_REPORT`` when that variable is set;
``python -m tests.reliability.report`` turns the file into the table ``make reliability`` prints.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest


@dataclass
class Scenario:
    name: str
    fault: str
    expected: str
    observed: list[str] = field(default_factory=list)
    test: str = ""

    def observe(self, text: str) -> None:
        """Record what actually happened (shown in the report; say numbers, not adjectives)."""
        self.observed.append(text)


_KEY = pytest.StashKey[list[Scenario]]()


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Iterator[Callable[..., Scenario]]:
    made: list[Scenario] = []
    request.node.stash[_KEY] = made

    def make(name: str, *, fault: str, expected: str) -> Scenario:
        s = Scenario(name=name, fault=fault, expected=expected, test=request.node.nodeid)
        made.append(s)
        return s

    yield make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    target = os.environ.get("BLADEFLOW_RELIABILITY_REPORT")
    made = item.stash.get(_KEY, None)
    if not target or not made:
        return
    # one row per scenario, written once: after the call phase, or at setup when setup failed
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        status = "pass" if rep.passed else ("skip" if rep.skipped else "FAIL")
        with Path(target).open("a", encoding="utf-8") as fh:
            for s in made:
                row = asdict(s) | {
                    "status": status,
                    "seconds": round(rep.duration, 1),
                    "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
                if status == "FAIL":
                    row["observed"] = [*s.observed, _short(rep.longreprtext)]
                fh.write(json.dumps(row) + "\n")


def _short(text: str, limit: int = 200) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
    msg = " ".join(ln[1:].strip() for ln in lines[:3]) or text.strip().splitlines()[-1:][0]
    return msg[:limit]
