"""Broken inputs: truncated or corrupt model files of every supported format, an unsupported
operator, NaN outputs, data that does not match, and inputs too big for memory.

Each must end in one clear paragraph and exit 2 (or a clean accuracy-gate failure, exit 3), never
a traceback, and nothing registered. The unmarked tests go through the CLI's preflight in-process
(no Prefect, no framework import: they are quick); the slow ones run the real CLI process through
the flow with models built by the real frameworks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests import models
from tests.reliability.pipeline_helpers import FAST, registry_state, run_cli, sqlite_uri

# --- in-process CLI (the preflight path) ------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``bladeflow optimize ...`` in this process; returns (exit code, stdout, stderr).

    The CLI exports its settings into ``os.environ``: the environment is restored afterwards.
    """
    from typer.testing import CliRunner

    from bladeflow.app.cli import app

    runner = CliRunner()

    def invoke(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
        saved = dict(os.environ)
        try:
            os.environ.update(env or {})
            result = runner.invoke(app, [*args, "--home", str(tmp_path / "home")])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"the CLI raised {result.exception!r}") from result.exception
        return result.exit_code, result.stdout, result.stderr

    yield invoke


def _verdict(stderr: str) -> str:
    """The CLI's own one-paragraph verdict (Prefect may log after it while shutting down)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("bladeflow:")]
    return lines[-1] if lines else "-"


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return path


# Corrupt files built without the frameworks: the same bytes a cut-off copy or download leaves.
def _onnx(d: Path) -> Path:
    return _truncate(models.mlp(d / "model.onnx", hidden=256))


def _torchscript(d: Path) -> Path:
    body = {"m/code/__torch__.py": b"x" * 4000, "m/constants.pkl": b"\x80\x02)." * 500}
    return _truncate(_zip(d / "model.pt", body))


def _torch_export(d: Path) -> Path:
    body = {"m/archive_format": b"pt2", "m/models/model.json": b"{}" * 3000}
    return _truncate(_zip(d / "model.pt2", body))


def _keras(d: Path) -> Path:
    body = {"config.json": b"{}" * 2000, "model.weights.h5": b"\0" * 8000}
    return _truncate(_zip(d / "model.keras", body))


def _h5(d: Path) -> Path:
    import h5py

    d.mkdir(parents=True, exist_ok=True)
    with h5py.File(d / "model.h5", "w") as f:
        f.create_dataset("dense/kernel", data=np.ones((64, 64), np.float32))
    return _truncate(d / "model.h5")


def _skops(d: Path) -> Path:
    return _truncate(_zip(d / "model.skops", {"schema.json": b"{}" * 3000}))


def _hf(d: Path) -> Path:
    from safetensors.numpy import save_file

    folder = d / "hf"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    save_file({"emb": np.ones((128, 64), np.float32)}, str(folder / "model.safetensors"))
    _truncate(folder / "model.safetensors")
    return folder


BROKEN = {
    "onnx": (_onnx, r"not a readable ONNX model"),
    "torchscript .pt": (_torchscript, r"not a TorchScript archive"),
    "torch.export .pt2": (_torch_export, r"not a readable torch\.export program"),
    "keras .keras": (_keras, r"not a readable Keras \.keras file"),
    "keras .h5": (_h5, r"not a readable HDF5 file .*truncated"),
    "sklearn .skops": (_skops, r"not a readable skops file"),
    "huggingface folder": (_hf, r"model\.safetensors is truncated"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_truncated_model_file_exits_2_before_anything_starts(
    scenario, cli, tmp_path: Path, kind: str
):
    make, needle = BROKEN[kind]
    s = scenario(
        f"truncated {kind} model",
        fault=f"the first half of a {kind} source (a cut-off copy or download)",
        expected="exit 2 in the preflight, naming the file and what to do; no traceback; "
        "nothing registered",
    )
    # setup
    src = make(tmp_path / "src")
    # execute
    started = time.monotonic()
    code, out, err = cli(["optimize", str(src), "--name", "m"])
    took = time.monotonic() - started
    # assert
    s.observe(f"exit {code} in {took:.1f} s: {err.strip()[:150]}")
    assert code == 2, err
    assert err.startswith("bladeflow: bad input:") and re.search(needle, err), err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "home" / "mlflow.db").exists()  # refused before MLflow was touched


def test_unsupported_operator_exits_2_naming_it(scenario, cli, tmp_path: Path):
    s = scenario(
        "model with an unsupported operator",
        fault="an ONNX graph using com.example:FancyOp (no runtime implements it)",
        expected="exit 2 naming the operator; no traceback",
    )
    src = models.unknown_op(tmp_path / "custom.onnx")
    code, _, err = cli(["optimize", str(src), "--name", "m"])
    s.observe(f"exit {code}: {err.strip()[:160]}")
    assert code == 2 and "FancyOp" in err and "Traceback" not in err


def _npz_claiming(path: Path, shape: tuple[int, ...]) -> Path:
    """A .npz whose array header claims ``shape`` but which holds 64 bytes of data."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    buf.write(b"\0" * 64)
    return _zip(path, {"x.npy": buf.getvalue()})


