"""Accuracy recovery: int8/fp16 with the nodes that break the accuracy gate fixed, cheapest first.

For int8_dynamic there are two fixes per node: token-wise int8 (``int8_tokenwise``: one activation
scale per row; eligible MatMuls only, about 1.3x the cost of per-tensor int8) and fp32 (about 2.6x).
Nodes are ranked by sensitivity and the search finds, in order:

1. the shortest prefix of the ranking whose nodes get their cheapest fix (token-wise when
   eligible, else fp32) that passes the gate;
2. if none passes: the shortest prefix kept in fp32, the rest per-tensor (recovery without
   token-wise; token-wise is symmetric, so on a row without outliers it can be coarser than
   per-tensor u8 over a one-sided range, and stage 1 can fail where this passes);
3. then the shortest part of that fp32 set that must stay fp32, its tail made token-wise.

Each search doubles, then bisects. fp16 and int8_static have fp32 as their only fix.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import Field

from bladeflow.core.contract import (
    AccuracyReport,
    ModelArtifact,
    Provenance,
    SessionConfig,
    Signature,
    TensorSpec,
)
from bladeflow.core.environment import hardware
from bladeflow.core.policy import TolerancePolicy
from bladeflow.tasks.optimize.base import (
    OptimizationPass,
    PassConfig,
    PassContext,
    PassNotApplicable,
)
from bladeflow.tasks.optimize.fp16 import Float16Config, to_float16
from bladeflow.tasks.optimize.int8_dynamic import (
    QuantizeDynamicConfig,
    quantize_dynamic_file,
    resolve,
)
from bladeflow.tasks.optimize.int8_static import (
    QuantizeStaticConfig,
    missing_ops,
    quantize_static_file,
    require_ops,
)
from bladeflow.tasks.optimize.int8_tokenwise import eligible, tokenwise_file
from bladeflow.tasks.validate.accuracy import predict
from bladeflow.tasks.validate.data import Dataset, mask_padding
from bladeflow.tasks.validate.gate import judge

# Builds a candidate into `output` with `excluded` node names kept in fp32, `tokenwise` ones made
# token-wise int8, or, when `only` is given, with only those nodes converted.
Builder = Callable[[Path, Path, Sequence[str], Sequence[str] | None, Sequence[str]], None]


class MixedPrecisionConfig(PassConfig):
    precision: Literal["int8_dynamic", "int8_static", "fp16"] = "int8_dynamic"
    # Config of the int8_dynamic / int8_static / fp16 pass.
    quant: dict[str, Any] = Field(default_factory=dict)
    # Nodes that may be kept in fp32; empty: the op types the quantizer converts (int8_static:
    # its op_types, e.g. Conv for CNNs; int8_dynamic: MatMul/Gemm/Attention; fp16: those + Conv).
    op_types: list[str] = Field(default_factory=list)
    max_fp32_fraction: float = 0.5  # give up (keep the best attempt) beyond this share
    probe_samples: int = 16  # sensitivity is measured on the worst samples of the full attempt
    # activation_range: rank nodes by the peak-to-RMS ratio of their input activation (one fp32
    # run: dynamic int8 error grows with it); measured: quantize each node alone and gate it
    # (exact but one quantization + inference per node).
    sensitivity: Literal["activation_range", "measured"] = "activation_range"
    # Aim this share inside the gate (e.g. 0.3: min cosine 0.99 -> 0.993, atol/rtol/abs/
    # prob_drift x0.7, agreement 0.99 -> 0.993): the search fits the validation samples, and
    # unseen inputs (longer texts) land a bit worse.
    margin: float = Field(0.3, ge=0.0, lt=1.0)
    # int8_dynamic: make a failing MatMul token-wise int8 before keeping it in fp32 (the cheaper
    # fix; see bladeflow.tasks.optimize.int8_tokenwise).
    tokenwise: bool = True


def model_signature(model: onnx.ModelProto) -> Signature:
    """Inputs and outputs of an ONNX graph as a Signature (enough to run ``predict``)."""

    def spec(vi: onnx.ValueInfoProto) -> TensorSpec:
        t = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        ]
        return TensorSpec(name=vi.name, dtype=dtype, shape=dims)

    inits = {i.name for i in model.graph.initializer}
    return Signature(
        inputs=[spec(i) for i in model.graph.input if i.name not in inits],
        outputs=[spec(o) for o in model.graph.output],
    )


class _Gate:
    """Runs a model file on (a subset of) the data and judges it with the gate's own limits."""

    def __init__(
        self, signature: Signature, data: Dataset, reference: Dataset, policy: TolerancePolicy
    ):
        self.signature, self.data, self.reference, self.policy = signature, data, reference, policy
        self.evaluations = 0
        self.parent: _Gate | None = None

    def subset(self, idx: np.ndarray) -> _Gate:
        pick = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
        sub = _Gate(self.signature, pick(self.data), pick(self.reference), self.policy)
        sub.parent = self
        return sub

    def check(self, path: Path) -> tuple[AccuracyReport, dict[str, np.ndarray]]:
        self.evaluations += 1
        if self.parent is not None:
            self.parent.evaluations += 1
        artifact = ModelArtifact(
            path=str(path),
            format="onnx",
            sha256="",
            size_bytes=path.stat().st_size,
            signature=self.signature,
            provenance=Provenance(source=str(path)),
        )
        outputs = mask_padding(predict(artifact, SessionConfig(), self.data), self.data)
        return judge(path.stem, outputs, self.reference, self.policy), outputs


