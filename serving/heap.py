"""Keep the garbage collector's full passes off the request path.

A serving process holds a large heap of long-lived objects (MLflow and its pandas/pyarrow/
SQLAlchemy imports, the model's loader state). Python's full (generation 2) collection walks all
of them; under load on 2 shared cores one pass stopped the event loop for 0.3-1.5 s, so every
request in flight answered that much later: the p99 of a whole measurement window. ``gc.freeze``
moves the objects that exist now into a permanent generation that collections never walk;
what requests allocate afterwards is still collected as usual.
"""

from __future__ import annotations

import asyncio
import gc

from bladeflow.serving.fleet import Fleet


def freeze() -> None:
    """Collect once, then exempt every surviving object from later collections."""
    gc.collect()
    gc.freeze()


def served(fleet: Fleet) -> tuple[int, ...]:
    """Identity of the loaded runners: changes when a version is loaded or retired."""
    return tuple(
        id(runner) for slot in fleet.slots.values() for runner in slot.deployment.runners().values()
    )


async def keep_frozen(fleet: Fleet, interval_s: float = 1.0) -> None:
    """Freeze again after every change of the served versions (loading adds long-lived objects).

    Without a collection first: it walked everything a load allocated (MLflow's lazy imports
    among it) and took 0.5 s on a busy machine, a pause while serving the other versions. The
    price is that reference cycles a load left behind are never freed: once per version.
    """
    seen = served(fleet)
    while True:
        await asyncio.sleep(interval_s)
        current = served(fleet)
        if current != seen:
            seen = current
            gc.freeze()
