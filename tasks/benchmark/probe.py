"""One untimed run of a candidate at each batch size the benchmark will time it at.

The benchmark times every model in one interleaved run, so one model that cannot run at some batch
size would end it for all. When that happens the flow probes each candidate alone and drops the
ones that fail, with the reason, before timing the rest again.
"""

from __future__ import annotations

from bladeflow.core.contract import ModelArtifact, SessionConfig
from bladeflow.core.runtime import make_session
from bladeflow.tasks.validate.data import Dataset, fixed_batch, tile


def probe(
    artifact: ModelArtifact, session: SessionConfig, data: Dataset, batch_sizes: list[int]
) -> str | None:
    """None when the model runs at every batch size it accepts, else the first failure's reason."""
    fixed = fixed_batch(artifact.signature)
    sizes = [fixed] if fixed is not None else batch_sizes
    where = "loading it"
    try:
        sess = make_session(artifact.path, session)
        names = [o.name for o in artifact.signature.outputs]
        for bs in sizes:
            where = f"batch {bs}"
            sess.run(names, tile(data, bs))
    except Exception as exc:  # noqa: BLE001 - any failure rejects this candidate, with its reason
        return f"benchmark failed at {where}: {one_line(exc)}"
    return None


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): a reason for a table cell."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}"
