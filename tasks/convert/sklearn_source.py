"""scikit-learn models saved with skops (.skops) -> ONNX through skl2onnx.

Pickled scikit-learn models (.pkl, .joblib, MLflow's pickle/cloudpickle flavor) are refused:
unpickling runs arbitrary code. skops stores the object tree as data; only types of
scikit-learn, numpy and scipy are loaded, any other type is named and refused.
Classifiers export ``label`` and ``probabilities`` (no ZipMap); regressors ``variable``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import Converter, Export, SourceRunner, check_size, check_zip
from bladeflow.tasks.convert.errors import ConversionError, missing_framework

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

DEFAULT_OPSET = 17
_TRUSTED_PACKAGES = {"sklearn", "numpy", "scipy"}
_HOW_TO_SAVE = "Save the model with skops.io.dump(model, 'model.skops')."
INPUT = "input"


def load_skops(path: Path) -> Any:
    try:
        import skops.io as sio
    except ImportError as exc:
        raise missing_framework("scikit-learn (skops)", "skops", None, exc) from exc
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist or is not a file")
    check_zip(path, "skops file", _HOW_TO_SAVE)
    try:
        untrusted = sio.get_untrusted_types(file=str(path))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path} is not a readable skops file: {exc}") from exc
    # Types from scikit-learn/numpy/scipy themselves (e.g. sklearn.tree._tree.Tree) are rebuilt
    # by skops from data; anything else would be user code, which we never load.
    foreign = [t for t in untrusted if t.split(".")[0] not in _TRUSTED_PACKAGES]
    if foreign:
        raise ModelFileError(
            f"{path} contains types outside scikit-learn/numpy/scipy: {foreign}. bladeflow does "
            "not load code it cannot vet; rebuild the pipeline from scikit-learn types only."
        )
    return sio.load(str(path), trusted=untrusted)


def _final(model: Any) -> Any:
    steps = getattr(model, "steps", None)
    return steps[-1][1] if steps else model


class SklearnRunner:
    """Runs the scikit-learn model; outputs named like the skl2onnx export."""

    name = "scikit-learn"

    def __init__(self, model: Any, outputs: list[str]):
        self._model = model
        self._outputs = outputs

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = next(iter(feeds.values()))
        if hasattr(self._model, "predict_proba") and len(self._outputs) == 2:
            return {
                self._outputs[0]: np.asarray(self._model.predict(x)),
                self._outputs[1]: np.asarray(self._model.predict_proba(x)),
            }
        y = np.asarray(self._model.predict(x))
        return {self._outputs[0]: y.reshape(len(x), -1)}


def export_sklearn(model: Any, output: Path, options: ConvertOptions) -> tuple[list[str], dict]:
    try:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError as exc:
        raise missing_framework("scikit-learn", "skl2onnx", None, exc) from exc
    n_features = getattr(model, "n_features_in_", None)
    name, shape = next(iter(options.input_shapes.items()), (INPUT, [0, n_features]))
    if shape[-1] is None:
        raise ModelFileError("the model does not record n_features_in_; pass input_shapes")
    opset = options.target_opset or DEFAULT_OPSET
    final = _final(model)
    extra = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else None
    try:
        onx = to_onnx(
            model,
            initial_types=[(name, FloatTensorType([None, int(shape[-1])]))],
            target_opset={"": opset, "ai.onnx.ml": 3},
            options=extra,
        )
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        raise ConversionError(
            f"skl2onnx cannot convert {type(final).__name__}: {exc}. Use estimators skl2onnx "
            "supports (https://onnx.ai/sklearn-onnx/supported.html) or register a converter."
        ) from exc
    _dedupe_opset_imports(onx)
    for value in [*onx.graph.input, *onx.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    output.write_bytes(onx.SerializeToString())
    outputs = [o.name for o in onx.graph.output]
    return outputs, {
        "exporter": "skl2onnx.to_onnx",
        "opset": opset,
        "zipmap": False,
        "estimator": type(final).__name__,
        "n_features": int(shape[-1]),
    }


def _dedupe_opset_imports(onx: Any) -> None:
    """One opset import per domain, the highest. skl2onnx can list the default domain twice,
    which ONNX Runtime's quantization tools reject ("Failed to find proper ai.onnx domain")."""
    versions: dict[str, int] = {}
    for imp in onx.opset_import:
        domain = "" if imp.domain == "ai.onnx" else imp.domain
        versions[domain] = max(versions.get(domain, 0), int(imp.version))
    if len(versions) == len(onx.opset_import):
        return
    del onx.opset_import[:]
    for domain, version in versions.items():
        imp = onx.opset_import.add()
        imp.domain, imp.version = domain, version


class SkopsConverter(Converter):
    """Converts a scikit-learn model saved with skops to ONNX with skl2onnx."""

    format = "sklearn"
    description = "a scikit-learn model saved with skops (.skops); never a pickle"

    @classmethod
    def claims(cls, source: str) -> bool:
        path = Path(source)
        return path.is_file() and path.suffix.lower() == ".skops"

    @classmethod
    def precheck(cls, source: str) -> None:
        check_size(source)
        check_zip(Path(source), "skops file", _HOW_TO_SAVE)

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        model = load_skops(Path(source))
        out = workdir / "exported.onnx"
        outputs, config = export_sklearn(model, out, options)
        return Export(onnx_path=out, runner=SklearnRunner(model, outputs), config=config)

    def open_runner(
        self, source: str, options: ConvertOptions, artifact: ModelArtifact
    ) -> SourceRunner | None:
        return SklearnRunner(load_skops(Path(source)), [o.name for o in artifact.signature.outputs])