def test_npz_claiming_a_gigantic_array_is_refused_before_allocation(scenario, cli, tmp_path: Path):
    s = scenario(
        "validation data claiming a gigantic shape",
        fault="data.npz whose header says x is float32[10**12, 8] (32 TB) but holds 64 bytes",
        expected="exit 2 from the header check, before numpy allocates; no MemoryError",
    )
    src = models.mlp(tmp_path / "m.onnx")
    data = _npz_claiming(tmp_path / "huge.npz", (10**12, 8))
    started = time.monotonic()
    code, _, err = cli(["optimize", str(src), "--name", "m", "--data", str(data)])
    took = time.monotonic() - started
    s.observe(f"exit {code} in {took:.1f} s: {err.strip()[:160]}")
    assert code == 2 and "claims 32000000000000 bytes" in err and "Traceback" not in err


def test_data_over_the_size_limit_is_refused(scenario, cli, tmp_path: Path):
    s = scenario(
        "validation data over the memory limit",
        fault="BLADEFLOW_MAX_DATA_BYTES=4096 and a well-formed 8 KiB data.npz (stands in for a "
        "multi-GiB one: the same check, default limit 4 GiB)",
        expected="exit 2 naming the limit and the variable that raises it",
    )
    src = models.mlp(tmp_path / "m.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((256, 8), np.float32))
    code, _, err = cli(
        ["optimize", str(src), "--name", "m", "--data", str(data)],
        {"BLADEFLOW_MAX_DATA_BYTES": "4096"},
    )
    s.observe(f"exit {code}: {err.strip()[:160]}")
    assert code == 2 and "BLADEFLOW_MAX_DATA_BYTES" in err and "Traceback" not in err
    assert "declares 8.0 KiB of arrays, over the limit of 4.0 KiB" in err


def test_truncated_and_pickled_data_are_refused(scenario, cli, tmp_path: Path):
    s = scenario(
        "truncated or pickled validation data",
        fault="data.npz cut in half; data.npz holding an object (pickle) array",
        expected="exit 2 for both, no unpickling, no traceback",
    )
    src = models.mlp(tmp_path / "m.onnx")
    cut = tmp_path / "cut.npz"
    np.savez(cut, x=np.zeros((256, 8), np.float32))
    _truncate(cut)
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, x=np.array([{"a": 1}, None], dtype=object))
    results = []
    for data in (cut, pickled):
        code, _, err = cli(["optimize", str(src), "--name", "m", "--data", str(data)])
        results.append((code, err))
        s.observe(f"{data.name}: exit {code}: {err.strip()[:120]}")
    assert [c for c, _ in results] == [2, 2]
    assert "Traceback" not in results[0][1] + results[1][1]
    assert "pickle" in results[1][1]


