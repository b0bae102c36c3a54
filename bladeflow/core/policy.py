"""Tolerance policies for the accuracy gate and for the validation data checks.

A :class:`TolerancePolicy` says, per output, how close a candidate must stay to the source and for
what share of samples (``mostly``); presets give sensible defaults per precision. The existing
:class:`~bladeflow.core.contract.Tolerance` maps onto a policy with :func:`policy_from_tolerance`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bladeflow.core.contract import Tolerance

Precision = Literal["fp32", "fp16", "int8"]
MetricName = Literal["accuracy", "f1", "auc", "spearman"]


class OutputTolerance(BaseModel):
    """How far one output may be from the source, judged per sample.

    A sample passes when every element satisfies ``|cand - src| <= atol + rtol * |src|`` (skipped
    when ``atol`` is None), its cosine similarity to the source is ``>= min_cosine`` (skipped when
    None), and its largest class-probability change after softmax is ``<= max_prob_drift``; over
    the samples, the share whose argmax agrees must be ``>= min_top1_agreement`` (classifiers) and
    the share whose decision ``value >= decision_threshold`` agrees ``>= min_decision_agreement``.
    String outputs (class labels) are judged by equality only: the fraction of samples whose label
    equals the source's must be ``>= min_label_agreement``; the numeric fields do not apply.
    """

    model_config = ConfigDict(frozen=True)

    atol: float | None = Field(
        1e-4, ge=0, description="absolute error per element; None: unchecked"
    )
    rtol: float = Field(1e-3, ge=0, description="error relative to |source| per element")
    min_cosine: float | None = Field(
        0.999, ge=-1, le=1, description="lowest per-sample cosine; None: unchecked"
    )
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="share of samples whose argmax must agree (classifiers)"
    )
    max_prob_drift: float | None = Field(
        None,
        ge=0,
        le=1,
        description="largest change of any class probability per sample, after softmax over the "
        "last axis (outputs that already are probabilities are taken as they are); classifiers",
    )
    min_decision_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="share of samples whose decision (value >= decision_threshold, every "
        "element of the sample) must agree with the source's (scores, matchers)",
    )
    decision_threshold: float = Field(0.5, description="the decision is value >= this")
    min_label_agreement: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of samples whose string label must equal the source's (label outputs)",
    )
    top_k: int = Field(5, ge=1, description="k of the top-k overlap column in the table")
    mostly: float = Field(1.0, gt=0, le=1, description="share of samples that must pass")

    def tightened(self, keep: float) -> OutputTolerance:
        """This tolerance with only ``keep`` (0..1] of each allowance: what a search aims for
        so that the gate still passes on inputs it did not see (``keep=0.7``: cosine 0.99 ->
        0.993, argmax 0.99 -> 0.993, abs 0.02 -> 0.014)."""

        def share(v: float | None) -> float | None:
            return None if v is None else 1.0 - (1.0 - v) * keep

        return self.model_copy(
            update={
                "atol": None if self.atol is None else self.atol * keep,
                "rtol": self.rtol * keep,
                "min_cosine": share(self.min_cosine),
                "min_top1_agreement": share(self.min_top1_agreement),
                "max_prob_drift": None
                if self.max_prob_drift is None
                else self.max_prob_drift * keep,
                "min_decision_agreement": share(self.min_decision_agreement),
                "min_label_agreement": share(self.min_label_agreement),
            }
        )


class MetricLimit(BaseModel):
    """A task metric computed with labels, and how much the candidate may lose to the source."""

    metric: MetricName = Field(description="accuracy, f1 (macro), auc, spearman")
    output: str | None = Field(None, description="output scored; default: the first output")
    max_drop: float = Field(0.01, ge=0, description="largest allowed drop of the metric")
    relative: bool = Field(False, description="max_drop is a fraction of the source's metric")

    def allowed_drop(self, source_value: float) -> float:
        return self.max_drop * abs(source_value) if self.relative else self.max_drop


class TolerancePolicy(BaseModel):
    """The accuracy gate's policy: a default per-output tolerance, overrides, and a metric limit."""

    precision: Precision = "fp32"
    default: OutputTolerance = Field(default_factory=OutputTolerance)
    outputs: dict[str, OutputTolerance] = Field(
        default_factory=dict, description="output name -> tolerance replacing the default"
    )
    metric: MetricLimit | None = Field(None, description="judged only when labels are given")
    classifier_outputs: list[str] | None = Field(
        None,
        description="outputs holding class scores (argmax/top-k are measured and gated); None: "
        "2-D outputs whose name says so (logits, probs, probabilities, scores, classes)",
    )
    budget: str | None = Field(
        None,
        description="the accuracy budget (--accuracy) this policy was made from, per output "
        "once resolved; None: an explicit tolerance or policy",
    )

    def for_output(self, name: str) -> OutputTolerance:
        return self.outputs.get(name, self.default)

    def tightened(self, keep: float) -> TolerancePolicy:
        """Every output's tolerance with only ``keep`` of its allowance (see
        :meth:`OutputTolerance.tightened`); accuracy recovery aims inside the gate with it."""
        return self.model_copy(
            update={
                "default": self.default.tightened(keep),
                "outputs": {n: t.tightened(keep) for n, t in self.outputs.items()},
            }
        )

    def is_classifier(self, name: str) -> bool:
        """Whether argmax/top-k agreement means something for output ``name``."""
        if self.classifier_outputs is not None:
            return name in self.classifier_outputs
        lowered = name.lower()
        return any(hint in lowered for hint in _CLASSIFIER_HINTS)

    @classmethod
    def preset(
        cls,
        precision: Precision,
        outputs: dict[str, OutputTolerance] | None = None,
        metric: MetricLimit | None = None,
    ) -> TolerancePolicy:
        """The preset for ``precision``, with optional per-output overrides and metric limit.

        fp32: every sample within 1e-4 + 1e-3*|src| and cosine >= 0.999; every string label equal.
        fp16: 99.9% of samples within 1e-2 + 1e-2*|src| and cosine >= 0.995; labels equal on
        99.9% of samples.
        int8: elementwise error is not judged (quantization moves every value); 99% of samples
        with cosine >= 0.98, argmax and label agreement >= 98%, and the task metric may drop at
        most 0.01.
        """
        base = PRESETS[precision]
        if metric is None and precision == "int8":
            metric = MetricLimit(metric="accuracy", max_drop=0.01)
        return cls(precision=precision, default=base, outputs=outputs or {}, metric=metric)


