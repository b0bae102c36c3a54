"""Shared PyTorch -> ONNX export (TorchScript exporter, dynamo=False) and the eager runner.

``dynamo=False`` with eager attention is what ONNX Runtime's transformer optimizer fuses fully
(see docs/STACK-NOTES). Dynamic axes default to ``batch`` on axis 0 of every input and output and
``sequence`` on axis 1 of integer rank-2 inputs (token ids) and rank-3 inputs (sequences).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.errors import ConversionError, missing_framework
from bladeflow.tasks.convert.torch_fastpath import register_fastpath_symbolics

if TYPE_CHECKING:
    from bladeflow.tasks.convert.base import SourcePath
    from bladeflow.tasks.convert.dispatch import ConvertOptions

DEFAULT_OPSET = 17


def import_torch(fmt: str) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise missing_framework(fmt, "torch", "torch", exc) from exc
    return torch


def default_dynamic_axes(
    inputs: dict[str, Any], outputs: dict[str, Any]
) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in inputs.items():
        dims = {0: "batch"} if tensor.dim() >= 1 else {}
        is_int = not tensor.is_floating_point()
        if (tensor.dim() == 2 and is_int) or tensor.dim() == 3:
            dims[1] = "sequence"
        axes[name] = dims
    has_sequence = any(1 in d for d in axes.values())
    for name, tensor in outputs.items():
        rank = tensor.dim() if hasattr(tensor, "dim") else 0
        axes[name] = {0: "batch"} if rank >= 1 else {}
        if has_sequence and rank >= 3:
            axes[name][1] = "sequence"
    return axes


def flatten_outputs(value: Any) -> list[Any]:
    """Tensors of a model's output in the order the ONNX exporter flattens them."""
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_outputs(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in flatten_outputs(v)]
    return [value]


def output_names_for(value: Any) -> list[str]:
    if isinstance(value, dict) and all(
        not isinstance(v, dict | list | tuple) for v in value.values()
    ):
        return [str(k) for k in value]
    flat = flatten_outputs(value)
    return ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))]


_SERVED_AS = {
    "pytorch-eager": "pytorch nn.Module",
    "pytorch-export": "pytorch torch.export program (graph module)",
    "torchscript": "torchscript module as loaded (already compiled)",
}


class TorchRunner:
    """Runs a torch module in eager (or TorchScript) mode on numpy inputs, under
    ``torch.inference_mode()`` -- how a PyTorch service runs a model (no autograd bookkeeping).
    """

    def __init__(
        self,
        module: Any,
        input_names: list[str],
        output_names: list[str],
        name: str = "pytorch-eager",
        call: Callable[[Any, list[Any]], Any] | None = None,
    ):
        self.name = name
        self._module = module
        self._inputs = input_names
        self._outputs = output_names
        self._call = call or (lambda m, args: m(*args))

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self._inputs]
        with torch.inference_mode():
            flat = flatten_outputs(self._call(self._module, args))
        return {n: t.detach().cpu().numpy() for n, t in zip(self._outputs, flat, strict=True)}

    def timing_paths(self, threads: int | None = None) -> list[SourcePath]:
        """One path: the module under ``inference_mode`` with ``threads`` intra-op threads (the
        ONNX candidates' count), so the comparison is not threads against threads. There is no
        separate eager path: this is the served one (TorchScript and torch.export modules are
        already compiled graphs)."""
        import torch

        from bladeflow.tasks.convert.base import SERVED, SourcePath

        count = threads or torch.get_num_threads()
        what = _SERVED_AS.get(self.name, self.name)

        def timed(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            # torch's thread count is process-wide: others (the reference run, another model)
            # may change it between calls, so it is checked on every call (a cheap read).
            if torch.get_num_threads() != count:
                torch.set_num_threads(count)
            return self(feeds)

        threads_text = f"{count} thread{'' if count == 1 else 's'}"
        return [SourcePath(SERVED, f"{what} under inference_mode, {threads_text}", timed)]


def export_module(
    module: Any,
    example: dict[str, Any],
    output: Path,
    options: ConvertOptions,
    fmt: str,
    output_names: list[str] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Export ``module`` called positionally with ``example``'s tensors; returns names + config."""
    torch = import_torch(fmt)
    args = tuple(example.values())
    with torch.inference_mode():
        sample = module(*args)
    names = output_names or output_names_for(sample)
    flat = dict(zip(names, flatten_outputs(sample), strict=False))
    axes = (
        options.dynamic_axes
        if options.dynamic_axes is not None
        else default_dynamic_axes(example, flat)
    )
    opset = options.target_opset or DEFAULT_OPSET
    # Traced nn.TransformerEncoder / nn.MultiheadAttention record fused fast-path ops.
    register_fastpath_symbolics()
    try:
        torch.onnx.export(
            module,
            args,
            str(output),
            input_names=list(example),
            output_names=names,
            dynamic_axes={k: dict(v) for k, v in axes.items()},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    except torch.onnx.errors.UnsupportedOperatorError as exc:
        raise unsupported(exc, opset) from exc
    except torch.onnx.errors.OnnxExporterError as exc:
        raise unsupported(exc, opset) from exc
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConversionError(
            f"torch.onnx.export (dynamo=False, opset {opset}) failed: {first_line(exc)}. Check "
            "that the model runs on the example inputs, or pass input_shapes / dynamic_axes."
        ) from exc
    config = {
        "exporter": "torch.onnx.export(dynamo=False)",
        "opset": opset,
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in axes.items()},
        "example_shapes": {k: list(v.shape) for k, v in example.items()},
    }
    return names, config


def unsupported(exc: BaseException, opset: int) -> ConversionError:
    text = str(exc)
    match = re.search(r"operator '([\w:.]+)'", text)
    op = match.group(1) if match else "an operator"
    node = re.search(re.escape(op) + r"\(.*?# ([^\n]+)", text) if match else None
    where = f" (node at {node.group(1).strip()})" if node else ""
    return ConversionError(
        f"PyTorch cannot export {op}{where} to ONNX opset {opset}: {first_line(exc)}. Try a newer "
        "target_opset, replace that operation in the model, or register a custom symbolic "
        "(torch.onnx.register_custom_op_symbolic) backed by an ONNX Runtime custom op."
    )


def to_tensors(example: Any, fmt: str) -> dict[str, Any]:
    """A dict of example inputs (tensors or arrays) as tensors."""
    torch = import_torch(fmt)
    if not isinstance(example, dict) or not example:
        raise ModelFileError(
            f"{fmt}: example inputs must be a non-empty dict of input name -> tensor, "
            f"got {type(example).__name__}"
        )
    return {
        str(k): v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        for k, v in example.items()
    }


def synth_inputs(names: list[str], options: ConvertOptions, fmt: str) -> dict[str, Any]:
    """float32 example inputs from ``input_shapes`` (sources that carry no shapes)."""
    torch = import_torch(fmt)
    missing = [n for n in names if n not in options.input_shapes]
    if missing:
        raise ModelFileError(
            f"a {fmt} file does not record its input shapes; pass input_shapes for {missing}, "
            f"e.g. input_shapes={{{missing[0]!r}: [1, 3, 224, 224]}} (inputs: {names})"
        )
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(*options.input_shapes[n], generator=gen) for n in names}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__
