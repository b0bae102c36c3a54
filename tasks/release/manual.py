"""What a person does by hand: the release status, and a forced promotion or rollback."""

from __future__ import annotations

from typing import Any

from bladeflow.core.errors import UserInputError
from bladeflow.tasks.release import state as st


def describe(c: Any, name: str) -> dict[str, Any]:
    """The release status of ``name`` as a JSON-able dict (``bladeflow release status``)."""
    s = st.read_state(c, name)
    doc: dict[str, Any] = {
        "name": name,
        "champion": s.champion,
        "canary": s.canary,
        "canary_weight": s.weight,
        "shadow_share": s.shadow_share,
        "previous_champion": s.previous_champion,
        "lease": None,
        "state": "idle",
    }
    if s.lease is not None:
        doc["lease"] = {
            "holder": s.lease.holder,
            "version": s.lease.version,
            "flow_run_id": s.lease.flow_run_id,
            "mlflow_run_id": s.lease.run_id,
            "expired": s.lease.expired(),
            "description": s.lease.describe(),
        }
    if s.canary is not None:
        tags = st.version_tags(c, name, s.canary)
        doc["canary_release"] = {
            k.removeprefix("bladeflow.release."): v
            for k, v in tags.items()
            if k.startswith("bladeflow.release.")
        }
        live = s.lease is not None and not s.lease.expired()
        doc["state"] = tags.get(st.TAG_OUTCOME, st.IN_PROGRESS) if live else "interrupted"
        if not live:
            doc["next"] = (
                f"`bladeflow release start {name} {s.canary}` resumes it at stage "
                f"{tags.get(st.TAG_STAGE, '?')}; `bladeflow release rollback {name}` ends it"
            )
    return doc


def force_rollback(c: Any, name: str, actor: str) -> str:
    """``release rollback``: end a release in progress, else restore the previous champion."""
    s = st.read_state(c, name)
    if s.canary is not None and s.canary != s.champion:
        st.roll_back(c, name, s.canary, f"rolled back by {actor}", actor)
        st.drop_lease(c, name)
        return f"rolled back the release of version {s.canary}; champion stays {s.champion}"
    if s.canary is not None:  # a promotion that died half-way: finish it first
        st.promote(c, name, s.canary, "promotion finished by rollback", actor)
    restored, demoted = st.restore_previous(c, name, actor)
    st.drop_lease(c, name)
    return f"champion is version {restored} again (was {demoted})"


def force_promote(c: Any, name: str, actor: str) -> str:
    """``release promote``: make the canary of a release in progress the champion now."""
    s = st.read_state(c, name)
    if s.canary is None:
        raise UserInputError(
            f"{name!r} has no release in progress (no 'canary' alias): start one with "
            f"`bladeflow release start {name} VERSION`"
        )
    previous = st.promote(c, name, s.canary, f"promoted by {actor} (forced)", actor)
    st.drop_lease(c, name)
    return f"version {s.canary} is the champion (previous: {previous})"
