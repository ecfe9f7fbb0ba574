"""What ``list`` and ``show`` say about environments: their state files, checked against what
systemd says of their units.

Light on purpose (``gestvenv ephemeral list`` is the command people type most): one pass over
the state files, and systemd asked once for every unit, only where systemd runs; no event loop
unless there is a manager to ask, no runtime imported to list environments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import registry
from .exceptions import RuntimeUnavailableError
from .registry import EnvRecord
from .runtime.systemd.booted import systemd_booted

if TYPE_CHECKING:
    from .runtime.unitview import UnitView


def describe(record: EnvRecord, *, guarantees: bool = True) -> dict[str, Any]:
    """What ``list``/``show`` print about an environment (JSON-ready). ``guarantees=False``
    leaves them out (an empty list), for a listing that does not print them: they are the
    runtime's to say, and loading a runtime is what a plain ``list`` avoids."""
    return {
        "name": record.name,
        "id": record.id,
        "state": record.state(),
        "path": record.path,
        "python": record.python_version,
        "interpreter": record.interpreter,
        "runtime": record.runtime,
        "storage_backend": record.backend,
        "builder": record.builder,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "ttl": record.ttl,
        "idle_timeout": record.idle_timeout,
        "last_activity": record.last_activity,
        "owner_pid": record.owner_pid,
        "packages": record.packages,
        "limits": record.limits,
        "enforcement": record.enforcement,
        "sandbox_uid": record.sandbox_uid,
        "caller_uid": record.caller_uid,
        "sandbox_expose": record.sandbox_expose,
        "container": record.container or None,
        "guarantees": runtime_guarantees(record) if guarantees else [],
        "notes": record.notes,
    }


def runtime_guarantees(record: EnvRecord) -> list[str]:
    from .runtime import runtime_named

    try:
        return list(runtime_named(record.runtime).guarantees(record))
    except RuntimeUnavailableError:  # a record from another version of gestvenv: still listed
        return [f"runtime {record.runtime!r} is not available in this version of gestvenv"]


def merge(records: list[EnvRecord], units: Mapping[str, UnitView] | None, *,
          guarantees: bool = True) -> list[dict[str, Any]]:
    """The listing from the state files and the manager's units (None: no systemd to ask).

    An env whose unit has ended (TTL, idle, creator gone) is ``stopped`` even if no gestvenv
    process noticed; a ``gestvenv-*`` unit of ours without a state file is ``unit-only``.
    (Reads a state file only for a unit that no record claims, to tell an orphan from another
    registry's env.) ``units`` are keyed by the stem their env's units run under
    (``EnvRecord.stem``: a pooled env's is its pool unit's).
    """
    if units is not None:  # (the unit plan is imported where there are units to read)
        from .runtime.systemd.plan import LIVE_UNIT_STATES, UnitNames
    infos = []
    for record in records:
        info = describe(record, guarantees=guarantees)
        if record.runtime == "systemd" and units is not None:
            view = units.get(record.stem)
            unit_state = view.state if view is not None and view.env_id == record.id else "gone"
            names = UnitNames.of(record.stem)
            info["unit"] = {"name": names.env, "slice": names.slice, "state": unit_state}
            if unit_state not in LIVE_UNIT_STATES and info["state"] in ("ready", "creating"):
                info["state"] = "stopped"
        infos.append(info)
    known = {r.id for r in records}
    for name, view in sorted((units or {}).items()):
        # Units of other registries (another runtime dir) are theirs; only true orphans show.
        if view.env_id not in known and view.orphaned():
            infos.append(unit_only(name, view.state))
    return infos


def unit_only(name: str, unit_state: str) -> dict[str, Any]:
    from .runtime.systemd.plan import UnitNames

    return {"name": name, "id": None, "state": "unit-only", "path": None, "python": None,
            "interpreter": None, "runtime": "systemd", "storage_backend": None, "builder": None,
            "created_at": None, "expires_at": None, "ttl": None, "idle_timeout": None,
            "last_activity": None, "owner_pid": None, "packages": [], "limits": {},
            "enforcement": {}, "guarantees": [], "notes": ["a gestvenv unit without a state file"],
            "unit": {"name": UnitNames.of(name).env, "slice": UnitNames.of(name).slice,
                     "state": unit_state}}


async def environments(*, guarantees: bool = True) -> list[dict[str, Any]]:
    """Every environment of this user (:func:`merge`), from async code."""
    import asyncio

    records = await asyncio.to_thread(registry.list_records)
    units = None
    if systemd_booted():  # (else the systemd runtime, and dbus-next, are never imported)
        from .runtime.systemd import live_units

        units = await live_units({r.stem: r.id for r in records})  # (one call for all units)
    return await asyncio.to_thread(merge, records, units, guarantees=guarantees)


def environments_now(*, guarantees: bool = True) -> list[dict[str, Any]]:
    """:func:`environments` from synchronous code: an event loop only where systemd must be
    asked the hard way. Without systemd, none; with it, the listing without guarantees (the
    CLI's table) asks through ``busctl`` (units.listed_by_busctl), and falls back to the
    runtime (dbus-next, in a loop) only when that is not the whole answer."""
    if not systemd_booted():
        return merge(registry.list_records(), None, guarantees=guarantees)
    if not guarantees:
        from .runtime.systemd.units import listed_by_busctl

        records = registry.list_records()
        units = listed_by_busctl({r.stem: r.id for r in records})
        if units is not None:
            return merge(records, units, guarantees=False)
    from .sync import run_sync

    return run_sync(environments(guarantees=guarantees))
