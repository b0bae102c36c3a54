"""Read Caffe nets (.prototxt text, .caffemodel binary) without Caffe and without generated code.

The message classes come from a descriptor built here at run time for the subset of BVLC's
``src/caffe/proto/caffe.proto`` that inference needs (same field numbers, so both the text and the
binary format parse with protobuf's own runtime). A net is read as the TEST phase sees it: include/
exclude rules applied, inputs gathered from ``input``/``input_dim``/``input_shape`` or Input layers,
legacy V1 ``layers`` given their current type names, weights matched to layers by name.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError

from bladeflow.core.errors import ModelFileError

_ENGINE = {"Engine": "DEFAULT CAFFE CUDNN"}

# Nested enums per message; a value with "=" has an explicit number, others count from 0.
_ENUMS: dict[str, dict[str, str]] = {
    "ParamSpec": {"DimCheckMode": "STRICT PERMISSIVE"},
    "FillerParameter": {"VarianceNorm": "FAN_IN FAN_OUT AVERAGE"},
    "ConvolutionParameter": _ENGINE,
    "EltwiseParameter": {"EltwiseOp": "PROD SUM MAX"},
    "LRNParameter": {"NormRegion": "ACROSS_CHANNELS WITHIN_CHANNEL", **_ENGINE},
    "PoolingParameter": {
        "PoolMethod": "MAX AVE STOCHASTIC",
        "RoundMode": "CEIL FLOOR",
        **_ENGINE,
    },
    "ReLUParameter": _ENGINE,
    "SigmoidParameter": _ENGINE,
    "SoftmaxParameter": _ENGINE,
    "TanHParameter": _ENGINE,
    "V1LayerParameter": {
        "DimCheckMode": "STRICT PERMISSIVE",
        "LayerType": "NONE=0 ABSVAL=35 ACCURACY=1 ARGMAX=30 BNLL=2 CONCAT=3 CONTRASTIVE_LOSS=37 "
        "CONVOLUTION=4 DATA=5 DECONVOLUTION=39 DROPOUT=6 DUMMY_DATA=32 EUCLIDEAN_LOSS=7 "
        "ELTWISE=25 EXP=38 FLATTEN=8 HDF5_DATA=9 HDF5_OUTPUT=10 HINGE_LOSS=28 IM2COL=11 "
        "IMAGE_DATA=12 INFOGAIN_LOSS=13 INNER_PRODUCT=14 LRN=15 MEMORY_DATA=29 "
        "MULTINOMIAL_LOGISTIC_LOSS=16 MVN=34 POOLING=17 POWER=26 RELU=18 SIGMOID=19 "
        "SIGMOID_CROSS_ENTROPY_LOSS=27 SILENCE=36 SOFTMAX=20 SOFTMAX_LOSS=21 SPLIT=22 "
        "SLICE=33 TANH=23 WINDOW_DATA=24 THRESHOLD=31",
    },
}
_TOP_ENUMS = {"Phase": "TRAIN TEST"}

# "[*]name number type [default]"; "*" marks a repeated field. Numbers are BVLC caffe.proto's.
_MESSAGES: dict[str, str] = {
    "BlobShape": "*dim 1 int64",
    "BlobProto": "shape 7 BlobShape; *data 5 float; *diff 6 float; *double_data 8 double; "
    "*double_diff 9 double; num 1 int32; channels 2 int32; height 3 int32; width 4 int32",
    "NetState": "phase 1 Phase TEST; level 2 int32; *stage 3 string",
    "NetStateRule": "phase 1 Phase; min_level 2 int32; max_level 3 int32; *stage 4 string; "
    "*not_stage 5 string",
    "ParamSpec": "name 1 string; share_mode 2 DimCheckMode; lr_mult 3 float 1; "
    "decay_mult 4 float 1",
    "FillerParameter": "type 1 string constant; value 2 float; min 3 float; max 4 float 1; "
    "mean 5 float; std 6 float 1; sparse 7 int32 -1; variance_norm 8 VarianceNorm",
    "NetParameter": "name 1 string; *input 3 string; *input_shape 8 BlobShape; "
    "*input_dim 4 int32; force_backward 5 bool; state 6 NetState; debug_info 7 bool; "
    "*layer 100 LayerParameter; *layers 2 V1LayerParameter",
    "LayerParameter": "name 1 string; type 2 string; *bottom 3 string; *top 4 string; "
    "phase 10 Phase; *loss_weight 5 float; *param 6 ParamSpec; *blobs 7 BlobProto; "
    "*propagate_down 11 bool; *include 8 NetStateRule; *exclude 9 NetStateRule; "
    "batch_norm_param 139 BatchNormParameter; bias_param 141 BiasParameter; "
    "concat_param 104 ConcatParameter; convolution_param 106 ConvolutionParameter; "
    "dropout_param 108 DropoutParameter; eltwise_param 110 EltwiseParameter; "
    "elu_param 140 ELUParameter; flatten_param 135 FlattenParameter; "
    "inner_product_param 117 InnerProductParameter; input_param 143 InputParameter; "
    "lrn_param 118 LRNParameter; pooling_param 121 PoolingParameter; "
    "power_param 122 PowerParameter; prelu_param 131 PReLUParameter; "
    "relu_param 123 ReLUParameter; reshape_param 133 ReshapeParameter; "
    "scale_param 142 ScaleParameter; sigmoid_param 124 SigmoidParameter; "
    "softmax_param 125 SoftmaxParameter; tanh_param 127 TanHParameter",
    "V1LayerParameter": "*bottom 2 string; *top 3 string; name 4 string; "
    "*include 32 NetStateRule; *exclude 33 NetStateRule; type 5 LayerType; "
    "*blobs 6 BlobProto; *param 1001 string; *blob_share_mode 1002 DimCheckMode; "
    "*blobs_lr 7 float; *weight_decay 8 float; *loss_weight 35 float; "
    "concat_param 9 ConcatParameter; convolution_param 10 ConvolutionParameter; "
    "dropout_param 12 DropoutParameter; eltwise_param 24 EltwiseParameter; "
    "inner_product_param 17 InnerProductParameter; lrn_param 18 LRNParameter; "
    "pooling_param 19 PoolingParameter; power_param 21 PowerParameter; "
    "relu_param 30 ReLUParameter; sigmoid_param 38 SigmoidParameter; "
    "softmax_param 39 SoftmaxParameter; tanh_param 37 TanHParameter",
    "BatchNormParameter": "use_global_stats 1 bool; moving_average_fraction 2 float 0.999; "
    "eps 3 float 1e-5",
    "BiasParameter": "axis 1 int32 1; num_axes 2 int32 1; filler 3 FillerParameter",
    "ConcatParameter": "axis 2 int32 1; concat_dim 1 uint32 1",
    "ConvolutionParameter": "num_output 1 uint32; bias_term 2 bool true; *pad 3 uint32; "
    "*kernel_size 4 uint32; *stride 6 uint32; *dilation 18 uint32; pad_h 9 uint32; "
    "pad_w 10 uint32; kernel_h 11 uint32; kernel_w 12 uint32; stride_h 13 uint32; "
    "stride_w 14 uint32; group 5 uint32 1; weight_filler 7 FillerParameter; "
    "bias_filler 8 FillerParameter; engine 15 Engine; axis 16 int32 1; "
    "force_nd_im2col 17 bool",
    "DropoutParameter": "dropout_ratio 1 float 0.5",
    "EltwiseParameter": "operation 1 EltwiseOp SUM; *coeff 2 float; stable_prod_grad 3 bool true",
    "ELUParameter": "alpha 1 float 1",
    "FlattenParameter": "axis 1 int32 1; end_axis 2 int32 -1",
    "InnerProductParameter": "num_output 1 uint32; bias_term 2 bool true; "
    "weight_filler 3 FillerParameter; bias_filler 4 FillerParameter; axis 5 int32 1; "
    "transpose 6 bool",
    "InputParameter": "*shape 1 BlobShape",
    "LRNParameter": "local_size 1 uint32 5; alpha 2 float 1; beta 3 float 0.75; "
    "norm_region 4 NormRegion; k 5 float 1; engine 6 Engine",
    "PoolingParameter": "pool 1 PoolMethod; pad 4 uint32; pad_h 9 uint32; pad_w 10 uint32; "
    "kernel_size 2 uint32; kernel_h 5 uint32; kernel_w 6 uint32; stride 3 uint32 1; "
    "stride_h 7 uint32; stride_w 8 uint32; engine 11 Engine; global_pooling 12 bool; "
    "round_mode 13 RoundMode",
    "PowerParameter": "power 1 float 1; scale 2 float 1; shift 3 float 0",
    "PReLUParameter": "filler 1 FillerParameter; channel_shared 2 bool",
    "ReLUParameter": "negative_slope 1 float 0; engine 2 Engine",
    "ReshapeParameter": "shape 1 BlobShape; axis 2 int32 0; num_axes 3 int32 -1",
    "ScaleParameter": "axis 1 int32 1; num_axes 2 int32 1; filler 3 FillerParameter; "
    "bias_term 4 bool; bias_filler 5 FillerParameter",
    "SigmoidParameter": "engine 1 Engine",
    "SoftmaxParameter": "engine 1 Engine; axis 2 int32 1",
    "TanHParameter": "engine 1 Engine",
}

_SCALARS = {
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "float": descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
}

# V1 enum names of the layer types bladeflow converts, and a few it names in errors.
_V1_NAMES = {
    "ABSVAL": "AbsVal", "CONCAT": "Concat", "CONVOLUTION": "Convolution", "DATA": "Data",
    "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "ELTWISE": "Eltwise",
    "FLATTEN": "Flatten", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN", "POOLING": "Pooling",
    "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid", "SOFTMAX": "Softmax",
    "SPLIT": "Split", "TANH": "TanH", "SOFTMAX_LOSS": "SoftmaxWithLoss",
}  # fmt: skip


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="bladeflow/caffe_subset.proto", package="caffe", syntax="proto2"
    )
    for name, values in _TOP_ENUMS.items():
        _add_enum(fdp.enum_type.add(name=name), values)
    for msg_name, spec in _MESSAGES.items():
        msg = fdp.message_type.add(name=msg_name)
        enums = _ENUMS.get(msg_name, {})
        for enum_name, values in enums.items():
            _add_enum(msg.enum_type.add(name=enum_name), values)
        for item in spec.split(";"):
            fname, number, ftype, *default = item.split()
            f = msg.field.add(name=fname.lstrip("*"), number=int(number))
            repeated = fname.startswith("*")
            f.label = f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL
            if ftype in _SCALARS:
                f.type = _SCALARS[ftype]
                if repeated and ftype not in ("string",) and msg_name.startswith("Blob"):
                    f.options.packed = True
            elif ftype in enums or ftype in _TOP_ENUMS:
                f.type = f.TYPE_ENUM
                f.type_name = f".caffe.{msg_name}.{ftype}" if ftype in enums else f".caffe.{ftype}"
            else:
                f.type = f.TYPE_MESSAGE
                f.type_name = f".caffe.{ftype}"
            if default:
                f.default_value = default[0]
    return fdp


def _add_enum(enum: descriptor_pb2.EnumDescriptorProto, values: str) -> None:
    for i, item in enumerate(values.split()):
        name, _, number = item.partition("=")
        enum.value.add(name=name, number=int(number) if number else i)


@functools.cache
def net_class() -> Any:
    """The ``caffe.NetParameter`` message class (built once per process)."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter"))


