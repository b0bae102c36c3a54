"""torch.export ExportedProgram files (.pt2, torch.export.save) -> ONNX."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import Converter, Export, SourceRunner, check_size, check_zip
from bladeflow.tasks.convert.torch_common import (
    TorchRunner,
    export_module,
    first_line,
    import_torch,
)

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions


_HOW_TO_SAVE = "Save it with torch.export.save(torch.export.export(model, args), 'model.pt2')."


def load_program(path: Path) -> Any:
    torch = import_torch("torch.export .pt2")
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist or is not a file")
    check_zip(path, "torch.export program (.pt2)", _HOW_TO_SAVE)
    try:
        return torch.export.load(str(path))  # a zip of serialized graph + weights, no pickle
    except (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise ModelFileError(
            f"{path} is not a readable torch.export program ({first_line(exc)}); save it with "
            "torch.export.save(torch.export.export(model, args), 'model.pt2')"
        ) from exc


def example_inputs(program: Any) -> dict[str, Any]:
    """User inputs of the program with the example values it recorded (or zeros of its shape)."""
    torch = import_torch("torch.export .pt2")
    specs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    recorded = getattr(program, "example_inputs", None)
    args = list(recorded[0]) if recorded else []
    example: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        name = spec.arg.name
        if i < len(args) and isinstance(args[i], torch.Tensor):
            example[name] = args[i]
            continue
        val = nodes[name].meta.get("val")
        shape = [int(d) if isinstance(d, int) else 2 for d in val.shape]
        example[name] = torch.zeros(shape, dtype=val.dtype)
    return example


def as_module(program: Any) -> Any:
    """The program's module behind a plain nn.Module.

    The TorchScript exporter switches modules to eval with ``train(False)``, which an
    ExportedProgram's module refuses; held outside the submodule tree, it is never asked to.
    """
    torch = import_torch("torch.export .pt2")
    inner = program.module()
    for param in inner.parameters():
        param.requires_grad_(False)  # captured as constants (initializers) by the tracer
    module_base: Any = torch.nn.Module

    class Program(module_base):
        def __init__(self) -> None:
            super().__init__()
            object.__setattr__(self, "inner", inner)

        def forward(self, *args: Any) -> Any:
            return self.inner(*args)

    return Program().eval()


def program_dynamic_axes(program: Any, inputs: list[str]) -> dict[str, dict[int, str]]:
    """The input dims the program keeps symbolic (a program exported static stays static)."""
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    axes: dict[str, dict[int, str]] = {}
    for name in inputs:
        val = nodes[name].meta.get("val")
        dims = {}
        for axis, dim in enumerate(getattr(val, "shape", ())):
            if not isinstance(dim, int):
                dims[axis] = {0: "batch", 1: "sequence"}.get(axis, f"dim_{axis}")
        axes[name] = dims
    return axes


class TorchExportConverter(Converter):
    """Converts a torch.export ExportedProgram to ONNX (its module, TorchScript exporter)."""

    format = "torch_export"
    description = "a torch.export ExportedProgram (.pt2 from torch.export.save)"

    @classmethod
    def claims(cls, source: str) -> bool:
        path = Path(source)
        return path.is_file() and path.suffix.lower() == ".pt2"

    @classmethod
    def precheck(cls, source: str) -> None:
        check_size(source)
        check_zip(Path(source), "torch.export program (.pt2)", _HOW_TO_SAVE)

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        torch = import_torch(self.format)
        program = load_program(Path(source))
        example = example_inputs(program)
        for name, shape in options.input_shapes.items():
            if name in example:
                example[name] = torch.randn(*shape).to(example[name].dtype)
        module = as_module(program)
        if options.dynamic_axes is None:
            options = options.model_copy(
                update={"dynamic_axes": program_dynamic_axes(program, list(example))}
            )
        out = workdir / "exported.onnx"
        outputs, config = export_module(module, example, out, options, self.format)
        return Export(
            onnx_path=out,
            runner=TorchRunner(module, list(example), outputs, name="pytorch-export"),
            config=config,
        )

    def open_runner(
        self, source: str, options: ConvertOptions, artifact: ModelArtifact
    ) -> SourceRunner | None:
        module = as_module(load_program(Path(source)))
        return TorchRunner(
            module,
            [i.name for i in artifact.signature.inputs],
            [o.name for o in artifact.signature.outputs],
            name="pytorch-export",
        )