def test_data_that_does_not_match_the_model_exits_2(scenario, cli, tmp_path: Path):
    s = scenario(
        "validation data that does not match the model",
        fault="x with 5 features for a model of 8; x as strings; an extra array",
        expected="exit 2 listing every mismatch; no traceback",
    )
    src = models.mlp(tmp_path / "m.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 5), np.float32), extra=np.zeros(3))
    code, _, err = cli(["optimize", str(src), "--name", "m", "--data", str(data)])
    s.observe(f"exit {code}: {err.strip()[:200]}")
    assert code == 2 and "dim 1 is 5, must be 8" in err and "extra" in err
    np.savez(data, x=np.array([["a"] * 8] * 4))
    code2, _, err2 = cli(["optimize", str(src), "--name", "m", "--data", str(data)])
    s.observe(f"strings: exit {code2}: {err2.strip()[:120]}")
    assert code2 == 2 and "Traceback" not in err + err2


def test_enormous_model_files_are_refused_before_reading(scenario, cli, tmp_path: Path):
    s = scenario(
        "enormous model file",
        fault="a sparse 20 GiB model.onnx (nothing on disk, would be read into memory); a 3 GiB "
        ".onnx (over protobuf's 2 GiB); a 2 MiB .pt2 with BLADEFLOW_MAX_MODEL_BYTES=1 MiB",
        expected="exit 2 before any read, naming the size, the limit (default 16 GiB) and how to "
        "raise it",
    )
    huge = tmp_path / "huge.onnx"
    with huge.open("wb") as fh:
        fh.truncate(20 << 30)
    big = tmp_path / "big.onnx"
    with big.open("wb") as fh:
        fh.truncate(3 << 30)
    pt2 = tmp_path / "model.pt2"
    with pt2.open("wb") as fh:
        fh.truncate(2 << 20)
    started = time.monotonic()
    r1 = cli(["optimize", str(huge), "--name", "m"])
    r2 = cli(["optimize", str(big), "--name", "m"])
    r3 = cli(["optimize", str(pt2), "--name", "m"], {"BLADEFLOW_MAX_MODEL_BYTES": str(1 << 20)})
    took = time.monotonic() - started
    for label, (code, _, err) in zip(("20 GiB", "3 GiB", "2 MiB"), (r1, r2, r3), strict=True):
        s.observe(f"{label}: exit {code}: {err.strip()[:110]}")
    s.observe(f"all three in {took:.1f} s")
    assert [r[0] for r in (r1, r2, r3)] == [2, 2, 2]
    assert "over bladeflow's limit of 16.0 GiB" in r1[2] and "BLADEFLOW_MAX_MODEL_BYTES" in r1[2]
    assert "cannot exceed 2 GiB" in r2[2]
    assert "is 2.0 MiB, over bladeflow's limit of 1.0 MiB" in r3[2]
    assert took < 20


# --- through the whole flow (slow) ------------------------------------------------------------


def _nan_model(path: Path) -> Path:
    """y = sqrt(x): NaN wherever an input is negative."""
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["y"])],
        "sqrt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = 8
    import onnx

    onnx.save(model, str(path))
    return path


@pytest.mark.slow
def test_model_that_outputs_nan_fails_the_gate_with_exit_3(scenario, tmp_path: Path):
    s = scenario(
        "source model that outputs NaN",
        fault="y = sqrt(x) validated on data with negative x (NaN outputs on 8 of 16 samples)",
        expected="exit 3 (accuracy gate), reason names the NaN samples; nothing registered",
    )
    src = _nan_model(tmp_path / "sqrt.onnx")
    x = np.abs(np.random.default_rng(0).standard_normal((16, 4))).astype(np.float32)
    x[::2, 0] *= -1
    data = tmp_path / "d.npz"
    np.savez(data, x=x)
    home = tmp_path / "home"
    out = run_cli(["optimize", str(src), "--name", "sqrt", "--data", str(data), *FAST], home)
    s.observe(f"exit {out.returncode}: {_verdict(out.stderr)[:220]}")
    assert out.returncode == 3, out.stderr[-3000:]
    assert "outputs NaN/inf in 'y' for 8/16 validation samples" in out.stderr
    assert "Traceback" not in out.stderr
    assert registry_state(sqlite_uri(home), "sqrt").versions == {}


