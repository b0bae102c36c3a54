"""A release serves champion and canary each with its own ``bladeflow.serving_config``: the fleet
reads the tag of each version it loads (real MLflow on SQLite, real ONNX Runtime, in process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import mlflow

from bladeflow.core import registry
from bladeflow.serving.fleet import Fleet
from bladeflow.serving.metrics import Metrics
from bladeflow.serving.model import ServeOptions
from tests.models import mlp
from tests.serving.conftest import Registry

KNOBS = ("max_batch_size", "batch_timeout_ms", "workers", "intra_op_threads")
CHAMPION_CONFIG = dict(zip(KNOBS, (4, 1.0, 1, 1), strict=True))
CANARY_CONFIG = dict(zip(KNOBS, (16, 5.0, 2, 2), strict=True))


def _knobs(options: ServeOptions) -> dict[str, float]:
    return {k: getattr(options, k) for k in KNOBS}


def test_champion_and_canary_each_run_their_own_tagged_config(
    reg: Registry, tmp_path: Path
) -> None:
    # setup: v1 champion and v2 canary at 25 %, each tagged with a different tuned config
    c = reg.client()
    v1 = reg.register("fleet-cfg", mlp(tmp_path / "a.onnx", seed=1))
    v2 = reg.register("fleet-cfg", mlp(tmp_path / "b.onnx", seed=2), alias=registry.ALIAS_CANARY)
    for version, config in ((v1, CHAMPION_CONFIG), (v2, CANARY_CONFIG)):
        doc = json.dumps({**config, "slo_p99_ms": 50.0, "sustained_qps": 100.0})
        c.set_model_version_tag("fleet-cfg", version, registry.TAG_SERVING_CONFIG, doc)
    c.set_registered_model_tag("fleet-cfg", registry.MODEL_TAG_CANARY_WEIGHT, "25")
    mlflow.set_registry_uri(reg.settings.registry_uri)  # as `bladeflow serve` does, for downloads

    async def scenario() -> tuple[dict, dict, object, object]:
        fleet = Fleet(c, ["fleet-cfg"], ServeOptions(), Metrics())
        try:
            # execute: the release's canary stage, then its promotion (canary -> champion)
            await fleet.poll()
            slot = fleet.slots["fleet-cfg"]
            during = {r: (x.version, _knobs(x.options), x.config_from, x.batcher) for r, x in
                      slot.deployment.runners().items()}  # fmt: skip
            status = slot.status()["serving_config"]
            canary_runner = slot.deployment.canary
            c.set_registered_model_alias("fleet-cfg", registry.ALIAS_CHAMPION, v2)
            c.delete_registered_model_alias("fleet-cfg", registry.ALIAS_CANARY)
            await fleet.poll()
            return during, status, canary_runner, slot.deployment.champion
        finally:
            await fleet.close()

    during, status, canary_runner, promoted = asyncio.run(scenario())
    # assert: each role runs its version's tag, not the other's and not the defaults
    assert during["champion"][:3] == (v1, CHAMPION_CONFIG, "tag")
    assert during["canary"][:3] == (v2, CANARY_CONFIG, "tag")
    assert during["champion"][3]._max == 4 and during["canary"][3]._max == 16  # the batchers
    assert {k: status["canary"][k] for k in CANARY_CONFIG} == CANARY_CONFIG
    assert status["champion"]["from"] == status["canary"]["from"] == "tag"
    # assert: promotion keeps the canary's runner, so the new champion keeps its own config
    assert promoted is canary_runner and promoted is not None
    assert _knobs(promoted.options) == CANARY_CONFIG  # type: ignore[attr-defined]


def test_a_flag_overrides_the_tag_for_champion_and_canary_alike() -> None:
    # setup: `bladeflow serve --max-batch-size 8`; two versions tagged differently
    fleet = Fleet(None, [], ServeOptions(max_batch_size=8), Metrics(),
                  explicit=frozenset({"max_batch_size"}))  # fmt: skip
    tags = {
        "1": {registry.TAG_SERVING_CONFIG: json.dumps(CHAMPION_CONFIG)},
        "2": {registry.TAG_SERVING_CONFIG: json.dumps(CANARY_CONFIG)},
    }
    # execute
    (o1, f1), (o2, f2) = fleet.options_for(tags["1"]), fleet.options_for(tags["2"])
    fleet.executor.shutdown()
    # assert: the flag wins everywhere; every other knob is each version's own
    assert o1.max_batch_size == o2.max_batch_size == 8
    assert (o1.workers, o1.batch_timeout_ms) == (1, 1.0) and f1 == "tag"
    assert (o2.workers, o2.batch_timeout_ms) == (2, 5.0) and f2 == "tag"
