"""A zoo of tiny ONNX files as older exporters wrote them (built in code, a few layers each).

- PyTorch's TorchScript exporter at opset 9/10/11 with ``keep_initializers_as_inputs=True`` (the
  default before PyTorch 1.x ended), BatchNorm kept unfolded and a ``view(x.size(0), -1)`` head
  (Shape/Gather/Unsqueeze/Concat/Reshape);
- Caffe2-style graphs from ``onnx.helper``: IR version 3, opset 7-9, names with ``/`` and ``:``,
  every weight also a graph input, BatchNormalization with the old ``spatial`` attribute, a Reshape
  whose shape is an initializer-backed input, Flatten/Gemm heads, shape tensors, Upsample;
- tf2onnx output of a Keras CNN (NHWC input, transposes around the convolutions);
- any of them with its weights in an external data file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def torch_cnn(path: Path, opset: int) -> Path:
    """A small CNN exported by ``torch.onnx.export(dynamo=False)`` the way 2019-era code did."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
            self.fc = nn.Linear(8 * 3 * 3, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.nn.functional.max_pool2d(torch.relu(self.conv2(y)), 1)
            return torch.softmax(self.fc(y.view(y.size(0), -1)), dim=1)

    torch.manual_seed(opset)
    net = Net()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them matters
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
    net.eval()
    torch.onnx.export(
        net,
        (torch.randn(2, 3, 8, 8),),
        str(path),
        input_names=["input.1"],
        output_names=["prob"],
        dynamic_axes={"input.1": {0: "N"}, "prob": {0: "N"}},
        opset_version=opset,
        keep_initializers_as_inputs=True,
        do_constant_folding=False,  # old exports kept BatchNormalization and the shape arithmetic
        dynamo=False,
    )
    return path


def _weight(rng: np.random.Generator, name: str, shape: list[int]) -> TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name=name)


def _legacy_model(
    graph: onnx.GraphProto, opset: int, ir_version: int = 3, producer: str = "onnx-caffe2"
) -> onnx.ModelProto:
    """``graph`` with every initializer also listed as a graph input, stamped like an old file."""
    listed = {i.name for i in graph.input}
    for init in graph.initializer:
        if init.name not in listed:
            graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer
    )
    model.ir_version = ir_version
    return model


