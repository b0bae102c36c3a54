"""Caffe (.prototxt + .caffemodel) -> ONNX with bladeflow's own converter.

No PyPI Caffe converter works with current onnx/protobuf (caffe2onnx 2.0.1 needs onnx==1.6 and its
generated caffe_pb2 fails under protobuf >= 4; caffe-onnx 0.1.2 pins protobuf 3.20), so the net is
read with protobuf's runtime (caffe_proto) and translated layer by layer (caffe_onnx). The
conversion is verified against OpenCV's dnn Caffe importer, an implementation independent of ours;
where OpenCV cannot load or run the net, against the NumPy reference in caffe_reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import Converter, Export, SourceRunner, check_size
from bladeflow.tasks.convert.caffe_onnx import DEFAULT_OPSET, build_onnx, check_layers
from bladeflow.tasks.convert.caffe_proto import Net, load_net
from bladeflow.tasks.convert.caffe_reference import ReferenceRunner

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

_EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf cannot write one message over 2 GiB


def resolve(source: str, weights: str | None = None) -> tuple[Path, Path | None]:
    """The (.prototxt, .caffemodel) pair of ``source``: a folder, either file of the pair.

    A .prototxt takes ``weights``, else the .caffemodel of the same stem beside it, else the only
    .caffemodel in its folder; a .caffemodel takes the .prototxt of its stem, else deploy.prototxt.

    Raises:
        ModelFileError: a file is missing, or the pair is ambiguous.
    """
    path = Path(source)
    if not path.exists():
        raise ModelFileError(f"Caffe model {source!r} does not exist: check the path")
    if path.is_dir():
        protos = [p for p in sorted(path.glob("*.prototxt")) if "solver" not in p.stem.lower()]
        models = sorted(path.glob("*.caffemodel"))
        paired = [p for p in protos if p.with_suffix(".caffemodel") in models]
        deploy = [p for p in protos if p.stem.lower() == "deploy"]
        choice = paired if len(paired) == 1 else deploy if len(deploy) == 1 else protos
        if len(choice) != 1 or (len(models) > 1 and not paired):
            raise ModelFileError(
                f"{source} holds .prototxt files {[p.name for p in protos]} and .caffemodel "
                f"files {[m.name for m in models]}; bladeflow cannot tell which belong together. "
                "Pass the .prototxt and name its .caffemodel with the same stem."
            )
        return resolve(str(choice[0]), weights)
    if path.suffix.lower() == ".caffemodel":
        for proto in (path.with_suffix(".prototxt"), path.with_name("deploy.prototxt")):
            if proto.is_file():
                return proto, path
        raise ModelFileError(
            f"{path} holds weights only; its net definition {path.with_suffix('.prototxt').name} "
            "(or deploy.prototxt) is not beside it. Put the deploy .prototxt next to it with the "
            "same stem, or pass the .prototxt."
        )
    if weights:
        if not Path(weights).is_file():
            raise ModelFileError(f"Caffe weights {weights!r} do not exist: check the path")
        return path, Path(weights)
    sibling = path.with_suffix(".caffemodel")
    if sibling.is_file():
        return path, sibling
    others = sorted(path.parent.glob("*.caffemodel"))
    return path, others[0] if len(others) == 1 else None


def _dynamic_batch(options: ConvertOptions) -> bool:
    axes = options.dynamic_axes
    return axes is None or any(0 in dims for dims in axes.values())


def _input_shapes(net: Net, options: ConvertOptions) -> dict[str, list[int]]:
    unknown = sorted(set(options.input_shapes) - set(net.inputs))
    if unknown:
        raise ModelFileError(
            f"input_shapes names {unknown}, which the Caffe net does not declare; its inputs "
            f"are {list(net.inputs)}"
        )
    return {n: options.input_shapes.get(n) or s for n, s in net.inputs.items()}


class CaffeConverter(Converter):
    """Converts a BVLC Caffe net (current or V1 format) to ONNX, verified against OpenCV."""

    format = "caffe"
    description = "a Caffe .prototxt + .caffemodel pair (same stem, or a folder holding both)"

    @classmethod
    def claims(cls, source: str) -> bool:
        path = Path(source)
        if path.is_dir():
            return any(path.glob("*.caffemodel")) and any(path.glob("*.prototxt"))
        return path.is_file() and path.suffix.lower() in (".caffemodel", ".prototxt")

    @classmethod
    def precheck(cls, source: str) -> None:
        prototxt, caffemodel = resolve(source)
        for part in (prototxt, caffemodel):
            if part is not None:
                check_size(str(part))
        if caffemodel is not None and caffemodel.stat().st_size == 0:
            raise ModelFileError(f"{caffemodel} is empty (0 bytes): the copy did not finish")
        check_layers(load_net(prototxt, None))  # text only: unknown layer types fail here

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        prototxt, caffemodel = resolve(source, getattr(options, "weights", None))
        net = load_net(prototxt, caffemodel)
        _check_weights_found(net, prototxt, caffemodel)
        shapes = _input_shapes(net, options)
        dynamic = _dynamic_batch(options)
        model, outputs = build_onnx(net, shapes, dynamic, options.target_opset)
        out = workdir / "exported.onnx"
        large = model.ByteSize() > _EXTERNAL_DATA_THRESHOLD
        onnx.save_model(
            model,
            str(out),
            save_as_external_data=large,
            location="exported.onnx.data" if large else None,
        )
        expected = {
            o.name: [d.dim_value for d in o.type.tensor_type.shape.dim][1:]
            for o in model.graph.output
        }
        runner = open_caffe_runner(prototxt, caffemodel, net, shapes, expected)
        config: dict[str, Any] = {
            "exporter": "bladeflow caffe converter",
            "prototxt": str(prototxt),
            "caffemodel": str(caffemodel) if caffemodel else None,
            "caffe_format": "V1 layers" if net.legacy else "layer",
            "opset": options.target_opset or DEFAULT_OPSET,
            "input_shapes": shapes,
            "dynamic_batch": _is_dynamic(model),
            "outputs": outputs,
            "verified_against": runner.name,
            "why_not_opencv": getattr(runner, "reason", None),
        }
        hashed = Path(source) if Path(source).is_dir() else caffemodel or prototxt
        return Export(onnx_path=out, runner=runner, config=config, hashed=hashed)

    def open_runner(
        self, source: str, options: ConvertOptions, artifact: ModelArtifact
    ) -> SourceRunner | None:
        prototxt, caffemodel = resolve(source, getattr(options, "weights", None))
        net = load_net(prototxt, caffemodel)
        expected = {
            o.name: [d for d in o.shape[1:] if isinstance(d, int)]
            for o in artifact.signature.outputs
        }
        return open_caffe_runner(prototxt, caffemodel, net, _input_shapes(net, options), expected)


_LEARNED = {"Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "PReLU"}


def _check_weights_found(net: Net, prototxt: Path, caffemodel: Path | None) -> None:
    bare = [x.name for x in net.layers if x.type in _LEARNED and not x.blobs]
    if caffemodel is None and bare:
        raise ModelFileError(
            f"no weights for {prototxt}: layers {bare[:3]} need trained blobs and there is no "
            f"{prototxt.with_suffix('.caffemodel').name} (nor a single .caffemodel) beside it. "
            "Name the weights file after the .prototxt, or pass it as the source."
        )


def _is_dynamic(model: onnx.ModelProto) -> bool:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return bool(dims) and dims[0].HasField("dim_param")


class OpenCVRunner:
    """Runs the Caffe net with OpenCV's dnn module (its own Caffe importer), on the CPU."""

    name = "opencv-dnn-caffe"

    def __init__(self, net: Any, inputs: list[str], outputs: dict[str, str]):
        self._net, self._inputs, self._outputs = net, inputs, outputs

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in self._inputs:
            self._net.setInput(np.ascontiguousarray(feeds[name], dtype=np.float32), name)
        layers = list(self._outputs.values())
        values = self._net.forward(layers)
        return {blob: np.asarray(v) for blob, v in zip(self._outputs, values, strict=True)}