_CLASSIFIER_HINTS = ("logit", "prob", "score", "class")

PRESETS: dict[str, OutputTolerance] = {
    "fp32": OutputTolerance(
        atol=1e-4, rtol=1e-3, min_cosine=0.999, min_label_agreement=1.0, mostly=1.0
    ),
    "fp16": OutputTolerance(
        atol=1e-2, rtol=1e-2, min_cosine=0.995, min_label_agreement=0.999, mostly=0.999
    ),
    "int8": OutputTolerance(
        atol=None,
        rtol=0.0,
        min_cosine=0.98,
        min_top1_agreement=0.98,
        min_label_agreement=0.98,
        mostly=0.99,
    ),
}


def policy_from_tolerance(tolerance: Tolerance) -> TolerancePolicy:
    """The policy equivalent to the flow's ``Tolerance``: every sample must satisfy it."""
    return TolerancePolicy(
        precision="fp32",
        default=OutputTolerance(
            atol=tolerance.atol,
            rtol=tolerance.rtol,
            min_cosine=tolerance.min_cosine,
            min_label_agreement=1.0,  # the flow's tolerance is fp32-style: labels must be equal
            mostly=1.0,
        ),
    )


class DataPolicy(BaseModel):
    """What the validation data checks expect beyond the model signature."""

    min_rows: int = Field(1, ge=1, description="fewest samples accepted")
    value_ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="input -> [low, high] allowed values (e.g. images [0, 1]); overrides the "
        "signature's value_range",
    )

    @model_validator(mode="after")
    def _ranges(self) -> DataPolicy:
        for name, (low, high) in self.value_ranges.items():
            if low > high:
                raise ValueError(f"value range of {name!r} is [{low}, {high}]: low must be <= high")
        return self
