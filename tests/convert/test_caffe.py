"""Caffe sources: nets built in code as NetParameter messages, converted, checked against OpenCV."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format, text_format

from bladeflow.core.errors import ModelFileError, UserInputError
from bladeflow.tasks.convert.caffe_onnx import pool_output_size
from bladeflow.tasks.convert.caffe_proto import load_net, net_class
from bladeflow.tasks.convert.caffe_reference import ReferenceRunner
from bladeflow.tasks.convert.caffe_source import CaffeConverter, open_caffe_runner, resolve
from bladeflow.tasks.convert.dispatch import (
    ConversionError,
    ConvertOptions,
    convert_source,
    open_source_runner,
)

cv2 = pytest.importorskip("cv2")
RNG = np.random.default_rng(7)


class NetBuilder:
    """A NetParameter with random weights; ``save`` writes deploy text + binary weights."""

    def __init__(self, name: str, legacy: bool = False):
        self.msg = net_class()(name=name)
        self.legacy = legacy

    def input(self, name: str, shape: list[int], how: str = "input_shape") -> NetBuilder:
        if how == "Input":
            self.add("Input", name, [], [name], input_param={"shape": [{"dim": shape}]})
        else:
            self.msg.input.append(name)
            if how == "input_dim":
                self.msg.input_dim.extend(shape)
            else:
                self.msg.input_shape.add(dim=shape)
        return self

    def add(
        self,
        kind: str | int,
        name: str,
        bottoms: list[str],
        tops: list[str],
        blobs: list[np.ndarray] = (),  # type: ignore[assignment]
        **params: Any,
    ) -> NetBuilder:
        layer = self.msg.layers.add() if self.legacy else self.msg.layer.add()
        layer.name = name
        layer.type = kind  # a V1 enum number, or the type's name
        layer.bottom.extend(bottoms)
        layer.top.extend(tops)
        for key, value in params.items():
            json_format.ParseDict(
                value, getattr(layer, key) if key != "include" else layer.include.add()
            )
        for array in blobs:
            blob = layer.blobs.add()
            blob.shape.dim.extend(array.shape)
            blob.data.extend(array.astype(np.float32).ravel().tolist())
        return self

    def save(self, folder: Path, stem: str = "deploy") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.caffemodel").write_bytes(self.msg.SerializeToString())
        text = net_class()()
        text.CopyFrom(self.msg)
        for layer in (*text.layer, *text.layers):
            del layer.blobs[:]
        (folder / f"{stem}.prototxt").write_text(text_format.MessageToString(text))
        return folder / f"{stem}.prototxt"


def w(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def cnn() -> NetBuilder:
    """Ceil pooling (10 -> 5, floor would give 4), a dropped last window (5 -> 3), dilation,
    groups, kernel_h/kernel_w, LRN (both regions), InnerProduct, Softmax; inputs by input_dim."""
    b = NetBuilder("cnn").input("data", [1, 3, 10, 10], how="input_dim")
    b.add(
        "Convolution",
        "conv1",
        ["data"],
        ["conv1"],
        [w(4, 3, 3, 3), w(4)],
        convolution_param={"num_output": 4, "kernel_size": [3], "pad": [2], "dilation": [2]},
    )
    b.add("ReLU", "relu1", ["conv1"], ["conv1"])
    b.add(
        "Pooling",
        "pool1",
        ["conv1"],
        ["pool1"],
        pooling_param={"pool": "MAX", "kernel_size": 3, "stride": 2},
    )
    b.add(
        "Convolution",
        "conv2",
        ["pool1"],
        ["conv2"],
        [w(6, 2, 3, 1), w(6)],
        convolution_param={
            "num_output": 6,
            "kernel_h": 3,
            "kernel_w": 1,
            "pad_h": 1,
            "pad_w": 0,
            "group": 2,
        },
    )
    b.add(
        "Pooling",
        "pool2",
        ["conv2"],
        ["pool2"],
        pooling_param={"pool": "AVE", "kernel_size": 2, "stride": 2, "pad": 1},
    )
    b.add(
        "LRN",
        "norm1",
        ["pool2"],
        ["pool2"],
        lrn_param={"local_size": 3, "alpha": 0.5, "beta": 0.75, "norm_region": "WITHIN_CHANNEL"},
    )
    b.add(
        "LRN",
        "norm2",
        ["pool2"],
        ["norm2"],
        lrn_param={"local_size": 3, "alpha": 0.5, "beta": 0.75},
    )
    b.add(
        "InnerProduct",
        "fc",
        ["norm2"],
        ["fc"],
        [w(10, 54), w(10)],
        inner_product_param={"num_output": 10},
    )
    b.add("Accuracy", "acc", ["fc", "label"], ["acc"], include={"phase": "TRAIN"})
    return b.add("Softmax", "prob", ["fc"], ["prob"])


def residual() -> NetBuilder:
    """conv -> BatchNorm -> Scale -> ReLU -> conv -> BatchNorm -> Scale, Eltwise SUM with the
    block input (coeff), in-place layers, an Input layer."""
    b = NetBuilder("resblock").input("data", [1, 4, 6, 6], how="Input")
    for i, bottom in ((1, "data"), (2, "r1")):
        var = np.abs(w(4)) + 0.5
        b.add(
            "Convolution",
            f"conv{i}",
            [bottom],
            [f"c{i}"],
            [w(4, 4, 3, 3)],
            convolution_param={"num_output": 4, "kernel_size": [3], "pad": [1], "bias_term": False},
        )
        b.add(
            "BatchNorm",
            f"bn{i}",
            [f"c{i}"],
            [f"c{i}"],
            [w(4) * 2.0, var * 2.0, np.array([2.0], np.float32)],
            batch_norm_param={"eps": 1e-3},
        )
        b.add(
            "Scale",
            f"scale{i}",
            [f"c{i}"],
            [f"c{i}"],
            [w(4) + 1, w(4)],
            scale_param={"bias_term": True},
        )
        if i == 1:
            b.add("ReLU", "relu1", ["c1"], ["r1"])
    b.add(
        "Eltwise",
        "sum",
        ["data", "c2"],
        ["sum"],
        eltwise_param={"operation": "SUM", "coeff": [1.0, 0.5]},
    )
    return b.add("ReLU", "relu_out", ["sum"], ["sum"])


def mlp() -> NetBuilder:
    """InnerProduct, leaky ReLU, Dropout, TanH, Softmax; input_shape."""
    b = NetBuilder("mlp").input("x", [2, 16])
    b.add(
        "InnerProduct",
        "fc1",
        ["x"],
        ["h"],
        [w(32, 16), w(32)],
        inner_product_param={"num_output": 32},
    )
    b.add("ReLU", "act1", ["h"], ["h"], relu_param={"negative_slope": 0.1})
    b.add("Dropout", "drop", ["h"], ["h"], dropout_param={"dropout_ratio": 0.3})
    b.add(
        "InnerProduct",
        "fc2",
        ["h"],
        ["h2"],
        [w(8, 32), w(8)],
        inner_product_param={"num_output": 8},
    )
    b.add("TanH", "tanh", ["h2"], ["h2"])
    return b.add("Softmax", "prob", ["h2"], ["prob"])


def v1_net() -> NetBuilder:
    """Legacy V1 ``layers`` with enum types; a TRAIN-only layer left out by its include rule."""
    b = NetBuilder("lenet_v1", legacy=True).input("data", [1, 1, 12, 12], how="input_dim")
    b.add(
        4,
        "conv1",
        ["data"],
        ["conv1"],
        [w(3, 1, 5, 5), w(3)],
        convolution_param={"num_output": 3, "kernel_size": [5]},
    )
    b.add(
        17,
        "pool1",
        ["conv1"],
        ["pool1"],
        pooling_param={"pool": "MAX", "kernel_size": 2, "stride": 2},
    )
    b.add(18, "relu1", ["pool1"], ["pool1"])
    b.add(
        14,
        "ip1",
        ["pool1"],
        ["ip1"],
        [w(1, 1, 5, 48), w(1, 1, 1, 5)],
        inner_product_param={"num_output": 5},
    )
    b.add(1, "accuracy", ["ip1", "label"], ["accuracy"], include={"phase": "TRAIN"})
    return b.add(20, "prob", ["ip1"], ["prob"])


def ops_net() -> NetBuilder:
    """Split, Concat, Eltwise PROD/MAX, PReLU, Sigmoid, Deconvolution, Flatten, Reshape, Power,
    a two-bottom Scale, global pooling; two inputs and three outputs."""
    b = NetBuilder("ops").input("data", [1, 2, 4, 4]).input("gain", [1, 2])
    b.add("PReLU", "prelu", ["data"], ["a"], [np.array([0.1, 0.3], np.float32)])
    b.add("Sigmoid", "sig", ["data"], ["s"])
    b.add("Split", "split", ["s"], ["s1", "s2"])
    b.add("Eltwise", "prod", ["a", "s1"], ["p"], eltwise_param={"operation": "PROD"})
    b.add("Eltwise", "max", ["a", "s2", "data"], ["m"], eltwise_param={"operation": "MAX"})
    b.add("Concat", "cat", ["p", "m"], ["cat"], concat_param={"axis": 1})
    b.add(
        "Deconvolution",
        "up",
        ["cat"],
        ["up"],
        [w(4, 3, 3, 3), w(3)],
        convolution_param={"num_output": 3, "kernel_size": [3], "stride": [2], "pad": [1]},
    )
    b.add("Power", "pow", ["up"], ["up"], power_param={"power": 2.0, "scale": 0.5, "shift": 1.0})
    b.add("Reshape", "rs", ["up"], ["rs"], reshape_param={"shape": {"dim": [0, 3, -1]}})
    b.add("Flatten", "flat", ["rs"], ["flat"])
    b.add("Scale", "gate", ["data", "gain"], ["gated"], scale_param={"axis": 0})
    b.add(
        "Pooling", "gmax", ["cat"], ["gmax"], pooling_param={"pool": "MAX", "global_pooling": True}
    )
    return b


def _convert(tmp_path: Path, builder: NetBuilder, source: str | None = None) -> dict:
    prototxt = builder.save(tmp_path / "src")
    work = tmp_path / "work"
    artifact = convert_source(source or str(prototxt), work, ConvertOptions())
    report = json.loads((work / "convert_config.json").read_text())["verification"]
    for name, acc in report["outputs"].items():
        print(f"MAXERR {builder.msg.name} {name} vs {report['runner']}: {acc['max_abs_error']:.3g}")
    assert Path(artifact.path).is_file()
    return report


NETS = [cnn, residual, mlp, v1_net, ops_net]


@pytest.mark.parametrize("build", NETS)
def test_caffe_nets_convert_and_match_opencv(tmp_path: Path, build: Any) -> None:
    # setup
    builder = build()
    # execute
    report = _convert(tmp_path, builder)
    # assert
    assert report["runner"] == "opencv-dnn-caffe"
    assert report["outputs"] and max(a["max_abs_error"] for a in report["outputs"].values()) < 1e-4


def test_onnx_matches_opencv_and_numpy_reference_directly(tmp_path: Path) -> None:
    # setup: the CNN (ceil pooling + dropped window), batch of 3
    prototxt = cnn().save(tmp_path / "src")
    convert_source(str(prototxt), tmp_path / "work", ConvertOptions())
    x = RNG.standard_normal((3, 3, 10, 10)).astype(np.float32)
    net = load_net(prototxt, prototxt.with_suffix(".caffemodel"))
    assert net.test_text is not None  # OpenCV ignores phase rules: it reads the TEST layers
    weights = np.fromfile(prototxt.with_suffix(".caffemodel"), np.uint8)
    cv_net = cv2.dnn.readNetFromCaffe(np.frombuffer(net.test_text.encode(), np.uint8), weights)
    # execute
    session = ort.InferenceSession(str(tmp_path / "work" / "model.onnx"))
    (onnx_prob,) = session.run(["prob"], {"data": x})
    cv_net.setInput(x, "data")
    cv_prob = cv_net.forward("prob")
    ref_prob = ReferenceRunner(net)({"data": x})["prob"]
    # assert
    assert onnx_prob.shape == (3, 10)
    assert np.abs(onnx_prob - cv_prob).max() < 1e-5
    assert np.abs(onnx_prob - ref_prob).max() < 1e-5


@pytest.mark.parametrize("build", NETS)
def test_numpy_reference_agrees_with_opencv(tmp_path: Path, build: Any) -> None:
    # setup: the fallback verifier must itself agree with OpenCV where both run
    prototxt = build().save(tmp_path)
    net = load_net(prototxt, prototxt.with_suffix(".caffemodel"))
    feeds = {n: RNG.standard_normal([3, *s[1:]]).astype(np.float32) for n, s in net.inputs.items()}
    opencv = open_caffe_runner(prototxt, prototxt.with_suffix(".caffemodel"), net, net.inputs, {})
    # execute
    want, got = opencv(feeds), ReferenceRunner(net)(feeds)
    # assert
    assert opencv.name == "opencv-dnn-caffe"
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-4


def test_source_runner_for_latency_is_opencv(tmp_path: Path) -> None:
    # setup
    prototxt = cnn().save(tmp_path / "src")
    artifact = convert_source(str(prototxt), tmp_path / "work", ConvertOptions())
    x = RNG.standard_normal((2, 3, 10, 10)).astype(np.float32)
    # execute
    runner = open_source_runner(str(prototxt), ConvertOptions(), artifact)
    # assert
    assert runner is not None and runner.name == "opencv-dnn-caffe"
    assert runner({"data": x})["prob"].shape == (2, 10)


def test_pool_output_size_follows_caffe() -> None:
    # setup / execute / assert: ceil rounding; a last window starting in the padding is dropped
    assert pool_output_size([10], [3], [0], [2]) == [5]
    assert pool_output_size([10], [3], [0], [2], ceil=False) == [4]
    assert pool_output_size([5], [2], [1], [2]) == [3]


def test_sibling_files_are_paired(tmp_path: Path) -> None:
    # setup
    prototxt = mlp().save(tmp_path, stem="deploy")
    weights = prototxt.with_suffix(".caffemodel")
    # execute / assert
    assert resolve(str(prototxt)) == (prototxt, weights)
    assert resolve(str(weights)) == (prototxt, weights)
    assert resolve(str(tmp_path)) == (prototxt, weights)
    assert CaffeConverter.claims(str(weights)) and CaffeConverter.claims(str(tmp_path))


def test_caffemodel_alone_converts_through_its_sibling(tmp_path: Path) -> None:
    # setup
    builder = mlp()
    # execute
    report = _convert(tmp_path, builder, source=str(tmp_path / "src" / "deploy.caffemodel"))
    # assert
    assert max(a["max_abs_error"] for a in report["outputs"].values()) < 1e-4


def test_caffemodel_without_prototxt_is_refused(tmp_path: Path) -> None:
    # setup
    (tmp_path / "net.caffemodel").write_bytes(mlp().msg.SerializeToString())
    # execute / assert
    with pytest.raises(ModelFileError, match=r"net definition net\.prototxt"):
        resolve(str(tmp_path / "net.caffemodel"))


def test_unknown_layer_type_is_refused_naming_it(tmp_path: Path) -> None:
    # setup
    builder = mlp().add("Swish", "swish1", ["prob"], ["out"])
    prototxt = builder.save(tmp_path / "src")
    # execute / assert: the precheck (no weights read) and the conversion both refuse it
    with pytest.raises(ConversionError, match=r"layer 'swish1' of type Swish") as info:
        CaffeConverter.precheck(str(prototxt))
    assert info.value.exit_code == 2
    with pytest.raises(ConversionError, match=r"'swish1' of type Swish"):
        convert_source(str(prototxt), tmp_path / "work", ConvertOptions())
    assert not (tmp_path / "work" / "model.onnx").exists()


def test_unsupported_mode_is_refused_naming_layer_and_type(tmp_path: Path) -> None:
    # setup
    builder = NetBuilder("stoch").input("data", [1, 3, 4, 4])
    builder.add(
        "Pooling",
        "pool",
        ["data"],
        ["p"],
        pooling_param={"pool": "STOCHASTIC", "kernel_size": 2, "stride": 2},
    )
    prototxt = builder.save(tmp_path)
    # execute / assert
    with pytest.raises(UserInputError, match=r"'pool' of type Pooling: STOCHASTIC") as info:
        convert_source(str(prototxt), tmp_path / "work", ConvertOptions())
    assert info.value.exit_code == 2


def test_train_val_net_is_refused_with_the_reason(tmp_path: Path) -> None:
    # setup: a Data layer with data_param (not in the subset parsed: the lenient pass names it)
    text = (
        'name: "tv" layer { name: "data" type: "Data" top: "data" '
        'data_param { source: "lmdb" batch_size: 8 } }\n'
    )
    (tmp_path / "train_val.prototxt").write_text(text)
    # execute / assert
    with pytest.raises(ModelFileError, match=r"'data' of type Data reads training data"):
        CaffeConverter.precheck(str(tmp_path / "train_val.prototxt"))


def test_truncated_caffemodel_is_refused(tmp_path: Path) -> None:
    # setup
    prototxt = mlp().save(tmp_path)
    weights = prototxt.with_suffix(".caffemodel")
    weights.write_bytes(weights.read_bytes()[:-7])
    # execute / assert
    with pytest.raises(ModelFileError, match=r"deploy\.caffemodel"):
        convert_source(str(prototxt), tmp_path / "work", ConvertOptions())


def test_numpy_reference_verifies_what_opencv_cannot_load(tmp_path: Path) -> None:
    # setup: OpenCV 4.x has no Bias layer; ELU and AbsVal ride along
    builder = NetBuilder("bias").input("data", [1, 3, 4, 4])
    builder.add("Bias", "bias", ["data"], ["b"], [w(3)])
    builder.add("ELU", "elu", ["b"], ["e"], elu_param={"alpha": 0.5})
    builder.add("AbsVal", "abs", ["e"], ["out"])
    # execute
    report = _convert(tmp_path, builder)
    config = json.loads((tmp_path / "work" / "convert_config.json").read_text())["config"]
    # assert
    assert report["runner"] == "numpy-caffe-reference"
    assert "OpenCV cannot run the net" in config["why_not_opencv"]
    assert max(a["max_abs_error"] for a in report["outputs"].values()) < 1e-5


def test_layers_opencv_gets_wrong_are_verified_against_the_reference(tmp_path: Path) -> None:
    # setup: OpenCV 4.14 ignores InnerProduct transpose and LRN k (Caffe uses both)
    wt, bias = w(12, 5), w(5)
    builder = NetBuilder("deviant").input("x", [1, 3, 2, 2])
    builder.add("LRN", "norm", ["x"], ["n"], lrn_param={"local_size": 3, "alpha": 0.5, "k": 2.0})
    builder.add(
        "InnerProduct",
        "fc",
        ["n"],
        ["y"],
        [wt, bias],
        inner_product_param={"num_output": 5, "transpose": True},
    )
    x = RNG.standard_normal((2, 3, 2, 2)).astype(np.float32)
    # execute
    report = _convert(tmp_path, builder)
    session = ort.InferenceSession(str(tmp_path / "work" / "model.onnx"))
    (y,) = session.run(["y"], {"x": x})
    # assert: against Caffe's formulas written out here
    sq = np.pad(x**2, [(0, 0), (1, 1), (0, 0), (0, 0)])
    n = x / (2.0 + 0.5 / 3 * (sq[:, :-2] + sq[:, 1:-1] + sq[:, 2:])) ** 0.75
    assert report["runner"] == "numpy-caffe-reference"
    assert np.abs(y - (n.reshape(2, 12) @ wt + bias)).max() < 1e-5


def test_v1_caffemodel_weights_fit_a_current_prototxt(tmp_path: Path) -> None:
    # setup: old model-zoo weights are V1 `layers`; their deploy files were upgraded to `layer`
    prototxt = mlp().save(tmp_path / "src")
    current = net_class()()
    current.ParseFromString(prototxt.with_suffix(".caffemodel").read_bytes())
    legacy = net_class()(name=current.name)
    for layer in current.layer:
        old = legacy.layers.add(name=layer.name, type=14 if layer.type == "InnerProduct" else 0)
        old.blobs.extend(layer.blobs)
    prototxt.with_suffix(".caffemodel").write_bytes(legacy.SerializeToString())
    # execute
    artifact = convert_source(str(prototxt), tmp_path / "work", ConvertOptions())
    report = json.loads((tmp_path / "work" / "convert_config.json").read_text())["verification"]
    # assert
    assert Path(artifact.path).is_file()
    assert report["runner"] == "opencv-dnn-caffe"
    assert max(a["max_abs_error"] for a in report["outputs"].values()) < 1e-4


def test_input_shapes_override_the_declared_shape(tmp_path: Path) -> None:
    # setup: the residual block is fully convolutional
    prototxt = residual().save(tmp_path / "src")
    options = ConvertOptions(input_shapes={"data": [1, 4, 9, 7]})
    # execute
    artifact = convert_source(str(prototxt), tmp_path / "work", options)
    # assert
    assert artifact.signature.outputs[0].shape == ["batch", 4, 9, 7]


def test_weights_that_do_not_fit_name_the_layer(tmp_path: Path) -> None:
    # setup: fc1 was trained on 16 features
    prototxt = mlp().save(tmp_path / "src")
    options = ConvertOptions(input_shapes={"x": [2, 20]})
    # execute / assert
    with pytest.raises(ModelFileError, match=r"layer 'fc1' \(InnerProduct\): its weights do not"):
        convert_source(str(prototxt), tmp_path / "work", options)


def test_model_zoo_folder_layout_is_paired(tmp_path: Path) -> None:
    # setup: BVLC's models/<name>/ holds deploy, train_val and solver files beside the weights
    deploy = mlp().save(tmp_path, stem="deploy")
    weights = deploy.with_suffix(".caffemodel").rename(tmp_path / "bvlc_mlp.caffemodel")
    for other in ("train_val.prototxt", "solver.prototxt"):
        (tmp_path / other).write_text('name: "other"\n')
    # execute / assert
    assert resolve(str(tmp_path)) == (deploy, weights)
    assert resolve(str(weights)) == (deploy, weights)
    assert resolve(str(deploy)) == (deploy, weights)


def test_prototxt_without_weights_says_where_it_looked(tmp_path: Path) -> None:
    # setup
    prototxt = mlp().save(tmp_path / "src", stem="net")
    prototxt.with_suffix(".caffemodel").unlink()
    # execute / assert
    with pytest.raises(ModelFileError, match=r"no weights .*'fc1'.* no net\.caffemodel"):
        convert_source(str(prototxt), tmp_path / "work", ConvertOptions())