def badness(report: AccuracyReport) -> tuple[int, float]:
    """Sort key, lower is better: failing samples, then 1 - worst cosine."""
    failing = sum(o.failing_samples for o in report.outputs.values())
    worst = min((o.min_cosine for o in report.outputs.values()), default=0.0)
    return (failing if report.outputs else 10**9, 1.0 - worst)


def per_sample_cosine(outputs: Dataset, reference: Dataset) -> np.ndarray:
    """Per sample, how far the worst numeric output moved (higher: worse).

    1 - cosine for outputs with several values per sample; for one value per sample (a score,
    where a per-sample cosine is only its sign) the absolute error over the source's spread.
    """
    worst = np.zeros(next(iter(reference.values())).shape[0]) if reference else np.zeros(0)
    for name, ref in reference.items():
        if ref.dtype.kind != "f":
            continue
        a = np.nan_to_num(outputs[name].reshape(ref.shape[0], -1).astype(np.float64))
        b = np.nan_to_num(ref.reshape(ref.shape[0], -1).astype(np.float64))
        if b.shape[1] == 1:
            bad = np.abs(a - b)[:, 0] / (float(b.std()) + 1e-12)
        else:
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30
            bad = 1.0 - (a * b).sum(1) / norms
        worst = np.maximum(worst, bad)
    return worst


def activation_ranking(
    model: onnx.ModelProto, nodes: list[str], data: Dataset, work: Path
) -> list[tuple[float, str]]:
    """(peak-to-RMS ratio of the node's input activation, node) for each node, from one fp32 run.

    One int8 scale covers a whole activation tensor, so the rounding error relative to the
    signal grows with max|x| / rms(x): outlier features are what break dynamic quantization.
    """
    import onnxruntime as ort

    by_name = {n.name: n for n in model.graph.node}
    wanted = {name: by_name[name].input[0] for name in nodes}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for tensor in dict.fromkeys(wanted.values()):
        if tensor not in have:
            probe.graph.output.append(
                onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)
            )
    path = work / "activations.onnx"
    onnx.save(probe, str(path))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = list(dict.fromkeys(wanted.values()))
    inputs = {i.name for i in sess.get_inputs()}
    values = sess.run(names, {k: v for k, v in data.items() if k in inputs})
    ratio: dict[str, float] = {}
    for tensor, value in zip(names, values, strict=True):
        x = np.abs(np.asarray(value, dtype=np.float64)).reshape(len(value), -1)
        rms = np.sqrt((x**2).mean(axis=1)) + 1e-30
        ratio[tensor] = float((x.max(axis=1) / rms).max())
    return [(ratio[wanted[name]], name) for name in nodes]


@dataclass
class _Best:
    """The best attempt so far: a passing one with the fewest fp32 (then token-wise) nodes, else
    the least bad."""

    score: tuple[int, float]
    path: Path
    fp32: list[str]
    tokenwise: list[str]
    passed: bool

    def better_than(self, other: _Best) -> bool:
        if self.passed != other.passed:
            return self.passed
        if self.passed:
            return (len(self.fp32), len(self.tokenwise)) < (len(other.fp32), len(other.tokenwise))
        return self.score < other.score


def _smallest(passes: Callable[[int], bool], lo: int, hi: int, deadline: float) -> int | None:
    """Smallest k in [lo, hi] with ``passes(k)`` (assumed monotone): doubling, then bisection.

    None when none passes or the deadline came first.
    """
    if hi < lo:
        return None
    below, found, k = lo - 1, None, lo
    while time.monotonic() < deadline:
        if passes(k):
            found = k
            break
        below = k
        if k >= hi:
            return None
        k = min(max(2 * k, k + 1), hi)
    while found is not None and found - below > 1 and time.monotonic() < deadline:
        mid = (below + found) // 2
        if passes(mid):
            found = mid
        else:
            below = mid
    return found


