"""Release state in the MLflow registry, the single source of truth, and its idempotent steps.

Every step can be repeated after a crash and ends in the same place. The order inside each step
keeps the registry consistent at every instant: traffic is taken away (weight 0) before an alias
moves or disappears, and an alias is only ever pointed at a version tagged
``bladeflow.validated=true``.

Registered-model tags (besides ``bladeflow.canary_weight``):

- ``bladeflow.shadow_share``: 0-100, % of champion requests mirrored to the ``canary`` version and
  compared (responses still come from the champion). A shadow stage is ``canary`` alias set,
  ``canary_weight=0``, ``shadow_share>0``.
- ``bladeflow.previous_champion``: the version the last promotion replaced (``release rollback``).
- ``bladeflow.release.lease``: JSON ``{token, holder, flow_run_id, run_id, version, acquired,
  expires, guard}`` (epoch seconds) of the release in progress; renewed every poll. It is the
  visible record of who releases the model. The mutual exclusion itself is ``guard``: the Prefect
  global concurrency limit (one slot, taken atomically by the Prefect server) that the release
  flow holds for its whole run (``flows/release.py``). MLflow has no compare-and-set, so a lease
  written without a guard (a ``Releaser`` used outside a flow) is only checked by reading it back.

Version tags: ``bladeflow.release.{outcome,reason,stage,stage_index,run_id,actor,updated_at,
approved_by}`` and ``bladeflow.release.stage.<name>`` (JSON: decision, time, reason).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from bladeflow.core import registry
from bladeflow.core.errors import RegistryError, UserInputError
from bladeflow.core.faults import fault_point
from bladeflow.tasks.release.errors import NotValidatedError, ReleaseConflictError

MODEL_TAG_SHADOW_SHARE = registry.MODEL_TAG_SHADOW_SHARE
MODEL_TAG_PREVIOUS_CHAMPION = registry.MODEL_TAG_PREVIOUS_CHAMPION
MODEL_TAG_LEASE = "bladeflow.release.lease"

TAG_OUTCOME = "bladeflow.release.outcome"
TAG_REASON = "bladeflow.release.reason"
TAG_STAGE = "bladeflow.release.stage"
TAG_STAGE_INDEX = "bladeflow.release.stage_index"
TAG_RUN_ID = "bladeflow.release.run_id"
TAG_ACTOR = "bladeflow.release.actor"
TAG_UPDATED = "bladeflow.release.updated_at"
TAG_APPROVED_BY = "bladeflow.release.approved_by"
TAG_STAGE_PREFIX = "bladeflow.release.stage."

IN_PROGRESS = "in_progress"
AWAITING_APPROVAL = "awaiting_approval"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Lease:
    """Who runs the release of a model, until when (renewed while it is alive)."""

    holder: str
    version: str
    expires: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    flow_run_id: str | None = None
    run_id: str | None = None
    acquired: float = field(default_factory=time.time)
    # The Prefect global concurrency limit whose only slot this release holds, or None.
    guard: str | None = None

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.expires

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Lease | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError):
            # An unreadable lease protects nothing: treat it as expired so it can be replaced.
            return cls(holder=f"unreadable lease {text[:80]!r}", version="?", expires=0.0)

    def describe(self) -> str:
        left = self.expires - time.time()
        when = f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago"
        run = f", Prefect flow run {self.flow_run_id}" if self.flow_run_id else ""
        return f"{self.holder} (version {self.version}{run}; {when})"


@dataclass(frozen=True)
class ModelState:
    """The release-relevant registry state of one registered model."""

    name: str
    champion: str | None
    canary: str | None
    weight: int
    shadow_share: int
    previous_champion: str | None
    lease: Lease | None


def _int(value: str | None) -> int:
    try:
        return min(100, max(0, int(float(value or "0"))))
    except ValueError:
        return 0


def read_state(c: Any, name: str) -> ModelState:
    """Read aliases and release tags of ``name`` (UserInputError if it is not registered)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = c.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserInputError(
                f"no registered model {name!r}: register one with `bladeflow optimize`"
            ) from None
        raise RegistryError(f"cannot read {name!r} from the registry: {exc.message}") from exc
    aliases = {k: str(v) for k, v in (rm.aliases or {}).items()}
    tags = rm.tags or {}
    return ModelState(
        name=name,
        champion=aliases.get(registry.ALIAS_CHAMPION),
        canary=aliases.get(registry.ALIAS_CANARY),
        weight=_int(tags.get(registry.MODEL_TAG_CANARY_WEIGHT)),
        shadow_share=_int(tags.get(MODEL_TAG_SHADOW_SHARE)),
        previous_champion=tags.get(MODEL_TAG_PREVIOUS_CHAMPION) or None,
        lease=Lease.from_json(tags.get(MODEL_TAG_LEASE)),
    )