def caffe2_cnn(path: Path, spatial: int = 1, opset: int = 7) -> Path:
    """Caffe2-era classifier: Conv/BN(spatial)/Relu/MaxPool, Reshape by a shape input, Gemm.

    ``spatial=0`` (per-element BatchNorm statistics) exists only before opset 9: ONNX's version
    converter cannot carry it forward, so such a model must keep its opset.
    """
    rng = np.random.default_rng(7 + spatial)
    c = 4
    bn_shape = [c] if spatial else [c, 4, 4]
    stats = {
        "gpu_0/res_conv1_bn_s": (rng.uniform(0.5, 1.5, bn_shape)).astype(np.float32),
        "gpu_0/res_conv1_bn_b": (rng.uniform(-0.2, 0.2, bn_shape)).astype(np.float32),
        "gpu_0/res_conv1_bn_rm": (rng.uniform(-0.3, 0.3, bn_shape)).astype(np.float32),
        "gpu_0/res_conv1_bn_riv": (rng.uniform(0.5, 2.0, bn_shape)).astype(np.float32),
    }
    inits = [
        _weight(rng, "gpu_0/conv1_w", [c, 3, 3, 3]),
        _weight(rng, "gpu_0/conv1_b", [c]),
        *(numpy_helper.from_array(v, name=k) for k, v in stats.items()),
        numpy_helper.from_array(np.array([-1, c * 2 * 2], np.int64), "gpu_0/pool1_SHAPE"),
        _weight(rng, "gpu_0/pred_w", [6, c * 2 * 2]),
        _weight(rng, "gpu_0/pred_b", [6]),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["gpu_0/data:0", "gpu_0/conv1_w", "gpu_0/conv1_b"],
            ["gpu_0/conv1:0"],
            name="gpu_0/conv1",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node(
            "BatchNormalization",
            ["gpu_0/conv1:0", *stats],
            ["gpu_0/res_conv1_bn:0"],
            name="gpu_0/res_conv1_bn",
            epsilon=1e-5,
            spatial=spatial,
        ),
        helper.make_node("Relu", ["gpu_0/res_conv1_bn:0"], ["gpu_0/res_conv1_relu:0"]),
        helper.make_node(
            "MaxPool",
            ["gpu_0/res_conv1_relu:0"],
            ["gpu_0/pool1:0"],
            name="gpu_0/pool1",
            kernel_shape=[2, 2],
            strides=[2, 2],
        ),
        helper.make_node(
            "Reshape",
            ["gpu_0/pool1:0", "gpu_0/pool1_SHAPE"],
            ["gpu_0/pool1_flat:0"],
            name="gpu_0/pool1_flat",
        ),
        helper.make_node(
            "Gemm",
            ["gpu_0/pool1_flat:0", "gpu_0/pred_w", "gpu_0/pred_b"],
            ["gpu_0/pred:0"],
            name="gpu_0/pred",
            transB=1,
        ),
        helper.make_node("Softmax", ["gpu_0/pred:0"], ["gpu_0/softmax:0"], name="gpu_0/softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "caffe2_cnn",
        [helper.make_tensor_value_info("gpu_0/data:0", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("gpu_0/softmax:0", TensorProto.FLOAT, ["N", 6])],
        inits,
    )
    onnx.save(_legacy_model(graph, opset), str(path))
    return path


def caffe2_flatten_head(path: Path) -> Path:
    """Opset 9, IR 3: ImageScaler preprocessing, Conv, Flatten/Gemm head and a shape tensor.

    ImageScaler is an experimental op removed in opset 10: ONNX's version converter has no
    schema for it, so this model keeps opset 9 (and its int8 recipes are skipped).
    """
    rng = np.random.default_rng(3)
    inits = [
        _weight(rng, "conv/w", [4, 3, 3, 3]),
        _weight(rng, "conv/b", [4]),
        _weight(rng, "fc/w", [3, 4 * 2 * 2]),
        _weight(rng, "fc/b", [3]),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat/shape:0"),
    ]
    nodes = [
        helper.make_node(
            "ImageScaler", ["data:0"], ["scaled:0"], name="prep/scale", scale=0.5, bias=[0.1] * 3
        ),
        helper.make_node(
            "Conv",
            ["scaled:0", "conv/w", "conv/b"],
            ["conv:0"],
            name="conv/conv",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv:0"], ["relu:0"], name="conv/relu"),
        helper.make_node("Flatten", ["relu:0"], ["flat:0"], name="head/flatten", axis=1),
        helper.make_node(
            "Gemm", ["flat:0", "fc/w", "fc/b"], ["logits:0"], name="head/fc", transB=1
        ),
        # A shape tensor on the output path: Reshape(logits, [0, -1]) keeps [N, 3].
        helper.make_node("Reshape", ["logits:0", "flat/shape:0"], ["out:0"], name="head/out"),
    ]
    graph = helper.make_graph(
        nodes,
        "caffe2_flatten",
        [helper.make_tensor_value_info("data:0", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("out:0", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    onnx.save(_legacy_model(graph, 9), str(path))
    return path


def caffe2_upsample(path: Path) -> Path:
    """Opset 7, IR 3: a segmentation-style head, Conv then Upsample(mode='linear', scales attr).

    ONNX's version converter turns it into a Resize that samples other coordinates (the outputs
    change), so the upgrade must be rejected by comparing outputs, and the model keeps opset 7.
    """
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node(
            "Conv",
            ["data_0", "conv_w_0", "conv_b_0"],
            ["conv_1"],
            name="head/conv",
            kernel_shape=[1, 1],
        ),
        helper.make_node(
            "Upsample",
            ["conv_1"],
            ["up_1"],
            name="head/up",
            mode="linear",
            scales=[1.0, 1.0, 2.0, 2.0],
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "caffe2_upsample",
        [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("up_1", TensorProto.FLOAT, ["N", 2, 8, 8])],
        [_weight(rng, "conv_w_0", [2, 3, 1, 1]), _weight(rng, "conv_b_0", [2])],
    )
    onnx.save(_legacy_model(graph, 7), str(path))
    return path


def caffe2_dynamic_shape(path: Path) -> Path:
    """Opset 9: a head whose reshape target is computed from Shape (Shape/Gather/Unsqueeze/
    Concat), after a MatMul on a ``/``-named weight: the shape arithmetic of old exporters."""
    rng = np.random.default_rng(5)
    inits = [
        _weight(rng, "dense/kernel:0", [6, 8]),
        _weight(rng, "dense/bias:0", [8]),
        numpy_helper.from_array(np.array(0, np.int64), "const/zero:0"),
        numpy_helper.from_array(np.array([-1], np.int64), "const/minus_one:0"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x:0", "dense/kernel:0"], ["mm:0"], name="dense/MatMul"),
        helper.make_node("Add", ["mm:0", "dense/bias:0"], ["add:0"], name="dense/BiasAdd"),
        helper.make_node("Tanh", ["add:0"], ["act:0"], name="dense/Tanh"),
        helper.make_node("Shape", ["act:0"], ["shape:0"], name="head/Shape"),
        helper.make_node("Gather", ["shape:0", "const/zero:0"], ["n:0"], name="head/Gather"),
        helper.make_node("Unsqueeze", ["n:0"], ["n1:0"], name="head/Unsqueeze", axes=[0]),
        helper.make_node(
            "Concat", ["n1:0", "const/minus_one:0"], ["target:0"], name="head/Concat", axis=0
        ),
        helper.make_node("Reshape", ["act:0", "target:0"], ["y:0"], name="head/Reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "caffe2_dynamic",
        [helper.make_tensor_value_info("x:0", TensorProto.FLOAT, ["N", 2, 6])],
        [helper.make_tensor_value_info("y:0", TensorProto.FLOAT, ["N", 16])],
        inits,
    )
    onnx.save(_legacy_model(graph, 9, ir_version=4, producer="pytorch"), str(path))
    return path


def custom_domain(path: Path) -> Path:
    """An opset 9 graph with an op from a vendor domain ONNX Runtime does not implement."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("DCNv2", ["r"], ["y"], name="backbone/dcn_1", domain="org.vendor"),
        ],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 9), helper.make_opsetid("org.vendor", 1)],
    )
    model.ir_version = 4
    onnx.save(model, str(path))
    return path


def keras_cnn_tf2onnx(path: Path, opset: int = 11) -> Path:
    """A Keras CNN (NHWC) converted by tf2onnx, as Keras users exported ONNX."""
    import tensorflow as tf
    import tf2onnx

    tf.random.set_seed(0)
    keras = tf.keras
    inputs = keras.Input((8, 8, 3), name="image")
    y = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.MaxPooling2D(2)(y)
    y = keras.layers.Conv2D(4, 3, activation="relu")(y)
    y = keras.layers.Flatten()(y)
    outputs = keras.layers.Dense(3, activation="softmax", name="probs")(y)
    model = keras.Model(inputs, outputs)

    spec = [tf.TensorSpec([None, 8, 8, 3], tf.float32, name="image")]

    @tf.function(input_signature=spec)
    def serve(image: tf.Tensor) -> tf.Tensor:
        return model(image, training=False)

    tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset, output_path=str(path))
    return path


def with_external_data(source: Path, folder: Path) -> Path:
    """``source`` re-saved with every weight in ``<name>.data`` beside it (layout kept as is)."""
    model = onnx.load(str(source))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / source.name
    onnx.save_model(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=source.name + ".data",
        size_threshold=0,
    )
    return out