class MixedPrecision(OptimizationPass):
    """Quantizes (int8/fp16); nodes that break the accuracy gate get token-wise int8 or fp32."""

    name = "mixed_precision"
    config_cls = MixedPrecisionConfig
    config: MixedPrecisionConfig
    uses_context = True

    def __init__(self, config: Any = None):
        super().__init__(config)
        if self.config.precision == "int8_dynamic":
            resolved = resolve(QuantizeDynamicConfig(**self.config.quant), hardware())
            quant = resolved.model_dump(mode="json")
            self.config = self.config.model_copy(update={"quant": quant})
        if not self.config.op_types:
            self.config = self.config.model_copy(update={"op_types": self._default_op_types()})
        self._details: dict[str, Any] = {}

    def _default_op_types(self) -> list[str]:
        if self.config.precision == "int8_static":
            return list(QuantizeStaticConfig(**self.config.quant).op_types)
        if self.config.precision == "fp16":
            return ["MatMul", "Gemm", "Attention", "Conv"]
        return ["MatMul", "Gemm", "Attention"]

    def model_skip_reason(self, op_types: set[str]) -> str | None:
        if self.config.precision == "int8_static":
            return missing_ops(op_types, QuantizeStaticConfig(**self.config.quant).requires_ops)
        return None

    def apply(self, source: Path, output: Path) -> None:
        self.apply_in_context(source, output, None)

    def apply_in_context(self, source: Path, output: Path, context: PassContext | None) -> None:
        if self.config.precision == "int8_static":
            require_ops(source, QuantizeStaticConfig(**self.config.quant).requires_ops)
        if context is None:
            raise PassNotApplicable(
                "accuracy recovery needs validation data, reference outputs and the tolerance: "
                "call build_candidate(..., context=PassContext(...))"
            )
        started = time.monotonic()
        deadline = started + context.time_budget_s
        model = onnx.load(str(source))
        signature = model_signature(model)
        with np.load(context.data.path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        with np.load(context.reference_path, allow_pickle=False) as npz:
            reference = {k: npz[k] for k in npz.files}
        # The same limits as the final gate, each with `margin` of its allowance held back.
        target = context.gate_policy().tightened(1.0 - self.config.margin)
        # As the final gate: per-token outputs compared on real tokens (padding zeroed).
        reference = mask_padding(reference, data)
        gate = _Gate(signature, data, reference, target)
        build = self._builder(data)
        nodes = [n.name for n in model.graph.node if n.op_type in self.config.op_types and n.name]

        tokenwise_ok = (
            set(eligible(model, nodes))
            if self.config.tokenwise and self.config.precision == "int8_dynamic"
            else set()
        )

        with tempfile.TemporaryDirectory(prefix="bladeflow-mp-") as tmp:
            work = Path(tmp)
            tries = 0

            def attempt(
                excluded: Sequence[str],
                only: Sequence[str] | None = None,
                tokenwise: Sequence[str] = (),
            ) -> Path:
                nonlocal tries
                tries += 1
                path = work / f"try{tries:03d}.onnx"
                build(source, path, excluded, only, tokenwise)
                return path

            full = attempt([])
            report, outputs = gate.check(full)
            best = _Best(badness(report), full, [], [], report.passed)
            ranking: list[tuple[float, str]] = []
            if not report.passed and nodes:
                # Rank on the samples the full attempt got worst: that is where the error is.
                moved = per_sample_cosine(outputs, reference)
                worst = np.argsort(-moved)[: self.config.probe_samples]
                probe = gate.subset(worst)
                if self.config.sensitivity == "measured":
                    for node in nodes:
                        if time.monotonic() > deadline:
                            break
                        rep, _ = probe.check(attempt([], only=[node]))
                        ranking.append((badness(rep)[1] + badness(rep)[0], node))
                else:
                    ranking = activation_ranking(model, nodes, probe.data, work)
                measured = {n for _, n in ranking}
                order = [n for _, n in sorted(ranking, reverse=True)]
                order += [n for n in nodes if n not in measured]
                best = self._recover(order, tokenwise_ok, attempt, gate, deadline, best)
            shutil.copyfile(best.path, output)
        self._details = {
            "precision": self.config.precision,
            "passed_gate": best.passed,
            "target_policy": target.model_dump(mode="json"),
            "fp32_nodes": best.fp32,
            "tokenwise_nodes": best.tokenwise,
            "candidate_nodes": len(nodes),
            "sensitivity_top": [n for _, n in sorted(ranking, reverse=True)[:10]],
            "evaluations": gate.evaluations,
            "elapsed_s": round(time.monotonic() - started, 2),
            "budget_exhausted": time.monotonic() > deadline,
        }

    def _recover(
        self,
        order: list[str],
        tokenwise_ok: set[str],
        attempt: Callable[..., Path],
        gate: _Gate,
        deadline: float,
        best: _Best,
    ) -> _Best:
        """The three searches of the module docstring; the best attempt seen is returned."""
        limit = max(1, int(len(order) * self.config.max_fp32_fraction))
        results: dict[tuple[tuple[str, ...], tuple[str, ...]], bool] = {}

        def check(fp32: list[str], tokenwise: list[str]) -> bool:
            nonlocal best
            key = (tuple(sorted(fp32)), tuple(sorted(tokenwise)))
            if key not in results:
                path = attempt(fp32, tokenwise=tokenwise)
                report, _ = gate.check(path)
                results[key] = report.passed
                candidate = _Best(badness(report), path, fp32, tokenwise, report.passed)
                if candidate.better_than(best):
                    best = candidate
            return results[key]

        def cheapest(nodes: list[str]) -> tuple[list[str], list[str]]:
            """(fp32, token-wise): each node's cheapest fix."""
            return [n for n in nodes if n not in tokenwise_ok], [
                n for n in nodes if n in tokenwise_ok
            ]

        # 1. cheapest fix for a prefix (fp32 only where token-wise is not possible)
        n_max = len(order)
        while n_max > 0 and len(cheapest(order[:n_max])[0]) > limit:
            n_max -= 1
        if _smallest(lambda k: check(*cheapest(order[:k])), 1, n_max, deadline) is not None:
            return best
        # 2. the shortest fp32 prefix, the rest per-tensor int8: the search recovery did before
        # token-wise existed, so nothing that passed then fails now. (Not "every node token-wise
        # plus an fp32 prefix": token-wise is symmetric, 127 levels a side, and on a row with no
        # outlier it is coarser than per-tensor u8 over a one-sided range such as GELU's output;
        # the demo's matcher failed that way.)
        k_fp32 = _smallest(lambda k: check(order[:k], []), 1, limit, deadline)
        if k_fp32 is None or not tokenwise_ok:
            return best

        # 3. hand that fp32 set's tail to token-wise: the shortest fp32 prefix j that still passes
        # with the eligible nodes of order[j:k_fp32] token-wise (ineligible ones stay fp32)
        def shrink(j: int) -> tuple[list[str], list[str]]:
            fp32, tokenwise = cheapest(order[j:k_fp32])
            return order[:j] + fp32, tokenwise

        _smallest(lambda j: check(*shrink(j)), 0, k_fp32 - 1, deadline)
        return best

    def _builder(self, data: Dataset) -> Builder:
        precision, quant = self.config.precision, self.config.quant
        if precision == "int8_dynamic":
            qd = QuantizeDynamicConfig(**quant)

            def dynamic(
                source: Path,
                output: Path,
                ex: Sequence[str],
                only: Sequence[str] | None,
                tokenwise: Sequence[str],
            ) -> None:
                if not tokenwise:
                    quantize_dynamic_file(source, output, qd, ex, only)
                    return
                staged = output.with_name(output.stem + "-per-tensor.onnx")
                quantize_dynamic_file(source, staged, qd, [*ex, *tokenwise], only)
                tokenwise_file(staged, output, tokenwise)
                staged.unlink()

            return dynamic
        if precision == "int8_static":
            qs = QuantizeStaticConfig(**quant)
            calib = {k: v[: qs.calibration_samples] for k, v in data.items()}
            return lambda s, o, ex, only, _tw: quantize_static_file(s, o, qs, calib, ex, only)
        f16 = Float16Config(**quant)

        def fp16(
            source: Path,
            output: Path,
            ex: Sequence[str],
            only: Sequence[str] | None,
            _tokenwise: Sequence[str] = (),
        ) -> None:
            model = onnx.load(str(source))
            keep = set(ex)
            if only is not None:
                keep |= {n.name for n in model.graph.node if n.name not in set(only)}
            cfg = f16.model_copy(update={"node_block_list": sorted(keep)})
            onnx.save(to_float16(model, cfg), str(output))

        return fp16

    def details(self) -> dict[str, Any]:
        return self._details

    def session_config(self, current: SessionConfig) -> SessionConfig:
        if self.config.precision == "int8_static":  # QDQ -> QLinear* fusion happens at load
            return current.model_copy(update={"graph_optimization_level": "all"})
        return current
