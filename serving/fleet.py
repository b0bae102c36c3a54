"""The served models and their registry state: initial load, polling, hot swap.

Each model has an immutable :class:`Deployment` (champion runner, canary runner, weight). The
request path reads ``slot.deployment`` once per request; the watcher builds a new one after the
new version has loaded and warmed up, and swaps the reference: a request sees either the old or
the new deployment, never a half-loaded one. Retired batchers finish what they hold, so no
request is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bladeflow.core import registry
from bladeflow.serving.batching import Batcher, ModelQueue
from bladeflow.serving.metrics import Metrics
from bladeflow.serving.model import LoadedVersion, LoadError, ServeOptions, load_version
from bladeflow.serving.routing import CANARY, CHAMPION

log = logging.getLogger("bladeflow.serving")


@dataclass(frozen=True)
class Runner:
    """A loaded version, its batcher and the serve settings it runs with."""

    model: LoadedVersion
    batcher: Batcher
    options: ServeOptions = field(default_factory=ServeOptions)
    config_from: str = "defaults"  # where the settings came from: defaults, flags, tag

    @property
    def version(self) -> str:
        return self.model.version

    def serving_config(self) -> dict[str, Any]:
        """The settings of ``bladeflow.serving_config`` this version runs with, and their origin."""
        doc: dict[str, Any] = {k: getattr(self.options, k) for k in registry.SERVING_CONFIG_KEYS}
        doc["from"] = self.config_from
        return doc


@dataclass(frozen=True)
class Deployment:
    """What serves a model right now. Replaced as a whole, never mutated."""

    champion: Runner | None = None
    canary: Runner | None = None
    weight: int = 0

    def runners(self) -> dict[str, Runner]:
        out = {}
        if self.champion:
            out[CHAMPION] = self.champion
        if self.canary:
            out[CANARY] = self.canary
        return out


@dataclass(frozen=True)
class RegistryState:
    """A model's serving-relevant registry state."""

    champion: str | None
    canary: str | None
    weight: int
    shadow_share: int = 0  # 0-100, from the registry: % of champion requests mirrored


@dataclass
class RegistryHealth:
    """Whether the last registry poll worked; shared by every slot of a fleet."""

    up: bool | None = None  # None: not polled yet
    error: str | None = None
    last_ok: float | None = None  # time.monotonic() of the last successful poll

    def describe(self) -> dict[str, Any]:
        age = None if self.last_ok is None else round(time.monotonic() - self.last_ok, 1)
        return {"up": self.up, "error": self.error, "seconds_since_last_ok": age}


@dataclass
class ModelSlot:
    """One served model: its deployment, queue and load history."""

    name: str
    queue: ModelQueue
    deployment: Deployment = field(default_factory=Deployment)
    wanted: RegistryState | None = None
    last_error: str | None = None
    in_flight: int = 0  # requests inside the infer handler (waiting, batched or running)
    failed: dict[str, float] = field(default_factory=dict)  # version -> time of last failure
    registry: RegistryHealth = field(default_factory=RegistryHealth)

    @property
    def ready(self) -> bool:
        return self.deployment.champion is not None

    def status(self) -> dict[str, Any]:
        d = self.deployment
        return {
            "ready": self.ready,
            "champion": d.champion.version if d.champion else None,
            "canary": d.canary.version if d.canary else None,
            "canary_weight": d.weight if d.canary else 0,
            "registry": None
            if self.wanted is None
            else {
                "champion": self.wanted.champion,
                "canary": self.wanted.canary,
                "canary_weight": self.wanted.weight,
            },
            "last_error": self.last_error,
            "registry_status": self.registry.describe(),
            "failed_versions": sorted(self.failed),
            "serving_config": {r: x.serving_config() for r, x in d.runners().items()},
            "queue_depth": self.queue.depth,
            "in_flight": self.in_flight,
        }


class NoChampionError(Exception):
    """A model to serve has no ``champion`` alias (the server refuses to start)."""


def read_state(client: Any, name: str) -> RegistryState:
    """Champion and canary versions and the canary weight of ``name`` from the registry."""
    rm = client.get_registered_model(name)
    aliases = {k: str(v) for k, v in (rm.aliases or {}).items()}
    tags = rm.tags or {}
    return RegistryState(
        aliases.get(registry.ALIAS_CHAMPION),
        aliases.get(registry.ALIAS_CANARY),
        _percent(tags.get(registry.MODEL_TAG_CANARY_WEIGHT)),
        _percent(tags.get(registry.MODEL_TAG_SHADOW_SHARE)),
    )


def _percent(value: str | None) -> int:
    try:
        return min(100, max(0, int(float(value or "0"))))
    except ValueError:
        return 0


def pin(state: RegistryState, version: str | None) -> RegistryState:
    """``state`` with ``version`` as the only served version (``serve --version``): no canary."""
    return state if version is None else RegistryState(version, None, 0, 0)