def opencv_deviation(net: Net) -> str | None:
    """Where OpenCV 4.x's Caffe importer computes something else than Caffe (measured with
    4.14 against BVLC's layer code), or None."""
    for layer in net.layers:
        p = layer.param
        if layer.type == "InnerProduct" and p.inner_product_param.transpose:
            return f"OpenCV ignores InnerProduct transpose (layer {layer.name!r})"
        if layer.type == "LRN" and p.lrn_param.k != 1:
            return f"OpenCV ignores LRN k={p.lrn_param.k:g}, using 1 (layer {layer.name!r})"
        conv = layer.type in ("Convolution", "Deconvolution")
        if conv or layer.type == "Pooling":
            q = p.convolution_param if conv else p.pooling_param
            for name in ("pad", "stride", "kernel"):
                if q.HasField(f"{name}_h") != q.HasField(f"{name}_w"):
                    return f"OpenCV ignores a lone {name}_h/{name}_w (layer {layer.name!r})"
    return None


def open_caffe_runner(
    prototxt: Path,
    caffemodel: Path | None,
    net: Net,
    shapes: dict[str, list[int]],
    expected: dict[str, list[int]],
) -> SourceRunner:
    """OpenCV's runner when it can be trusted with the net, loads it and gives the ``expected``
    output shapes (batch axis left out) on zeros; else the NumPy reference (``reason`` says why)."""
    try:
        import cv2
    except ImportError as exc:
        return ReferenceRunner(net, f"OpenCV is not installed ({exc})")
    deviation = opencv_deviation(net)
    if deviation:
        return ReferenceRunner(net, deviation)
    outputs: dict[str, str] = {}
    for blob in [b for b in net.outputs() if b not in net.inputs]:
        layer, index = net.last_writer(blob)
        if index:
            return ReferenceRunner(net, f"OpenCV returns only the first top of {layer.name!r}")
        outputs[blob] = layer.name
    try:
        if net.test_text is None:
            files = [str(prototxt), *([str(caffemodel)] if caffemodel else [])]
            cv_net = cv2.dnn.readNetFromCaffe(*files)
        else:  # OpenCV ignores include/exclude rules: give it the TEST-phase layers only
            text = np.frombuffer(net.test_text.encode(), np.uint8)
            weights = [np.fromfile(caffemodel, np.uint8)] if caffemodel else []
            cv_net = cv2.dnn.readNetFromCaffe(text, *weights)
        cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        cv_net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        runner = OpenCVRunner(cv_net, list(net.inputs), outputs)
        got = runner({n: np.zeros(s, np.float32) for n, s in shapes.items()})
    except cv2.error as exc:
        return ReferenceRunner(net, f"OpenCV cannot run the net: {_first_line(exc)}")
    for blob, dims in expected.items():
        if blob in got and list(np.shape(got[blob]))[1:] != dims:
            return ReferenceRunner(
                net, f"OpenCV gives {blob!r} the shape {list(np.shape(got[blob]))}, not {dims}"
            )
    return runner


def _first_line(exc: BaseException) -> str:
    lines = [x for x in str(exc).strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
