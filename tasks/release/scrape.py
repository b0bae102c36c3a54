"""Talk to the serving replicas: scrape ``/metrics``, and check they applied a registry change."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import httpx

from bladeflow.tasks.release import metrics

log = logging.getLogger("bladeflow.release")


@dataclass
class Scrape:
    """One scrape of every endpoint: samples per endpoint; None where it failed."""

    samples: dict[str, metrics.Samples | None]
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def reachable(self) -> int:
        return sum(1 for s in self.samples.values() if s is not None)


class Scraper:
    """Scrapes the serving endpoints (base URLs) for one model."""

    def __init__(
        self, endpoints: list[str], model: str, token: str | None = None, timeout_s: float = 5.0
    ):
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.model = model
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self.http.close()

    def scrape(self) -> Scrape:
        out: dict[str, metrics.Samples | None] = {}
        errors = {}
        for url in self.endpoints:
            try:
                r = self.http.get(f"{url}/metrics")
                r.raise_for_status()
                out[url] = metrics.parse(r.text, self.model)
            except (httpx.HTTPError, ValueError) as exc:
                out[url] = None
                errors[url] = f"{type(exc).__name__}: {exc}"
        return Scrape(out, errors)

    def applied(self, champion: str | None, canary: str | None, weight: int) -> dict[str, str]:
        """Endpoints that do not serve this state yet -> what they serve (empty: all do).

        Reads serving's model status (``GET /v2/models/NAME``, key ``bladeflow``); falls back to
        ``bladeflow_model_info`` for servers without it (then the weight cannot be checked).
        """
        pending = {}
        for url in self.endpoints:
            try:
                r = self.http.get(f"{url}/v2/models/{self.model}")
                status = r.json().get("bladeflow") if r.status_code == 200 else None
                if status is not None:
                    have = (status.get("champion"), status.get("canary"))
                    want_weight = weight if canary else 0
                    if have != (champion, canary) or status.get("canary_weight") != want_weight:
                        pending[url] = (
                            f"champion={have[0]} canary={have[1]} "
                            f"weight={status.get('canary_weight')}"
                        )
                    continue
                m = self.http.get(f"{url}/metrics")
                m.raise_for_status()
                loaded = metrics.loaded(metrics.parse(m.text, self.model))
                want = {(champion, "champion")} | ({(canary, "canary")} if canary else set())
                if not want <= loaded or (canary is None and any(r == "canary" for _, r in loaded)):
                    pending[url] = f"loaded {sorted(loaded)}"
            except (httpx.HTTPError, ValueError) as exc:
                pending[url] = f"unreachable ({type(exc).__name__}: {exc})"
        return pending

    def wait_applied(
        self, champion: str | None, canary: str | None, weight: int, timeout_s: float
    ) -> dict[str, str]:
        """Poll :meth:`applied` until every endpoint serves the state or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            pending = self.applied(champion, canary, weight)
            if not pending or time.monotonic() >= deadline:
                return pending
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
