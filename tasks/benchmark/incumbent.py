"""The version to beat: a registered version downloaded so it can be timed beside new candidates.

Re-optimization must not register a model that is not faster than the one already serving, and a
comparison is only fair when both are timed in the same interleaved run on the same machine. So
the optimize flow (``must_beat``) and the nightly flow download the incumbent with this module and
benchmark it together with the candidates.
"""

from __future__ import annotations

from pathlib import Path

from bladeflow.core import registry
from bladeflow.core.contract import ModelArtifact, Provenance, SessionConfig
from bladeflow.core.errors import UserInputError
from bladeflow.core.hashing import sha256_path
from bladeflow.core.mlflow_client import mlflow_client as client
from bladeflow.core.settings import Settings

INCUMBENT = "incumbent"  # its label in the benchmark report


def resolve_version(
    settings: Settings,
    name: str,
    ref: str,
    what: str = "must_beat",
    hint: str = ", or leave must_beat unset for a first run",
) -> str:
    """The version number ``ref`` (a number or an alias such as ``champion``) names.

    ``what`` names the argument ``ref`` came from and ``hint`` ends the error, so the message fits
    the command that asked (``--must-beat``, ``tune-serving NAME VERSION``).
    """
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        if ref.isdigit():
            return str(c.get_model_version(name, ref).version)
        return str(c.get_model_version_by_alias(name, ref).version)
    except MlflowException as exc:
        raise UserInputError(
            f"{what}={ref!r}: model {name!r} has no such version or alias ({exc.message}). "
            f"Give an existing version number or alias{hint}."
        ) from exc


def onnx_artifact(path: Path, source: str) -> ModelArtifact:
    """A ModelArtifact for an ONNX file on disk (signature read from the graph, weights not)."""
    import onnx

    from bladeflow.tasks.convert.onnx_source import signature_of

    return ModelArtifact(
        path=str(path),
        format="onnx",
        sha256=sha256_path(path),
        size_bytes=path.stat().st_size,
        signature=signature_of(onnx.load(str(path), load_external_data=False)),
        provenance=Provenance(source=source),
    )


def download_version(
    settings: Settings, name: str, version: str, folder: Path
) -> tuple[ModelArtifact, SessionConfig]:
    """Download version ``version`` of ``name``; return its ONNX file and recorded session."""
    import mlflow.artifacts

    c = client(settings)
    local = Path(
        mlflow.artifacts.download_artifacts(
            # Not models:/...: that would resolve through the process-wide registry URI.
            artifact_uri=c.get_model_version_download_uri(name, version),
            dst_path=str(folder),
            tracking_uri=settings.tracking_uri,
        )
    )
    mv = c.get_model_version(name, version)
    session = registry.session_from_recipe(mv.tags.get(registry.TAG_RECIPE, "[]"))
    return onnx_artifact(local / "model.onnx", f"models:/{name}/{version}"), session
