"""The flows' parameter models: the shared name / tracking-URI types and the tune-serving fields."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from bladeflow.core.errors import UserInputError
from bladeflow.core.params import (
    NightlyParams,
    OptimizeParams,
    ReleaseParams,
    ServingTune,
    TuneParams,
)

# The smallest valid arguments of each flow's parameters that take a model name.
NAMED: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (OptimizeParams, {"source": "m.onnx"}),
    (ReleaseParams, {"version": "1", "endpoints": ["http://127.0.0.1:8080"]}),
    (TuneParams, {"version": "1"}),
]


@pytest.mark.parametrize(("model", "kwargs"), NAMED)
def test_every_named_flow_refuses_a_bad_model_name_with_the_registry_message(
    model: type[BaseModel], kwargs: dict[str, Any]
) -> None:
    # execute / assert: the registry's own UserInputError, not a pydantic wrapper
    assert model(name="intent-v2", **kwargs).name == "intent-v2"  # type: ignore[attr-defined]
    with pytest.raises(UserInputError, match=r"model name 'a/b' is not allowed: use 1-128"):
        model(name="a/b", **kwargs)


@pytest.mark.parametrize(
    ("model", "kwargs"), [*NAMED, (NightlyParams, {})], ids=lambda x: getattr(x, "__name__", "")
)
def test_every_flow_refuses_a_password_in_tracking_uri_masked(
    model: type[BaseModel], kwargs: dict[str, Any]
) -> None:
    # setup
    kwargs = {**kwargs, "name": "m"} if model is not NightlyParams else kwargs
    # execute
    with pytest.raises(ValidationError) as info:
        model(tracking_uri="http://u:s3cret@h:5000", **kwargs)
    # assert: one error on tracking_uri, the password masked, the way out named
    (error,) = info.value.errors(include_input=False)
    assert error["loc"] == ("tracking_uri",)
    assert "'http://u:***@h:5000' carries a password" in error["msg"]
    assert "s3cret" not in error["msg"] and "MLFLOW_TRACKING_PASSWORD" in error["msg"]
    plain = model(tracking_uri="http://h:5000", **kwargs)
    assert plain.tracking_uri == "http://h:5000"  # type: ignore[attr-defined]
    assert model(**kwargs).tracking_uri is None  # type: ignore[attr-defined]


def test_tune_serving_is_off_for_optimize_and_on_for_nightly() -> None:
    # execute
    optimize = OptimizeParams(source="m.onnx", name="m")
    nightly = NightlyParams()
    # assert: the same defaults as `bladeflow tune-serving`
    assert optimize.tune_serving is False and nightly.tune_serving is True
    assert optimize.tune == nightly.tune == ServingTune()
    assert ServingTune().model_dump() == {
        "slo_p99_ms": 100.0,
        "budget_s": 300.0,
        "target_qps": 1000.0,
        "source": True,
    }
    assert set(ServingTune.model_fields) < set(TuneParams.model_fields)


def test_tune_settings_are_checked_where_the_form_is_filled() -> None:
    # execute / assert: a budget under the tuner's minimum or a zero SLO is refused up front
    with pytest.raises(ValidationError, match=r"tune\.budget_s"):
        OptimizeParams(source="m.onnx", name="m", tune_serving=True, tune={"budget_s": 5})
    with pytest.raises(ValidationError, match=r"tune\.slo_p99_ms"):
        NightlyParams(tune={"slo_p99_ms": 0})
    ok = OptimizeParams(source="m.onnx", name="m", tune_serving=True, tune={"budget_s": 45})
    assert ok.tune.budget_s == 45 and ok.tune.slo_p99_ms == 100.0