def version_tags(c: Any, name: str, version: str) -> dict[str, str]:
    """The tags of ``name``/``version`` (UserInputError if there is no such version)."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(c.get_model_version(name, version).tags or {})
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            raise UserInputError(f"{name!r} has no version {version!r}") from None
        raise RegistryError(f"cannot read {name}/{version}: {exc.message}") from exc


def require_validated(c: Any, name: str, version: str) -> None:
    """Raise NotValidatedError unless the version passed the accuracy gate."""
    tags = version_tags(c, name, version)
    if tags.get(registry.TAG_VALIDATED) != "true":
        raise NotValidatedError(
            f"{name} version {version} is not tagged {registry.TAG_VALIDATED}=true, so it cannot "
            "be released: only versions that passed the accuracy gate of `bladeflow optimize` "
            "may serve traffic"
        )


def tag_version(c: Any, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in {**tags, TAG_UPDATED: now_iso()}.items():
        c.set_model_version_tag(name, version, key, value[:5000])


def record_stage(c: Any, name: str, version: str, stage: str, doc: dict[str, Any]) -> None:
    """Keep a stage's decision on the version (one tag per stage)."""
    tag_version(c, name, version, {TAG_STAGE_PREFIX + stage: json.dumps(doc, sort_keys=True)})


# --- the lease ---------------------------------------------------------------------------------


def acquire_lease(c: Any, name: str, lease: Lease, settle_s: float = 0.3) -> Lease | None:
    """Record the release lease of ``name``; return the stale lease it replaced, if any.

    With ``lease.guard`` set, the caller already holds that Prefect concurrency slot, which
    excludes every other guarded start atomically; the tag only records the holder. Without a
    guard, the read-back after ``settle_s`` is the only check, and it is not mutual exclusion: a
    racing writer slower than ``settle_s`` also believes it won.

    Raises:
        ReleaseConflictError: a live release (not this one) holds the lease.
    """
    current = read_state(c, name).lease
    if current is not None and current.token != lease.token and not current.expired():
        raise busy_error(name, current)
    fault_point(f"release.lease_write.{name}.{lease.version}")  # reliability tests: slow write
    c.set_registered_model_tag(name, MODEL_TAG_LEASE, lease.to_json())
    if lease.guard is None:
        time.sleep(settle_s)
    winner = read_state(c, name).lease
    if winner is None or winner.token != lease.token:
        raise busy_error(name, winner or current or lease)
    return current if current is not None and current.token != lease.token else None


def busy_error(name: str, holder: Lease | None, guard: str | None = None) -> ReleaseConflictError:
    """The conflict a second start of a release of ``name`` reports.

    Args:
        name: the registered model.
        holder: the lease tag of the running release, if it is written yet.
        guard: the Prefect concurrency limit that refused this start, if that is what refused it.
    """
    if holder is not None and not (guard and holder.expired()):
        who = f"held by {holder.describe()}"
    elif guard:
        who = (
            f"another flow run holds the Prefect concurrency limit {guard!r} (its lease tag is "
            + ("not written yet" if holder is None else f"from {holder.describe()}")
            + "; the slot of a release that died frees itself within a few minutes)"
        )
    else:
        who = "held by another release"
    return ReleaseConflictError(
        f"a release of {name!r} is already in progress, {who}. Wait for it, or stop it with "
        f"`bladeflow release rollback {name}` / finish it with `bladeflow release promote {name}`"
    )


def holds_lease(c: Any, name: str, lease: Lease) -> bool:
    current = read_state(c, name).lease
    return current is not None and current.token == lease.token


def renew_lease(c: Any, name: str, lease: Lease, ttl_s: float) -> bool:
    """Push the lease's expiry ``ttl_s`` ahead; False if it is no longer ours."""
    if not holds_lease(c, name, lease):
        return False
    lease.expires = time.time() + ttl_s
    c.set_registered_model_tag(name, MODEL_TAG_LEASE, lease.to_json())
    return True


