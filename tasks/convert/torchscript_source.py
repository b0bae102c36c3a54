"""TorchScript files (torch.jit.save) -> ONNX. Pickles posing as TorchScript are refused."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import Converter, Export, SourceRunner, check_size
from bladeflow.tasks.convert.torch_common import (
    TorchRunner,
    export_module,
    first_line,
    import_torch,
    synth_inputs,
)

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")


def check_torchscript(path: Path) -> None:
    """Refuse anything that is not a TorchScript archive without unpickling it."""
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist or is not a file")
    with path.open("rb") as fh:
        head = fh.read(2)
    if not zipfile.is_zipfile(path):
        kind = "a Python pickle" if head[:1] == b"\x80" else "not a TorchScript archive"
        raise ModelFileError(
            f"{path} is {kind}, not TorchScript: bladeflow never unpickles model files (that runs "
            "arbitrary code). Save the model with torch.jit.save(torch.jit.script(model)) or "
            "torch.export.save(torch.export.export(model, args), 'model.pt2')."
        )
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if not any("/code/" in n for n in names) or not any(n.endswith("constants.pkl") for n in names):
        raise ModelFileError(
            f"{path} is a torch.save() pickle archive, not TorchScript: loading it would unpickle "
            "Python objects (arbitrary code), so bladeflow refuses it. Save the model with "
            "torch.jit.save(torch.jit.script(model)) or as a torch.export .pt2."
        )


def load_torchscript(path: Path) -> Any:
    torch = import_torch("TorchScript")
    check_torchscript(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise ModelFileError(f"cannot load TorchScript {path}: {first_line(exc)}") from exc
    return module.eval()


def input_names(module: Any) -> list[str]:
    args = module.forward.schema.arguments[1:]  # the first is self
    return [a.name for a in args]


class TorchScriptConverter(Converter):
    """Converts a TorchScript module to ONNX with the TorchScript exporter.

    Traces of eval-mode ``nn.TransformerEncoder``/``nn.MultiheadAttention`` hold PyTorch's fused
    fast-path ops; ``export_module`` decomposes them (see ``torch_fastpath``) and the result is
    verified against this TorchScript module.
    """

    format = "torchscript"
    description = "a TorchScript file (.pt/.pth/.ts from torch.jit.save; input_shapes required)"

    @classmethod
    def claims(cls, source: str) -> bool:
        path = Path(source)
        return path.is_file() and path.suffix.lower() in SUFFIXES

    @classmethod
    def precheck(cls, source: str) -> None:
        check_size(source)
        check_torchscript(Path(source))

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        module = load_torchscript(Path(source))
        names = input_names(module)
        example = synth_inputs(names, options, self.format)
        out = workdir / "exported.onnx"
        outputs, config = export_module(module, example, out, options, self.format)
        return Export(
            onnx_path=out,
            runner=TorchRunner(module, names, outputs, name="torchscript"),
            config=config,
        )

    def open_runner(
        self, source: str, options: ConvertOptions, artifact: ModelArtifact
    ) -> SourceRunner | None:
        module = load_torchscript(Path(source))
        return TorchRunner(
            module,
            [i.name for i in artifact.signature.inputs],
            [o.name for o in artifact.signature.outputs],
            name="torchscript",
        )
