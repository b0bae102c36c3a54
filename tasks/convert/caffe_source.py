"""Caffe (.prototxt + .caffemodel): recognized, but not convertible in this environment.

Measured 2026-11 on Python 3.11 with onnx 1.23 / protobuf 7: ``caffe2onnx`` 2.0.1 requires
onnx==1.6.0 and its generated ``caffe_pb2`` does not import under protobuf >= 4 ("Descriptors
cannot be created directly"); ``caffe-onnx`` 0.1.2 pins onnx==1.17.0, onnxruntime==1.26.0 and
protobuf==3.20.3. Neither can live beside bladeflow's stack, so Caffe sources are refused with
that reason instead of a half-working conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import Converter, Export

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

REASON = (
    "caffe2onnx 2.0.1 requires onnx==1.6.0 and its caffe_pb2 fails to import with protobuf 7 "
    "('TypeError: Descriptors cannot be created directly. If this call came from a _pb2.py file, "
    "your generated code is out of date and must be regenerated with protoc >= 3.19.0.'); "
    "caffe-onnx 0.1.2 pins onnx==1.17.0, onnxruntime==1.26.0, protobuf==3.20.3"
)


class CaffeConverter(Converter):
    """Recognizes Caffe models and refuses them with the reason (no working converter)."""

    format = "caffe"
    description = "Caffe .prototxt + .caffemodel (recognized; not supported, see the error)"

    @classmethod
    def claims(cls, source: str) -> bool:
        path = Path(source)
        if path.is_dir():
            return any(path.glob("*.caffemodel")) and any(path.glob("*.prototxt"))
        return path.is_file() and path.suffix.lower() in (".caffemodel", ".prototxt")

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        raise ModelFileError(
            f"Caffe models are not supported: {REASON}. Convert {source} to ONNX in a separate "
            "environment with an old Python/protobuf (e.g. caffe2onnx under Python 3.7 and "
            "protobuf 3.20) and give bladeflow the .onnx file."
        )
