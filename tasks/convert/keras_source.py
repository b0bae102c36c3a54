"""Keras 3 models (.keras, .h5) -> ONNX: loaded in safe mode, converted with tf2onnx.

Keras 3 refuses Python ``lambda`` layers in safe mode (their code would run on load); that
refusal becomes a ModelFileError. The legacy tf_keras loader is never used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import Converter, Export, SourceRunner, check_size, check_zip
from bladeflow.tasks.convert.errors import missing_framework
from bladeflow.tasks.convert.tf_common import (
    GraphCall,
    TFRunner,
    convert_function,
    import_tf,
    input_specs,
)

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

SUFFIXES = (".keras", ".h5", ".hdf5")


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HOW_TO_SAVE = "Save the model again with model.save('model.keras')."


def check_keras_file(path: Path) -> None:
    """A .keras file must be a whole zip archive, an .h5 must start with the HDF5 signature."""
    if path.suffix.lower() == ".keras":
        check_zip(path, "Keras .keras file", _HOW_TO_SAVE)
        return
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist or is not a file")
    with path.open("rb") as fh:
        head = fh.read(len(_HDF5_SIGNATURE))
    if head != _HDF5_SIGNATURE:
        raise ModelFileError(
            f"{path} is not an HDF5 file (no HDF5 signature at its start): it is corrupt or not a "
            f"Keras .h5 model. {_HOW_TO_SAVE}"
        )
    try:
        import h5py  # light (no TensorFlow); it notices a truncated file from the superblock
    except ImportError:
        return
    try:
        h5py.File(path, "r").close()
    except OSError as exc:
        raise ModelFileError(
            f"{path} is not a readable HDF5 file ({exc}): it is truncated or corrupt. "
            f"{_HOW_TO_SAVE}"
        ) from exc


def load_keras(path: Path) -> Any:
    import_tf("Keras")
    try:
        import keras
    except ImportError as exc:
        raise missing_framework("Keras", "keras", "tf", exc) from exc
    check_keras_file(path)
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except ValueError as exc:
        text = str(exc)
        if "lambda" in text.lower() or "safe_mode" in text:
            raise ModelFileError(
                f"{path} contains a Keras Lambda layer with Python code; loading it would run that "
                "code, so Keras safe mode (and bladeflow) refuses it. Replace the Lambda with a "
                "registered custom layer (@keras.saving.register_keras_serializable) or built-in "
                "layers and save the model again."
            ) from exc
        raise ModelFileError(f"Keras cannot load {path}: {_first_line(exc)}") from exc
    except (OSError, TypeError, KeyError) as exc:
        raise ModelFileError(
            f"Keras cannot load {path} ({type(exc).__name__}: {_first_line(exc)}); the file may "
            "be truncated, or saved by another Keras version: save it again with model.save()."
        ) from exc


def output_names(model: Any) -> list[str]:
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(model.outputs) or len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(model.outputs))]
    return names


class KerasConverter(Converter):
    """Converts a Keras 3 model file to ONNX through a tf.function and tf2onnx."""

    format = "keras"
    description = "a Keras 3 model file (.keras, .h5), loaded in safe mode"

    @classmethod
    def claims(cls, source: str) -> bool:
        path = Path(source)
        return path.is_file() and path.suffix.lower() in SUFFIXES

    @classmethod
    def precheck(cls, source: str) -> None:
        check_size(source)
        check_keras_file(Path(source))

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        tf = import_tf(self.format)
        model = load_keras(Path(source))
        names = [str(i.name) for i in model.inputs]
        discovered = [
            (n, list(i.shape), tf.as_dtype(i.dtype))
            for n, i in zip(names, model.inputs, strict=True)
        ]
        specs = input_specs(tf, discovered, options)
        outs = output_names(model)

        def call(*args: Any) -> Any:
            result = model(list(args) if len(args) > 1 else args[0], training=False)
            flat = result if isinstance(result, list | tuple) else [result]
            return dict(zip(outs, flat, strict=True))

        out = workdir / "exported.onnx"
        config = convert_function(call, specs, out, options, self.format)
        return Export(onnx_path=out, runner=_runner(model, names, outs), config=config)

    def open_runner(
        self, source: str, options: ConvertOptions, artifact: ModelArtifact
    ) -> SourceRunner | None:
        model = load_keras(Path(source))
        return _runner(model, [str(i.name) for i in model.inputs], output_names(model))


def _runner(model: Any, inputs: list[str], outputs: list[str]) -> TFRunner:
    """The reference is the eager call (the model's own output, exactly); the served path is the
    same call traced once as a graph, which is how a Keras model is served (``model.export()``
    writes a SavedModel whose signature is such a graph)."""

    def call(feeds: dict[str, Any]) -> dict[str, Any]:
        args = [feeds[n] for n in inputs]
        result = model(args if len(args) > 1 else args[0], training=False)
        flat = result if isinstance(result, list | tuple) else [result]
        return {n: v.numpy() for n, v in zip(outputs, flat, strict=True)}

    def graph(*args: Any) -> dict[str, Any]:
        result = model(list(args) if len(args) > 1 else args[0], training=False)
        flat = result if isinstance(result, list | tuple) else [result]
        return dict(zip(outputs, flat, strict=True))

    tf = import_tf("Keras")
    specs = [
        tf.TensorSpec(list(i.shape), tf.as_dtype(i.dtype), name=n)
        for n, i in zip(inputs, model.inputs, strict=True)
    ]
    return TFRunner(
        call, "keras", served=GraphCall(tf, graph, specs), description="model(x, training=False)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