@dataclass
class Layer:
    """One layer as the TEST phase runs it; ``param`` is the (V1)LayerParameter message."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    param: Any
    blobs: list[np.ndarray] = field(default_factory=list)


@dataclass
class Net:
    """A Caffe net: its inputs (name -> declared shape) and layers in execution order."""

    name: str
    inputs: dict[str, list[int]]
    layers: list[Layer]
    legacy: bool  # written with V1 ``layers``
    test_text: str | None = None  # the TEST-phase definition, when rules left layers out

    def outputs(self) -> list[str]:
        """Blobs produced and not consumed afterwards (Caffe's net outputs), in order."""
        available: dict[str, None] = {}
        for layer in self.layers:
            for b in layer.bottoms:
                available.pop(b, None)
            for t in layer.tops:
                available[t] = None
        return list(available)

    def last_writer(self, blob: str) -> tuple[Layer, int]:
        """The layer that writes the final value of ``blob``, and the top's index."""
        for layer in reversed(self.layers):
            if blob in layer.tops:
                return layer, layer.tops.index(blob)
        raise KeyError(blob)


def parse_prototxt(path: Path) -> Any:
    """Parse a .prototxt into a NetParameter.

    Raises:
        ModelFileError: unreadable, or not a Caffe net in BVLC's text format.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"cannot read {path} as a text .prototxt: {exc}") from exc
    msg = net_class()()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as strict:
        lenient = net_class()()
        try:  # the unknown field may belong to a layer bladeflow refuses anyway: name that one
            text_format.Parse(text, lenient, allow_unknown_field=True)
        except text_format.ParseError:
            lenient = None
        if lenient is not None:
            _refuse_inputs_from_data(_layers(lenient, path, every_phase=True), path)
        raise ModelFileError(
            f"{path} is not a BVLC Caffe net definition ({strict}). A field that BVLC's "
            "caffe.proto lacks means a Caffe fork or a solver/training file: give bladeflow the "
            "deploy .prototxt of a BVLC Caffe model."
        ) from strict
    return msg


def parse_caffemodel(path: Path) -> Any:
    """Parse a binary .caffemodel into a NetParameter (weights in its layers' blobs)."""
    data = path.read_bytes()
    if not data:
        raise ModelFileError(f"{path} is empty (0 bytes): the download or copy did not finish")
    msg = net_class()()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise ModelFileError(
            f"{path} is not a readable binary .caffemodel ({exc}): it is truncated or corrupt, "
            "or not a Caffe weights file."
        ) from exc
    return msg


def blob_array(blob: Any, where: str) -> np.ndarray:
    """A BlobProto as a float32 array of its declared shape."""
    if blob.HasField("shape"):
        shape = [int(d) for d in blob.shape.dim]
    else:
        shape = [blob.num, blob.channels, blob.height, blob.width]
    values = blob.data if len(blob.data) else blob.double_data
    arr = np.asarray(values, dtype=np.float32)
    if arr.size != int(np.prod(shape)):
        raise ModelFileError(
            f"{where}: a weight blob declares shape {shape} but holds {arr.size} values; the "
            ".caffemodel is truncated or does not belong to this .prototxt"
        )
    return arr.reshape(shape)


def _layers(msg: Any, path: Path, every_phase: bool = False) -> list[Layer]:
    if len(msg.layer) and len(msg.layers):
        raise ModelFileError(
            f"{path} mixes current `layer` and legacy V1 `layers` entries; Caffe itself refuses "
            "that. Upgrade it with Caffe's upgrade_net_proto_text tool."
        )
    out = []
    if len(msg.layers):
        enum = msg.layers[0].DESCRIPTOR.fields_by_name["type"].enum_type
        for v1 in msg.layers:
            if every_phase or _included(v1):
                kind = (
                    enum.values_by_number[v1.type].name if v1.type in enum.values_by_number else ""
                )
                out.append(
                    Layer(
                        v1.name,
                        _V1_NAMES.get(kind, kind or str(v1.type)),
                        list(v1.bottom),
                        list(v1.top),
                        v1,
                    )
                )
    for layer in msg.layer:
        if every_phase or _included(layer):
            out.append(Layer(layer.name, layer.type, list(layer.bottom), list(layer.top), layer))
    return out


def _included(layer: Any) -> bool:
    """Caffe's StateMeetsRule for the TEST phase, level 0, no stages."""

    def meets(rule: Any) -> bool:
        if rule.HasField("phase") and rule.phase != 1:  # 1 = TEST
            return False
        if rule.HasField("min_level") and rule.min_level > 0:
            return False
        if rule.HasField("max_level") and rule.max_level < 0:
            return False
        return not len(rule.stage)  # every listed stage must be set; none is

    if len(layer.include):
        return any(meets(r) for r in layer.include)
    return not any(meets(r) for r in layer.exclude)


_DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "DummyData"}


def _refuse_inputs_from_data(layers: list[Layer], path: Path) -> None:
    for layer in layers:
        if layer.type in _DATA_LAYERS or layer.type.endswith("_DATA"):  # V1 enum names
            raise ModelFileError(
                f"{path}: layer {layer.name!r} of type {layer.type} reads training data; this is "
                "a train/val net. Give bladeflow the deploy .prototxt (inputs declared with an "
                "Input layer or input/input_shape)."
            )


def load_net(prototxt: Path, caffemodel: Path | None) -> Net:
    """The TEST-phase net of ``prototxt`` with weights from ``caffemodel`` (matched by name).

    Raises:
        ModelFileError: unreadable files, a train/val net, or inputs without shapes.
    """
    msg = parse_prototxt(prototxt)
    layers = _layers(msg, prototxt)
    _refuse_inputs_from_data(layers, prototxt)
    inputs: dict[str, list[int]] = {}
    dims = list(msg.input_dim)
    for i, name in enumerate(msg.input):
        if i < len(msg.input_shape):
            inputs[name] = [int(d) for d in msg.input_shape[i].dim]
        elif len(dims) >= 4 * (i + 1):
            inputs[name] = dims[4 * i : 4 * i + 4]
        else:
            raise ModelFileError(f"{prototxt}: input {name!r} has no input_shape or input_dim")
    for layer in [x for x in layers if x.type == "Input"]:
        shapes = list(layer.param.input_param.shape)
        for i, top in enumerate(layer.tops):
            if not shapes:
                raise ModelFileError(f"{prototxt}: Input layer {layer.name!r} has no shape")
            inputs[top] = [int(d) for d in shapes[min(i, len(shapes) - 1)].dim]
    layers = [x for x in layers if x.type != "Input"]
    weights: dict[str, list[Any]] = {}
    if caffemodel is not None:
        trained = parse_caffemodel(caffemodel)
        for source in (*trained.layers, *trained.layer):
            if len(source.blobs):
                weights[source.name] = list(source.blobs)
    for layer in layers:
        blobs = weights.get(layer.name) or list(layer.param.blobs)
        where = f"{caffemodel or prototxt}, layer {layer.name!r}"
        layer.blobs = [blob_array(b, where) for b in blobs]
    if not inputs:
        raise ModelFileError(
            f"{prototxt} declares no inputs (no input/input_shape, input_dim or Input layer)"
        )
    return Net(msg.name, inputs, layers, bool(len(msg.layers)), _test_definition(msg))


def _test_definition(msg: Any) -> str | None:
    """The net without the layers its rules leave out of TEST (for readers that ignore rules)."""
    kept = net_class()()
    kept.CopyFrom(msg)
    changed = False
    for group in (kept.layer, kept.layers):
        included = [x for x in group if _included(x)]
        if len(included) != len(group):
            changed = True
            copies = [type(x)() for x in included]
            for copy, x in zip(copies, included, strict=True):
                copy.CopyFrom(x)
            del group[:]
            group.extend(copies)
    return text_format.MessageToString(kept) if changed else None
