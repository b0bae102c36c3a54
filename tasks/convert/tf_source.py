"""TensorFlow SavedModel folders -> ONNX through tf2onnx, one serving signature at a time."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import Converter, Export, SourceRunner
from bladeflow.tasks.convert.tf_common import TFRunner, convert_function, import_tf, input_specs

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

DEFAULT_SIGNATURE = "serving_default"


def load_signature(path: Path, signature: str | None) -> tuple[Any, Any]:
    """The loaded SavedModel (kept alive: it owns the variables) and the chosen signature."""
    tf = import_tf("TensorFlow SavedModel")
    if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
        raise ModelFileError(f"{path} is not a SavedModel folder (no saved_model.pb)")
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise ModelFileError(
            f"cannot load the SavedModel {path} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}). The folder may be "
            "incomplete (saved_model.pb and variables/ are both needed): copy or export it again."
        ) from exc
    name = signature or DEFAULT_SIGNATURE
    available = sorted(loaded.signatures.keys())
    if name not in loaded.signatures:
        raise ModelFileError(
            f"the SavedModel {path} has no signature {name!r}; it has {available or 'none'}. "
            "Pick one with the signature option (e.g. --signature serve)"
            if available
            else f"the SavedModel {path} has no serving signatures: export it with "
            "tf.saved_model.save(obj, path, signatures=...) or keras Model.export(path)"
        )
    return loaded, loaded.signatures[name]


def _names(fn: Any) -> list[str]:
    return sorted(fn.structured_input_signature[1])


class SavedModelConverter(Converter):
    """Converts one serving signature of a TensorFlow SavedModel with tf2onnx."""

    format = "tf_savedmodel"
    description = "a TensorFlow SavedModel folder (saved_model.pb + variables/)"

    @classmethod
    def claims(cls, source: str) -> bool:
        path = Path(source)
        return path.is_dir() and (path / "saved_model.pb").is_file()

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        tf = import_tf(self.format)
        loaded, fn = load_signature(Path(source), options.signature)
        kwargs = fn.structured_input_signature[1]
        names = _names(fn)
        discovered = [
            (n, [None if d is None else int(d) for d in kwargs[n].shape], kwargs[n].dtype)
            for n in names
        ]
        specs = input_specs(tf, discovered, options)

        def call(*args: Any) -> Any:
            return fn(**dict(zip(names, args, strict=True)))

        out = workdir / "exported.onnx"
        config = convert_function(call, specs, out, options, self.format)
        config["signature"] = signature_name(options)
        return Export(
            onnx_path=out, runner=_runner(loaded, fn, signature_name(options)), config=config
        )

    def open_runner(
        self, source: str, options: ConvertOptions, artifact: ModelArtifact
    ) -> SourceRunner | None:
        loaded, fn = load_signature(Path(source), options.signature)
        return _runner(loaded, fn, signature_name(options))


def signature_name(options: ConvertOptions) -> str:
    return options.signature or DEFAULT_SIGNATURE


def _runner(loaded: Any, fn: Any, signature: str) -> TFRunner:
    """A serving signature is a graph ``ConcreteFunction``: the reference and the served path are
    one and the same call, so there is no eager path to time beside it."""

    def call(feeds: dict[str, Any]) -> dict[str, Any]:
        _ = loaded  # the signature's variables live as long as the loaded object
        return {k: v.numpy() for k, v in fn(**feeds).items()}

    return TFRunner(
        call,
        "tensorflow",
        description=f"tensorflow SavedModel signature {signature!r} (graph ConcreteFunction)",
    )
