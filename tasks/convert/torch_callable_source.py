"""A Python reference ``package.module:callable`` that builds a torch model -> ONNX.

The callable takes no arguments and returns ``(module, example_inputs)``: an ``nn.Module`` and a
dict of input name -> example tensor (or numpy array). The inputs are passed to ``forward``
positionally in the dict's order; their shapes are the export's example shapes (overridable with
``input_shapes``). Importing the reference runs that Python code: pass only your own code.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import Converter, Export, SourceRunner
from bladeflow.tasks.convert.torch_common import (
    TorchRunner,
    export_module,
    import_torch,
    to_tensors,
)

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def build(source: str) -> tuple[Any, dict[str, Any]]:
    """Import ``module:callable`` and call it; returns (eval-mode module, example tensors)."""
    torch = import_torch("PyTorch callable")
    module_name, _, attr = source.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelFileError(
            f"cannot import {source!r} ({exc}); give 'package.module:function' importable from "
            "the current environment"
        ) from exc
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ModelFileError(
            f"{source} must return (torch.nn.Module, {{input_name: example_tensor}}), "
            f"got {type(result).__name__}"
        )
    model, example = result
    if not isinstance(model, torch.nn.Module):
        raise ModelFileError(f"{source} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval(), to_tensors(example, "PyTorch callable")


class TorchCallableConverter(Converter):
    """Converts the nn.Module a ``module:callable`` builds to ONNX."""

    format = "torch_callable"
    description = "a 'package.module:function' returning (torch.nn.Module, example inputs dict)"
    order = 90

    @classmethod
    def claims(cls, source: str) -> bool:
        return bool(_REFERENCE.match(source)) and not Path(source).exists()

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        torch = import_torch(self.format)
        model, example = build(source)
        for name, shape in options.input_shapes.items():
            if name in example:
                ex = example[name]
                example[name] = (
                    torch.randn(*shape).to(ex.dtype)
                    if ex.is_floating_point()
                    else torch.zeros(shape, dtype=ex.dtype)
                )
        out = workdir / "exported.onnx"
        outputs, config = export_module(model, example, out, options, self.format)
        return Export(
            onnx_path=out,
            runner=TorchRunner(model, list(example), outputs),
            config=config,
        )

    def open_runner(
        self, source: str, options: ConvertOptions, artifact: ModelArtifact
    ) -> SourceRunner | None:
        model, _ = build(source)
        return TorchRunner(
            model,
            [i.name for i in artifact.signature.inputs],
            [o.name for o in artifact.signature.outputs],
        )
