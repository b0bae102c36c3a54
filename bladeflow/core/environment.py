"""Hardware fingerprint and tool versions: recorded with every registered version."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# ISA extensions that change which kernels ONNX Runtime (and quantization) can use.
_ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "sve",
)

_TOOLS = (
    "bladeflow",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "mlflow",
    "prefect",
    "numpy",
    "tensorflow-cpu",
    "tf2onnx",
    "torch",
    "transformers",
    "tensorrt",
    "great-expectations",
)


@functools.cache
def hardware() -> dict[str, Any]:
    """CPU model, ISA flags, logical threads and GPUs of this machine."""
    cpu_model = platform.processor() or platform.machine()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                cpu_model = value.strip()
            elif key in {"flags", "Features"} and not flags:
                flags = set(value.split())
    return {
        "cpu": cpu_model,
        "arch": platform.machine(),
        "isa": [f for f in _ISA_FLAGS if f in flags],
        "threads": os.cpu_count() or 1,
        "gpus": _gpus(),
    }


def hardware_fingerprint() -> str:
    """A short stable hash of :func:`hardware`, for cache keys."""
    blob = json.dumps(hardware(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _gpus() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@functools.cache
def tool_versions() -> dict[str, str]:
    """Versions of Python and of every installed tool that can change a result."""
    versions = {"python": platform.python_version()}
    for dist in _TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions
