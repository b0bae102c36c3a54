"""What a long command shows while it works, and where everything else goes.

The console gets bladeflow's own progress -- stage by stage and candidate by candidate, with the
time spent and what is being waited on -- and the result. Everything else (Prefect's task logs,
third-party warnings such as PyTorch's TracerWarnings or ONNX Runtime's quantization hints, and
tracebacks) goes to the run's log file, ``<home>/logs/<command>-<time>.log``, whose path is
printed at the end and logged to the MLflow run. ``-v`` shows it all live; ``-q`` prints only
the result.

On a terminal the progress is a live table (rich); in a pipe or CI log it is one line per event.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

QUIET, NORMAL, VERBOSE = -1, 0, 1
# The Prefect tasks of the flows (their @task names) and the stage each belongs to.
_STAGE_OF = {
    "convert": "convert",
    "prepare-data": "prepare-data",
    "reference-outputs": "optimize",
    "accuracy-budget": "optimize",
    "build-candidate": "optimize",
    "validate": "validate",
    "benchmark": "benchmark",
    "benchmark-on-pool": "benchmark",
    "download-incumbent": "benchmark",
    "register": "register",
}
# Tasks that run once per candidate, and the prefix of their run names (flows/stages.py).
_PER_CANDIDATE = {"build-candidate": "build-", "validate": "validate-"}
STAGES = ("convert", "prepare-data", "optimize", "validate", "benchmark", "register")


@dataclass
class _Row:
    what: str
    state: str = "waiting"
    started: float | None = None
    ended: float | None = None
    note: str = ""

    def elapsed(self) -> str:
        if self.started is None:
            return ""
        end = (
            time.monotonic() if self.state in {"running", "building", "validating"} else self.ended
        )
        return f"{(end or time.monotonic()) - self.started:5.1f} s"


BUILT = "optimize: built"  # a build's summary line (bladeflow.flows.stages.build_candidate_task)


@dataclass
class Progress:
    """Stage and candidate rows, updated from the flow's log records."""

    stages: dict[str, _Row] = field(default_factory=lambda: {s: _Row(s) for s in STAGES})
    candidates: dict[str, _Row] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # for plain (non-terminal) output

    def event(self, task: str, task_run: str, message: str) -> None:
        """Fold one log record of a task run into the rows."""
        stage = _STAGE_OF.get(task)
        if stage is None:
            return
        now = time.monotonic()
        row = self.stages[stage]
        if row.started is None:
            # A task logs little before it ends: a stage starts when the one before it ended.
            ends = [r.ended for r in self.stages.values() if r.ended is not None]
            row.started, row.state = max(ends, default=now), "running"
            self.lines.append(f"{stage}: started")
        cand = None
        if task in _PER_CANDIDATE:
            name = task_run.removeprefix(_PER_CANDIDATE[task])
            cand = self.candidates.setdefault(name, _Row(name, started=now))
            if cand.state in {"waiting", "built"}:
                cand.state = "building" if task == "build-candidate" else "validating"
        if message.startswith("Finished in state"):
            self._finished(task, task_run, row, cand, "Completed" in message, now)
        elif cand is not None and task == "build-candidate" and message.startswith(BUILT):
            cand.note = message.split(": ", 2)[-1][:60]  # what recovery kept in fp32 / token-wise
            self.lines.append(message[:140])
        elif (
            cand is not None
            and task == "validate"
            and (" passed" in message or "FAILED" in message)
        ):
            cand.state = "passed" if " passed" in message else "rejected"
            cand.note = message.split("(", 1)[1][:60] if "(" in message else cand.note
            self.lines.append(message[:140] + ("..." if len(message) > 140 else ""))
        elif not message.startswith(("Created task run", "Executing")):
            row.note = message[:70]
            self.lines.append(message[:140])
        for earlier in STAGES[: STAGES.index(stage)]:
            r = self.stages[earlier]
            if r.state == "running":
                r.state = "done"
                r.ended = r.ended or now

    def _finished(
        self, task: str, task_run: str, row: _Row, cand: _Row | None, done: bool, now: float
    ) -> None:
        if cand is not None:
            if done and cand.state not in {"passed", "rejected"}:
                cand.state = "built" if task == "build-candidate" else "judged"
            elif not done:
                cand.state = "FAILED"
            cand.ended = now
        elif not done:
            row.state = "FAILED"
        else:
            row.note = ""
        row.ended = now
        if not done:
            self.lines.append(f"{task_run}: FAILED")

    def finish(self) -> None:
        now = time.monotonic()
        for r in self.stages.values():
            if r.state == "running":
                r.state, r.ended = "done", now

    def render(self) -> Any:
        from rich.table import Table

        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        for col in ("stage / candidate", "state", "time", "now"):
            table.add_column(col)
        for r in self.stages.values():
            style = {"FAILED": "red", "running": "cyan", "done": "green"}.get(r.state, "dim")
            table.add_row(r.what, f"[{style}]{r.state}[/]", r.elapsed(), r.note)
            if r.what == "validate":
                for c in self.candidates.values():
                    cs = {"passed": "green", "rejected": "yellow", "FAILED": "red"}.get(c.state, "")
                    label = f"[{cs}]{c.state}[/]" if cs else c.state
                    table.add_row(f"  {c.what}", label, c.elapsed(), c.note)
        return table


