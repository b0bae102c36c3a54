"""A stand-in for the serving fleet in flow tests: follows the registry, synthesizes traffic.

It reads aliases and weights from the real registry (like ``serving/fleet.py``), routes a fixed
request rate with ``bladeflow.serving.routing.choose_role``, records outcomes in the
real ``bladeflow.serving.metrics.Metrics`` and answers ``/metrics`` and ``/v2/models/NAME`` on
loopback. Each version has a profile (error share, latency, output agreement). The end-to-end
test in
``test_release_e2e.py`` uses the real server instead.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bladeflow.core.settings import Settings
from bladeflow.serving.metrics import Metrics
from bladeflow.serving.routing import CANARY, CHAMPION, SHADOW, choose_role
from bladeflow.tasks.release import state as st


@dataclass
class Profile:
    error_share: float = 0.0  # share of requests answered 500
    latency_s: float = 0.004
    agree_share: float = 1.0  # share of shadow comparisons that agree


class SimServing:
    def __init__(
        self,
        settings: Settings,
        name: str,
        profiles: dict[str, Profile] | None = None,
        rps: float = 300.0,
        seed: int = 0,
    ):
        from mlflow import MlflowClient

        self.c = MlflowClient(settings.tracking_uri, settings.registry_uri)
        self.name = name
        self.profiles = profiles or {}
        self.rps = rps
        self.rng = random.Random(seed)
        self.metrics = Metrics()
        self.state: st.ModelState | None = None
        self.served: dict[str, int] = {}  # version -> responses (real, not shadow)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        sim = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    with sim._lock:
                        body = sim.metrics.render()
                    self._send(200, body, "text/plain; version=0.0.4")
                elif self.path == f"/v2/models/{sim.name}":
                    s = sim.state
                    status = {
                        "champion": s.champion if s else None,
                        "canary": s.canary if s and s.canary != s.champion else None,
                        "canary_weight": s.weight if s and s.canary else 0,
                    }
                    self._send(200, json.dumps({"bladeflow": status}).encode(), "application/json")
                else:
                    self._send(404, b"{}", "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self._threads = [
            threading.Thread(target=self.http.serve_forever, daemon=True),
            threading.Thread(target=self._traffic, daemon=True),
        ]

    def __enter__(self) -> SimServing:
        self.state = st.read_state(self.c, self.name)
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.http.shutdown()
        self.http.server_close()
        for t in self._threads:
            t.join(5)

    def _traffic(self) -> None:
        tick, last_poll = 0.05, 0.0
        while not self._stop.wait(tick):
            if time.monotonic() - last_poll > 0.2:
                self.state = st.read_state(self.c, self.name)
                last_poll = time.monotonic()
            s = self.state
            if s is None or s.champion is None:
                continue
            canary = s.canary if s.canary != s.champion else None
            with self._lock:
                self._info(s.champion, canary)
                for _ in range(int(self.rps * tick)):
                    role = choose_role(s.weight if canary else 0, None, self.rng)
                    version = canary if role == CANARY and canary else s.champion
                    self._request(version, role)
                    if role == CHAMPION and canary and self.rng.random() * 100 < s.shadow_share:
                        self._shadow(canary)

    def _info(self, champion: str, canary: str | None) -> None:
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(self.name, champion, CHAMPION).set(1)
        if canary:
            self.metrics.model_info.labels(self.name, canary, CANARY).set(1)

    def _outcome(self, version: str) -> tuple[str, float]:
        p = self.profiles.get(version, Profile())
        status = "500" if self.rng.random() < p.error_share else "200"
        return status, p.latency_s * (1 + 0.2 * self.rng.random())

    def _request(self, version: str, role: str) -> None:
        status, seconds = self._outcome(version)
        self.metrics.requests.labels(self.name, version, role, status).inc()
        self.metrics.request_duration.labels(self.name, version, role).observe(seconds)
        self.served[version] = self.served.get(version, 0) + 1

    def _shadow(self, version: str) -> None:
        status, seconds = self._outcome(version)
        self.metrics.requests.labels(self.name, version, SHADOW, status).inc()
        if status != "200":
            return
        self.metrics.request_duration.labels(self.name, version, SHADOW).observe(seconds)
        agree = self.rng.random() < self.profiles.get(version, Profile()).agree_share
        self.metrics.shadow_comparisons.labels(self.name, version, str(agree).lower()).inc()