def check_champions(
    client: Any, names: list[str], pinned: dict[str, str] | None = None
) -> dict[str, RegistryState]:
    """Registry state of every model; raise NoChampionError naming how to release one."""
    from mlflow.exceptions import MlflowException

    pinned = pinned or {}
    states = {}
    for name in names:
        try:
            state = pin(read_state(client, name), pinned.get(name))
            if name in pinned:
                client.get_model_version(name, pinned[name])
        except MlflowException as exc:
            raise NoChampionError(
                f"model {name!r} cannot be read from the registry: {exc.message}"
            ) from exc
        if state.champion is None:
            raise NoChampionError(
                f"model {name!r} has no 'champion' version to serve. Release one first, e.g. in "
                f"Python: MlflowClient().set_registered_model_alias({name!r}, 'champion', VERSION) "
                "(later: `bladeflow release start`)."
            )
        states[name] = state
    return states


class Fleet:
    """All served models; loads them, watches the registry, swaps versions."""

    def __init__(
        self,
        client: Any,
        names: list[str],
        options: ServeOptions,
        metrics: Metrics,
        poll_interval_s: float = 10.0,
        *,
        pinned: dict[str, str] | None = None,
        explicit: frozenset[str] = frozenset(),
    ):
        self.client = client
        self.options = options
        self.pinned = dict(pinned or {})  # name -> the one version to serve (serve --version)
        self.explicit = explicit  # settings given as flags: a version's serving_config tag yields
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.registry = RegistryHealth()
        self.slots = {
            n: ModelSlot(
                n,
                ModelQueue(options.max_queue_size, metrics.queue_depth.labels(n).set),
                registry=self.registry,
            )
            for n in names
        }
        # A version's serving_config may ask for more workers than the flags: room for 4 each.
        pool = max(2, max(options.workers, 4) * 3 * len(names))
        self.executor = ThreadPoolExecutor(pool, thread_name_prefix="bladeflow-infer")
        self._workdir = Path(tempfile.mkdtemp(prefix="bladeflow-serve-"))
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return all(s.ready for s in self.slots.values())

    def start(self) -> None:
        """Load every model and then poll the registry, in the background."""
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        """Stop polling, let every batcher finish its requests, free the models."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for slot in self.slots.values():
            for runner in slot.deployment.runners().values():
                await runner.batcher.close()
        self.executor.shutdown(wait=True)
        shutil.rmtree(self._workdir, ignore_errors=True)

    async def _watch(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # our bug, not the registry's: keep serving, retry
                log.exception("bringing the served versions in line with the registry failed")
            await asyncio.sleep(self.poll_interval_s)

    async def poll(self) -> None:
        """Read the registry once and bring every model in line with it.

        An unreachable registry is not fatal: the loaded versions keep serving, the failure is
        shown in ``bladeflow_registry_up`` and each model's status, and the next poll retries.
        """
        async with self._lock:
            states = {}
            try:
                for slot in self.slots.values():
                    state = await asyncio.to_thread(read_state, self.client, slot.name)
                    states[slot.name] = pin(state, self.pinned.get(slot.name))
            except Exception as exc:  # noqa: BLE001 - unreachable/refused/timed out: reported
                self._registry_down(exc)
                return
            self._registry_ok()
            for slot in self.slots.values():
                slot.wanted = states[slot.name]
                await self._reconcile(slot, states[slot.name])

    def _registry_ok(self) -> None:
        if self.registry.up is False:
            log.info("the registry is reachable again")
        self.registry.up, self.registry.error = True, None
        self.registry.last_ok = time.monotonic()
        self.metrics.registry_up.set(1)

    def _registry_down(self, exc: BaseException) -> None:
        reason = _redact(f"{type(exc).__name__}: {_first_line(exc)}")
        if self.registry.up is not False:  # log the transition, not every poll
            log.warning("the registry cannot be read (%s); serving the loaded versions", reason)
        self.registry.up, self.registry.error = False, reason
        self.metrics.registry_up.set(0)
        self.metrics.registry_poll_failures.inc()

    async def _reconcile(self, slot: ModelSlot, state: RegistryState) -> None:
        current = slot.deployment
        by_version = {r.version: r for r in current.runners().values()}
        new: dict[str, Runner | None] = {}
        for role, want in ((CHAMPION, state.champion), (CANARY, state.canary)):
            have = current.runners().get(role)
            if want is None:
                new[role] = None
            elif want in by_version:
                new[role] = by_version[want]  # e.g. canary promoted: reuse, no reload
            elif self._recently_failed(slot, want):
                new[role] = have
            else:
                runner = await self._load(slot, want)
                if runner is not None:
                    by_version[want] = runner
                new[role] = runner or have
        champion, canary = new[CHAMPION], new[CANARY]
        if canary is not None and champion is not None and canary.version == champion.version:
            canary = None
        updated = Deployment(champion, canary, state.weight)
        if updated == current:
            return
        slot.deployment = updated  # the atomic swap
        self._publish(slot, current, updated)
        kept = {id(r) for r in updated.runners().values()}
        for runner in current.runners().values():
            if id(runner) not in kept:
                asyncio.get_running_loop().create_task(self._retire(runner))

    def _recently_failed(self, slot: ModelSlot, version: str) -> bool:
        when = slot.failed.get(version)
        return when is not None and time.monotonic() - when < max(30.0, 10 * self.poll_interval_s)

    def options_for(self, tags: dict[str, str]) -> tuple[ServeOptions, str]:
        """The serve settings of a version: its ``bladeflow.serving_config`` tag, except where a
        flag was given on the command line; and where they came from (defaults, flags, tag).

        Raises:
            LoadError: the tag is malformed (the version is not served rather than run otherwise).
        """
        try:
            tagged = registry.serving_config_from_tag(tags.get(registry.TAG_SERVING_CONFIG))
        except (ValueError, TypeError) as exc:
            raise LoadError(f"bad {registry.TAG_SERVING_CONFIG} tag: {exc}") from exc
        update = {k: v for k, v in tagged.items() if k not in self.explicit}
        origin = "tag" if update else ("flags" if self.explicit else "defaults")
        return replace(self.options, **update), origin  # type: ignore[arg-type]

    def _version_options(self, name: str, version: str) -> tuple[ServeOptions, str]:
        try:
            tags = dict(self.client.get_model_version(name, version).tags or {})
        except Exception as exc:
            raise LoadError(f"{name} version {version}: {type(exc).__name__}: {exc}") from exc
        return self.options_for(tags)

    async def _load(self, slot: ModelSlot, version: str) -> Runner | None:
        log.info("loading %s version %s", slot.name, version)
        try:
            options, origin = await asyncio.to_thread(self._version_options, slot.name, version)
            model = await asyncio.to_thread(
                load_version, self.client, slot.name, version, self._workdir, options
            )
        except LoadError as exc:
            slot.failed[version] = time.monotonic()
            slot.last_error = str(exc)
            self.metrics.load_failures.labels(slot.name, version).inc()
            log.error("cannot serve %s; keeping the loaded versions", exc)
            return None
        slot.failed.pop(version, None)
        slot.last_error = None
        return Runner(model, self._batcher(slot, model, options), options, origin)

    def _batcher(self, slot: ModelSlot, model: LoadedVersion, o: ServeOptions) -> Batcher:
        size = self.metrics.batch_size.labels(slot.name, model.version)
        duration = self.metrics.inference_duration.labels(slot.name, model.version)

        def on_batch(rows: int, seconds: float) -> None:
            size.observe(rows)
            duration.observe(seconds)

        return Batcher(
            model.predict,
            model.inputs,
            model.output_shapes,
            slot.queue,
            max_batch_size=o.max_batch_size,
            timeout_s=o.batch_timeout_ms / 1000.0,
            workers=o.workers,
            executor=self.executor,
            on_batch=on_batch,
            on_queue_wait=self.metrics.queue_wait.labels(slot.name, model.version).observe,
        )

    def _publish(self, slot: ModelSlot, old: Deployment, new: Deployment) -> None:
        for role, runner in old.runners().items():
            with contextlib.suppress(KeyError):
                self.metrics.model_info.remove(slot.name, runner.version, role)
        for role, runner in new.runners().items():
            self.metrics.model_info.labels(slot.name, runner.version, role).set(1)
        if new.champion is not None and "max_queue_size" not in self.explicit:
            slot.queue.limit = new.champion.options.max_queue_size  # one queue per model
        log.info(
            "%s now serves champion=%s canary=%s weight=%d; %s",
            slot.name,
            new.champion.version if new.champion else None,
            new.canary.version if new.canary else None,
            new.weight if new.canary else 0,
            "; ".join(f"{r} {_config_text(x)}" for r, x in new.runners().items()) or "nothing",
        )

    async def _retire(self, runner: Runner) -> None:
        await runner.batcher.close()
        log.info("retired %s version %s", runner.model.name, runner.version)


def _config_text(runner: Runner) -> str:
    """``max_batch_size=8 batch_timeout_ms=2.0 ... (from tag)``: the startup line's config part."""
    doc = runner.serving_config()
    origin = doc.pop("from")
    return " ".join(f"{k}={v}" for k, v in doc.items()) + f" (from {origin})"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _redact(text: str) -> str:
    """Drop credentials a registry URI may carry (``scheme://user:secret@host``)."""
    return re.sub(r"://[^/@\s]+@", "://***@", text)
