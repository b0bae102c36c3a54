"""Start the server: check the registry, build the app, run uvicorn until SIGTERM/SIGINT.

On SIGTERM uvicorn stops accepting connections and waits for the requests in flight; then the
app's shutdown lets every batcher finish what it holds before the process exits.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass

from bladeflow.core.settings import Settings
from bladeflow.serving.metrics import Metrics
from bladeflow.serving.model import ServeOptions

log = logging.getLogger("bladeflow.serving")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the server listens."""

    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    max_body_bytes: int = 8 << 20
    poll_interval_s: float = 10.0
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    pinned: tuple[tuple[str, str], ...] = ()  # (model, version) served instead of the aliases
    explicit: frozenset[str] = frozenset()  # serve settings given as flags (beat the version tag)


def make_app(settings: Settings, names: list[str], options: ServeOptions, config: ServerConfig):  # type: ignore[no-untyped-def]
    """Check that every model has a champion (raises NoChampionError) and build the ASGI app."""
    import mlflow

    from bladeflow.core.mlflow_client import mlflow_client
    from bladeflow.serving.app import build_app
    from bladeflow.serving.fleet import Fleet, check_champions

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)
    client = mlflow_client(settings)
    check_champions(client, names, dict(config.pinned))
    metrics = Metrics()
    fleet = Fleet(
        client,
        names,
        options,
        metrics,
        poll_interval_s=config.poll_interval_s,
        pinned=dict(config.pinned),
        explicit=config.explicit,
    )
    return build_app(
        fleet, metrics, token=config.token, max_body_bytes=config.max_body_bytes, freeze_heap=True
    )


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def bind_warning(host: str, token: str | None) -> str | None:
    """The warning to log when ``host`` exposes the server beyond loopback without a token."""
    if is_loopback(host) or token:
        return None
    return (
        f"serving on {host}, reachable from other machines, WITHOUT a token: anyone who can "
        "reach it can run inference and read /metrics. Set --token (or BLADEFLOW_SERVE_TOKEN) "
        "or bind 127.0.0.1."
    )


def run(settings: Settings, names: list[str], options: ServeOptions, config: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT (blocking)."""
    import uvicorn

    warning = bind_warning(config.host, config.token)
    if warning:
        log.warning(warning)
    _Server = _server_class()
    app = make_app(settings, names, options, config)
    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(config.drain_timeout_s),
        lifespan="on",
    )
    _Server(uv).run()


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, exiting 0 after a graceful SIGTERM (it re-raises the signal)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {s: signal.signal(s, self.handle_exit) for s in _SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server