@pytest.mark.slow
def test_candidate_that_overflows_to_inf_is_never_selected(scenario, tmp_path: Path):
    s = scenario(
        "optimization that produces inf/NaN",
        fault="fp16 recipe on an MLP whose activations reach ~1e5 (fp16 max 65504), accuracy "
        "recovery off",
        expected="the fp16 candidate is rejected by the gate; the baseline is registered",
    )
    src = models.mlp(tmp_path / "big.onnx", scale=3e4)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    home = tmp_path / "home"
    out = run_cli(
        [
            "optimize",
            str(src),
            "--name",
            "big",
            "--data",
            str(data),
            "-b",
            "1",
            "--passes",
            "fp16",
            "--recovery-budget",
            "0",
            "--bench-rounds",
            "1",
            "--bench-iterations",
            "2",
            "--json",
        ],
        home,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    rejected = [ln for ln in out.stderr.splitlines() if "validate: fp16" in ln]
    s.observe(f"exit 0, chosen {result['candidate']}; {rejected[0][-160:] if rejected else '-'}")
    assert result["candidate"] == "baseline"
    assert rejected and "FAILED" in rejected[0]
    state = registry_state(sqlite_uri(home), "big")
    assert state.versions["1"]["tags"]["bladeflow.candidate"] == "baseline"


def _real_sources(root: Path) -> dict[str, Path]:
    """Real models saved by torch, Keras/TensorFlow, skops and transformers."""
    import keras
    import skops.io as sio
    import torch
    from sklearn.linear_model import LinearRegression
    from transformers import BertConfig, BertModel

    root.mkdir(parents=True, exist_ok=True)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.jit.script(m).save(str(root / "m.pt"))
    torch.export.save(torch.export.export(m, (torch.zeros(2, 4),)), str(root / "m.pt2"))
    km = keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(3)])
    km.save(root / "m.keras")
    km.save(root / "m.h5")
    km.export(str(root / "savedmodel"), verbose=False)
    reg = LinearRegression().fit(np.random.default_rng(0).random((20, 4)), np.arange(20.0))
    sio.dump(reg, root / "m.skops")
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(root / "hf")
    return {
        "torchscript .pt": root / "m.pt",
        "torch.export .pt2": root / "m.pt2",
        "keras .keras": root / "m.keras",
        "keras .h5": root / "m.h5",
        "TF SavedModel": root / "savedmodel",
        "sklearn .skops": root / "m.skops",
        "huggingface folder": root / "hf",
    }


REAL_KINDS = [
    "torchscript .pt",
    "torch.export .pt2",
    "keras .keras",
    "keras .h5",
    "TF SavedModel",
    "sklearn .skops",
    "huggingface folder",
]


@pytest.fixture(scope="module")
def real_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return _real_sources(tmp_path_factory.mktemp("real") / "models")


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.tf
@pytest.mark.parametrize("kind", REAL_KINDS)
def test_real_framework_file_truncated_exits_2_through_the_cli(
    scenario, tmp_path: Path, real_sources: dict[str, Path], kind: str
):
    s = scenario(
        f"truncated real {kind}",
        fault=f"a {kind} saved by its framework, its largest file cut in half; the real CLI "
        "(through the flow where the preflight cannot tell)",
        expected="exit 2 with a clear message; no traceback; nothing registered",
    )
    # setup
    src = real_sources[kind]
    broken = tmp_path / "broken"
    if src.is_dir():
        shutil.copytree(src, broken)
        files = [f for f in broken.rglob("*") if f.is_file()]
        _truncate(max(files, key=lambda f: f.stat().st_size))
    else:
        broken.mkdir()
        broken = broken / src.name
        shutil.copy(src, broken)
        _truncate(broken)
    home = tmp_path / "home"
    args = ["optimize", str(broken), "--name", "m", "--input-shape", "x:1x4", *FAST]
    # execute
    started = time.monotonic()
    out = run_cli(args, home)
    verdict = _verdict(out.stderr)
    s.observe(f"exit {out.returncode} in {time.monotonic() - started:.0f} s: {verdict[:170]}")
    # assert
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert verdict.startswith("bladeflow: bad input:")
    assert registry_state(sqlite_uri(home), "m").versions == {}


@pytest.mark.slow
def test_mlflow_model_with_a_truncated_artifact_exits_2(scenario, tmp_path: Path):
    s = scenario(
        "MLflow model URI whose artifact is truncated",
        fault="models:/src/1 logged with mlflow.onnx, then its model.onnx in the artifact store "
        "cut in half",
        expected="exit 2 naming the file; no traceback; nothing registered under the new name",
    )
    import mlflow
    import onnx

    home = tmp_path / "home"
    home.mkdir()
    uri = sqlite_uri(home)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("src", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp):
        mlflow.onnx.log_model(
            onnx.load(str(models.mlp(tmp_path / "m.onnx", hidden=256))),
            name="model",
            registered_model_name="src",
        )
    mlflow.set_tracking_uri("")
    mlflow.set_registry_uri("")
    stored = [f for f in (tmp_path / "art").rglob("model.onnx")]
    assert len(stored) == 1
    _truncate(stored[0])
    out = run_cli(["optimize", "models:/src/1", "--name", "m", *FAST], home)
    last = _verdict(out.stderr)
    s.observe(f"exit {out.returncode}: {last[:200]}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "not a readable ONNX model" in last
    assert registry_state(uri, "m").versions == {}