def drop_lease(c: Any, name: str, lease: Lease | None = None) -> None:
    """Remove the lease (only if it is ``lease``'s, when given). Idempotent."""
    current = read_state(c, name).lease
    if current is None or (lease is not None and current.token != lease.token):
        return
    c.delete_registered_model_tag(name, MODEL_TAG_LEASE)


# --- traffic -----------------------------------------------------------------------------------


def set_traffic(c: Any, name: str, version: str, weight: int, shadow_share: int) -> None:
    """Point ``canary`` at ``version`` and give it ``weight``% of responses (+ mirroring).

    The alias moves first, then the weights: a crash in between leaves an alias with the old
    (lower or zero) weight, never a weight on a version that is not the canary.
    """
    require_validated(c, name, version)
    if read_state(c, name).canary != version:
        c.set_registered_model_tag(name, registry.MODEL_TAG_CANARY_WEIGHT, "0")
        c.set_registered_model_alias(name, registry.ALIAS_CANARY, version)
    c.set_registered_model_tag(name, MODEL_TAG_SHADOW_SHARE, str(shadow_share))
    c.set_registered_model_tag(name, registry.MODEL_TAG_CANARY_WEIGHT, str(weight))


def clear_traffic(c: Any, name: str) -> None:
    """No canary: weight 0, no mirroring, ``canary`` alias removed. Idempotent."""
    c.set_registered_model_tag(name, registry.MODEL_TAG_CANARY_WEIGHT, "0")
    c.set_registered_model_tag(name, MODEL_TAG_SHADOW_SHARE, "0")
    if read_state(c, name).canary is not None:
        c.delete_registered_model_alias(name, registry.ALIAS_CANARY)


def roll_back(c: Any, name: str, version: str, reason: str, actor: str) -> None:
    """Take all traffic from ``version`` and record why. Idempotent; the champion is untouched."""
    clear_traffic(c, name)
    tag_version(c, name, version, {TAG_OUTCOME: ROLLED_BACK, TAG_REASON: reason, TAG_ACTOR: actor})


def promote(c: Any, name: str, version: str, reason: str, actor: str) -> str | None:
    """Make ``version`` the champion, keeping the replaced one; return it. Idempotent.

    Order: remember the old champion, move ``champion``, then drop the canary. A crash between
    leaves champion == canary, which serving treats as "no canary" and recovery finishes.
    """
    require_validated(c, name, version)
    state = read_state(c, name)
    previous = state.champion
    if previous is not None and previous != version:
        c.set_registered_model_tag(name, MODEL_TAG_PREVIOUS_CHAMPION, previous)
        c.set_registered_model_alias(name, registry.ALIAS_CHAMPION, version)
    elif previous is None:
        c.set_registered_model_alias(name, registry.ALIAS_CHAMPION, version)
    clear_traffic(c, name)
    tag_version(c, name, version, {TAG_OUTCOME: PROMOTED, TAG_REASON: reason, TAG_ACTOR: actor})
    return previous if previous != version else state.previous_champion


def restore_previous(c: Any, name: str, actor: str) -> tuple[str, str]:
    """Make ``bladeflow.previous_champion`` the champion again; return (restored, demoted)."""
    state = read_state(c, name)
    if state.previous_champion is None or state.champion is None:
        raise UserInputError(
            f"{name!r} has no previous champion to roll back to "
            f"(champion: {state.champion or 'none'})"
        )
    restored, demoted = state.previous_champion, state.champion
    require_validated(c, name, restored)
    clear_traffic(c, name)
    c.set_registered_model_alias(name, registry.ALIAS_CHAMPION, restored)
    # Swap: rolling back the rollback is the same command.
    c.set_registered_model_tag(name, MODEL_TAG_PREVIOUS_CHAMPION, demoted)
    tag_version(
        c,
        name,
        demoted,
        {
            TAG_OUTCOME: ROLLED_BACK,
            TAG_REASON: f"rolled back to version {restored} by {actor}",
            TAG_ACTOR: actor,
        },
    )
    tag_version(
        c, name, restored, {TAG_OUTCOME: PROMOTED, TAG_REASON: "restored", TAG_ACTOR: actor}
    )
    return restored, demoted
