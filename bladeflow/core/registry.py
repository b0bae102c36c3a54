"""The MLflow registry schema bladeflow writes and every later stage (serving, release) reads.

Every tag, alias and run-tag name bladeflow uses is defined here, once, with a comment. Keep these
names: deployed servers and users' scripts depend on them. Outcome values are
:class:`bladeflow.core.outcome.Outcome`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bladeflow.core.contract import PassRecord, SessionConfig
from bladeflow.core.errors import UserInputError

# Model-version tags.
TAG_SOURCE = "bladeflow.source"  # the source path/URI the user gave
TAG_SOURCE_SHA256 = "bladeflow.source_sha256"
TAG_RECIPE = "bladeflow.recipe"  # JSON list of {"name", "config"}; the last is the runtime config
TAG_VALIDATED = "bladeflow.validated"  # "true" only when the accuracy gate passed
TAG_HARDWARE = "bladeflow.hardware"  # JSON: CPU model, ISA flags, threads, GPUs
TAG_CANDIDATE = "bladeflow.candidate"  # name of the winning recipe
TAG_SYNTHETIC = "bladeflow.synthetic_data"  # "true" when accuracy was judged on synthetic inputs
TAG_OPTIMIZE_PARAMS = "bladeflow.optimize_params"  # JSON of the flow parameters, for re-runs
TAG_TOOL_VERSIONS = "bladeflow.tool_versions"  # JSON: versions of every tool that made it
# What the speedup is measured against: the source framework as it is served (e.g. a Keras
# model through a traced tf.function), with the eager latency when that was timed too.
TAG_BASELINE = "bladeflow.baseline"

TAG_NIGHTLY_KEY = "bladeflow.nightly_key"  # cache key of the nightly run that produced it
# JSON: the serving configuration `bladeflow tune-serving` chose (SERVING_CONFIG_KEYS, plus what it
# was judged on: slo_p99_ms, sustained_qps, tuned_at); `bladeflow serve` runs the version with it
# unless a flag says otherwise.
TAG_SERVING_CONFIG = "bladeflow.serving_config"

# Run tags (the optimize run in experiment `bladeflow`, nested candidate runs, release runs).
RUN_TAG_OUTCOME = "bladeflow.outcome"  # an Outcome value
RUN_TAG_REASON = "bladeflow.reason"  # why it ended so (credentials redacted, <= 5000 chars)
RUN_TAG_VERSION = "bladeflow.version"  # the version it registered
RUN_TAG_MODEL = "bladeflow.model"  # the registered model name the run is for
RUN_TAG_FLOW = "bladeflow.flow"  # which flow logged the run (optimize, release)
RUN_TAG_CANDIDATE = "bladeflow.candidate"  # nested run: the candidate's recipe name
RUN_TAG_GATE = "bladeflow.gate"  # nested run: chosen | passed | rejected | skipped
RUN_TAG_OWNER = "bladeflow.owner"  # JSON {host, pid, started} of the process running it
RUN_TAG_BENCHMARK_POOL = "bladeflow.benchmark_pool"  # the work pool that timed the models
RUN_TAG_BENCHMARK_HARDWARE = "bladeflow.benchmark_hardware"  # JSON: that pool's hardware
RUN_TAG_LOG_FILE = "bladeflow.log_file"  # the run's log file on the machine that ran it

# Aliases.
ALIAS_CANDIDATE = "candidate"  # newest validated version
ALIAS_CANARY = "canary"
ALIAS_CHAMPION = "champion"

# Registered-model tags.
MODEL_TAG_CANARY_WEIGHT = "bladeflow.canary_weight"  # 0-100: share of traffic for the canary
MODEL_TAG_SHADOW_SHARE = "bladeflow.shadow_share"  # 0-100: % of champion requests mirrored
MODEL_TAG_PREVIOUS_CHAMPION = "bladeflow.previous_champion"  # what `release rollback` restores
MODEL_TAG_RELEASE_LEASE = "bladeflow.release.lease"  # JSON lease: one release per model
MODEL_TAG_NIGHTLY = "bladeflow.nightly"  # "true": re-optimize nightly
MODEL_TAG_NIGHTLY_KEY = "bladeflow.nightly_key"  # cache key of the last completed check
MODEL_TAG_NIGHTLY_INPUTS = "bladeflow.nightly_inputs"  # JSON: short hash of each part of the key
MODEL_TAG_NIGHTLY_CHECKED = "bladeflow.nightly_checked_at"  # when nightly last looked

# Key of the convert step's config (a model's provenance) saying why int8 recipes cannot be built
# on it (an opset too old for the quantizers that ONNX's converter could not upgrade).
PROVENANCE_INT8_BLOCKED = "int8_blocked"

# The pseudo-pass that closes every recipe: how ONNX Runtime must run the model.
RUNTIME_STEP = "runtime.onnxruntime"
RUNTIME_FILE = "bladeflow_runtime.json"  # written next to model.onnx inside the logged model

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a registered-model name bladeflow accepts, else explain why not.

    Names appear in ``models:/NAME@alias`` URIs and in the serving URL ``/v2/models/NAME``, so
    only letters, digits, ``_``, ``-`` and ``.`` are allowed (128 characters at most).
    """
    if not _NAME.match(name or ""):
        raise UserInputError(
            f"model name {name!r} is not allowed: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (e.g. 'intent-classifier')"
        )
    return name


def recipe_json(steps: list[PassRecord], session: SessionConfig) -> str:
    """Serialize a recipe for the ``bladeflow.recipe`` tag (runtime config as the last step)."""
    payload: list[dict[str, Any]] = [s.model_dump(mode="json") for s in steps]
    payload.append({"name": RUNTIME_STEP, "config": session.model_dump(mode="json")})
    return json.dumps(payload, sort_keys=True)


def session_from_recipe(recipe: str) -> SessionConfig:
    """The ONNX Runtime session config stored in a ``bladeflow.recipe`` tag value."""
    for step in reversed(json.loads(recipe)):
        if step.get("name") == RUNTIME_STEP:
            return SessionConfig(**step.get("config", {}))
    return SessionConfig()


# The `bladeflow serve` settings a `bladeflow.serving_config` tag may set, with their types.
SERVING_CONFIG_KEYS: dict[str, type] = {
    "max_batch_size": int,
    "batch_timeout_ms": float,
    "max_queue_size": int,
    "workers": int,
    "intra_op_threads": int,
}


def serving_config_from_tag(value: str | None) -> dict[str, int | float]:
    """The serve settings in a ``bladeflow.serving_config`` tag value ({} when absent).

    Unknown keys (what the tuner measured) are dropped; a malformed tag raises ValueError, so the
    server reports it instead of silently running a different configuration.
    """
    if not value:
        return {}
    doc = json.loads(value)
    if not isinstance(doc, dict):
        raise ValueError(f"{TAG_SERVING_CONFIG} must be a JSON object, got {type(doc).__name__}")
    out: dict[str, int | float] = {}
    for key, kind in SERVING_CONFIG_KEYS.items():
        if key in doc:
            number = kind(doc[key])
            if number < (0 if key in {"batch_timeout_ms", "intra_op_threads"} else 1):
                raise ValueError(f"{TAG_SERVING_CONFIG}: {key}={doc[key]!r} is out of range")
            out[key] = number
    return out
