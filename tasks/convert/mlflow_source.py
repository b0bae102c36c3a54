"""MLflow model URIs (``models:/NAME/3``, ``models:/NAME@alias``, ``runs:/ID/model``) -> ONNX.

The model is downloaded with ``mlflow.artifacts`` (tracking/registry from ``MLFLOW_TRACKING_URI``),
its flavor read from the MLmodel file, and the stored files handed to the converter of that kind:
onnx -> onnx; pytorch saved as ``pt2`` -> torch_export; sklearn saved with skops -> sklearn;
tensorflow/keras -> keras or tf_savedmodel; transformers -> huggingface. Pickle-based flavors
(pytorch ``pickle``, sklearn ``pickle``/``cloudpickle``) are refused: loading them runs code.
Transformers models logged for a generation task (text generation, summarization, translation,
speech recognition, ...) are refused too: generation models are not supported yet.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import Converter, Export, SourceRunner, get_converter

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

SCHEMES = ("models:/", "runs:/")


def download(uri: str, dst: Path) -> Path:
    """Download the model at ``uri`` into ``dst``; ModelFileError names what to check."""
    import mlflow
    from mlflow.exceptions import MlflowException

    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    except (MlflowException, OSError) as exc:
        raise ModelFileError(
            f"cannot download {uri} from MLflow (tracking URI {mlflow.get_tracking_uri()}): "
            f"{str(exc).strip().splitlines()[0]}. Check the model name, version/alias or run id, "
            "and MLFLOW_TRACKING_URI."
        ) from exc
    return Path(local)


def resolve(local: Path, uri: str) -> tuple[str, Path, str]:
    """(format key, path to hand to that converter, flavor) for a downloaded MLflow model."""
    from mlflow.models import Model

    if not (local / "MLmodel").is_file():
        raise ModelFileError(f"{uri} is not an MLflow model (no MLmodel file in its artifacts)")
    flavors: dict[str, Any] = Model.load(str(local / "MLmodel")).flavors
    if "onnx" in flavors:
        return "onnx", local / flavors["onnx"]["data"], "onnx"
    if "pytorch" in flavors:
        conf = flavors["pytorch"]
        data = local / conf.get("model_data", "data")
        pt2 = data / "model.pt2" if data.is_dir() else data
        if pt2.suffix == ".pt2" and pt2.is_file():
            return "torch_export", pt2, "pytorch"
        raise _pickle_refusal(
            uri,
            "pytorch",
            "mlflow.pytorch.log_model(..., serialization_format='pt2', input_example=...)",
        )
    if "sklearn" in flavors:
        conf = flavors["sklearn"]
        if conf.get("serialization_format") == "skops":
            return "sklearn", local / conf["pickled_model"], "sklearn"
        raise _pickle_refusal(
            uri,
            f"sklearn ({conf.get('serialization_format')})",
            "mlflow.sklearn.log_model(..., serialization_format='skops')",
        )
    if "transformers" in flavors:
        from bladeflow.tasks.convert.hf_source import is_hf_folder, refuse_generation_model

        refuse_generation_flavor(flavors["transformers"], uri)
        for cfg in sorted(local.rglob("config.json")):
            if is_hf_folder(cfg.parent):
                try:
                    refuse_generation_model(cfg.parent)
                except ModelFileError as exc:
                    raise ModelFileError(f"{uri}: {exc}") from exc
                _add_logged_tokenizer(local / "components" / "tokenizer", cfg.parent)
                return "huggingface", cfg.parent, "transformers"
        raise ModelFileError(
            f"{uri} is a transformers model without local weights (a reference to the Hub?); "
            "log it with its weights (save_pretrained=True)"
        )
    for flavor in ("keras", "tensorflow"):
        if flavor in flavors:
            for pattern in ("*.keras", "*.h5"):
                found = sorted(local.rglob(pattern))
                if found:
                    return "keras", found[0], flavor
            for pb in sorted(local.rglob("saved_model.pb")):
                return "tf_savedmodel", pb.parent, flavor
    raise ModelFileError(
        f"{uri} has flavor(s) {sorted(flavors)}; bladeflow converts MLflow models of flavor "
        "onnx, pytorch (pt2), sklearn (skops), keras/tensorflow and transformers"
    )


# Pipeline tasks of MLflow's transformers flavor that generate text (a decoding loop).
_GENERATION_TASKS = (
    "text-generation",
    "text2text-generation",
    "summarization",
    "translation",
    "automatic-speech-recognition",
    "image-to-text",
    "image-text-to-text",
    "conversational",
    "llm/",
)


def refuse_generation_flavor(conf: dict[str, Any], uri: str) -> None:
    """Refuse an MLflow transformers model logged for a generation task (from the MLmodel file,
    before its config is read): its pipeline task or its model class names generation."""
    from bladeflow.tasks.convert.hf_source import GENERATION_SUFFIXES, generation_refusal

    task = str(conf.get("task") or "")
    model_class = str(conf.get("pipeline_model_type") or "")
    if task.startswith(_GENERATION_TASKS) or model_class.endswith(GENERATION_SUFFIXES):
        what = ", ".join(x for x in (model_class, f"task {task!r}" if task else "") if x)
        raise generation_refusal(f"{uri} is a transformers generation model ({what})")


def _add_logged_tokenizer(components: Path, model_dir: Path) -> None:
    """Copy the tokenizer MLflow logs apart (components/tokenizer) beside the weights, so the
    Hugging Face converter loads it and keeps it as the tokenizer asset. Files already in the
    model folder win; only the downloaded scratch copy is changed."""
    if not components.is_dir():
        return
    for item in sorted(components.iterdir()):
        if item.is_file() and not (model_dir / item.name).exists():
            shutil.copy2(item, model_dir / item.name)


def _pickle_refusal(uri: str, flavor: str, how: str) -> ModelFileError:
    return ModelFileError(
        f"{uri} is a {flavor} model stored as a Python pickle: loading it runs arbitrary code, so "
        f"bladeflow refuses it. Log the model again with {how} and convert that version."
    )


class MlflowConverter(Converter):
    """Downloads an MLflow model and converts it with the converter of its flavor."""

    format = "mlflow"
    description = "an MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/PATH)"
    order = 5

    @classmethod
    def claims(cls, source: str) -> bool:
        return source.startswith(SCHEMES)

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        local = download(source, workdir / "mlflow-model")
        fmt, path, flavor = resolve(local, source)
        inner = get_converter(fmt).export(str(path), workdir, options)
        inner.config.update({"mlflow_flavor": flavor, "inner_format": fmt})
        inner.hashed = inner.hashed or path
        return inner

    def open_runner(
        self, source: str, options: ConvertOptions, artifact: ModelArtifact
    ) -> SourceRunner | None:
        local = download(source, Path(tempfile.mkdtemp(prefix="bladeflow-mlflow-")))
        fmt, path, _ = resolve(local, source)
        return get_converter(fmt).open_runner(str(path), options, artifact)