class _FlowRecords(logging.Handler):
    """Feeds the task runs' log records to the progress display."""

    def __init__(self, progress: Progress, on_change: Any) -> None:
        super().__init__(level=logging.INFO)
        self.progress, self.on_change = progress, on_change

    def emit(self, record: logging.LogRecord) -> None:
        run, task = getattr(record, "task_run_name", None), getattr(record, "task_name", None)
        if not run or not task:
            return
        with contextlib.suppress(Exception):  # the display never breaks the run
            self.progress.event(str(task), str(run), record.getMessage())
            self.on_change()


class RunConsole:
    """Context manager around a flow call: progress on the console, the rest in a log file."""

    def __init__(self, home: Path, command: str, verbosity: int = NORMAL) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_path = home / "logs" / f"{command}-{stamp}-{os.getpid()}.log"
        self.verbosity = verbosity
        self.progress = Progress()
        self._saved_fd: int | None = None
        self._terminal: IO[str] | None = None
        self._handlers: list[tuple[logging.Logger, logging.Handler]] = []
        self._live: Any = None
        self._printed = 0

    def __enter__(self) -> RunConsole:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = logging.FileHandler(self.log_path, encoding="utf-8")
        log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.captureWarnings(True)
        warnings.simplefilter("default")
        for name in ("", "prefect", "py.warnings"):
            self._add(logging.getLogger(name), log_file)
        if self.verbosity >= VERBOSE:
            return self
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self._terminal = self._redirect_stderr()
        if self.verbosity == NORMAL:
            self._add(logging.getLogger("prefect"), _FlowRecords(self.progress, self._refresh))
            if self._terminal is not None and self._terminal.isatty():
                from rich.console import Console
                from rich.live import Live

                console = Console(file=self._terminal)
                # Live would otherwise route sys.stdout/stderr (MLflow's progress bars, Prefect's
                # console handler) onto the terminal above the table: they belong in the log.
                self._live = Live(
                    self.progress.render(),
                    console=console,
                    refresh_per_second=4,
                    redirect_stdout=False,
                    redirect_stderr=False,
                )
                self._live.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.finish()
        self._refresh()
        if self._live is not None:
            self._live.stop()
        if exc is not None and not _is_user_error(exc):
            logging.getLogger("bladeflow").error("run failed", exc_info=exc)
        for logger, handler in self._handlers:
            logger.removeHandler(handler)
            handler.close()
        self._restore_stderr()
        if self.verbosity > QUIET:
            print(f"log: {self.log_path}", file=sys.stderr, flush=True)

    def _add(self, logger: logging.Logger, handler: logging.Handler) -> None:
        logger.addHandler(handler)
        self._handlers.append((logger, handler))

    def _redirect_stderr(self) -> IO[str] | None:
        """Send fd 2 (Python's and C++ libraries' stderr) to the log file; keep the terminal."""
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return None  # e.g. a test runner's buffer: logging alone goes to the file
        sys.stderr.flush()
        self._saved_fd = os.dup(fd)
        target = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(target, fd)
        os.close(target)
        return os.fdopen(os.dup(self._saved_fd), "w", buffering=1)

    def _restore_stderr(self) -> None:
        if self._saved_fd is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved_fd, sys.stderr.fileno())
        os.close(self._saved_fd)
        self._saved_fd = None
        if self._terminal is not None:
            self._terminal.close()

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.progress.render())
        elif self._terminal is not None and self.verbosity == NORMAL:
            for line in self.progress.lines[self._printed :]:
                print(line, file=self._terminal, flush=True)
            self._printed = len(self.progress.lines)


def _verdict(message: str) -> bool:
    """A validate task's "validate: NAME passed" / "... FAILED (why)" line."""
    return message.startswith("validate:") and (" passed" in message or " FAILED" in message)


def _is_user_error(exc: BaseException) -> bool:
    from bladeflow.core.errors import BladeflowError

    return isinstance(exc, BladeflowError | KeyboardInterrupt | SystemExit)


def attach_log(settings: Any, run_id: str | None, path: Path) -> None:
    """Log the run's log file to its MLflow run (best effort: the result is already decided)."""
    if not run_id or not path.is_file():
        return
    from bladeflow.core import registry
    from bladeflow.core.mlflow_client import mlflow_client

    with contextlib.suppress(Exception):  # an unreachable store must not turn success into error
        client = mlflow_client(settings)
        client.log_artifact(run_id, str(path), "logs")
        client.set_tag(run_id, registry.RUN_TAG_LOG_FILE, str(path))


def stage_times(stages: list[Any]) -> str:
    """``where the time went: convert 3.1 s, ...`` from a result's stage list."""
    parts = [f"{s.stage} {s.elapsed_s:.1f} s" for s in stages]
    return "where the time went: " + ", ".join(parts) if parts else ""
