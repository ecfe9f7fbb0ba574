"""The env units a manager lists, and which env each one is: shared by the runtime (through
dbus-next) and by the CLI's ``list``, which reads the same one ListUnitsByPatterns through
``busctl`` instead: no event loop, no dbus-next to import (~60 ms of a 100 ms command).

Which unit is which env is decided here once (:func:`views`), from a unit's Description (the
env's id in it: plan.describe_env) and the caller's registry; a unit it cannot place from that
alone is left for the runtime to read (its Environment names the state file).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ...registry import is_pool_stem, state_path
from ..unitview import UnitView
from . import plan

ENV_UNITS = "gestvenv-*.service"
SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"


@dataclass(frozen=True)
class UnitInfo:
    """One row of ListUnitsByPatterns."""

    name: str
    description: str
    load_state: str
    active_state: str
    sub_state: str
    path: str


def use_user_manager() -> bool:
    """Which manager holds this user's envs: the system's for root, else the user's own."""
    return os.geteuid() != 0


def bus_address(user: bool) -> str | None:
    """Where the manager's bus is: the environment's variables, else the usual sockets."""
    if not user:
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or None  # dbus-next's default otherwise
    if address := os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return address
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return f"unix:path={runtime}/bus"


def views(units: Iterable[UnitInfo], known: Mapping[str, str] | None
          ) -> tuple[dict[str, UnitView], list[tuple[str, UnitInfo]]]:
    """(env name -> its unit, for the units whose Description names the env ``known`` has
    under that name (name -> id: the caller's registry), its state file the registry's own,
    and for this registry's unclaimed pool units (their pool file has the id their
    Description ends with); the others, for the caller to read one by one: another
    registry's, orphans, units of an older gestvenv)."""
    out: dict[str, UnitView] = {}
    unread: list[tuple[str, UnitInfo]] = []
    folder = None
    for unit in units:
        name = plan.env_name_of_unit(unit.name)
        if name is None:
            continue
        env_id = plan.described_as_known(name, unit.description, known)
        if env_id is not None and is_pool_stem(name):
            from .pool import pool_file

            # A pooled env's unit: its command line has its pool file, as its Environment
            # says (whose claim names the env's state file).
            out[name] = UnitView(state=unit.active_state, env_id=env_id,
                                 state_file=str(pool_file(name)))
        elif env_id is not None:
            folder = folder or state_path(name).parent
            out[name] = UnitView(state=unit.active_state, env_id=env_id,
                                 state_file=str(state_path(name, folder)))
        elif is_pool_stem(name) and (waiting := _our_pool_unit(name, unit.description)):
            out[name] = UnitView(state=unit.active_state, env_id=waiting[0],
                                 state_file=waiting[1])
        else:
            unread.append((name, unit))
    return out, unread


def _our_pool_unit(stem: str, description: str) -> tuple[str, str] | None:
    """(id, pool file) of an unclaimed pool unit of this registry: its pool file here has the
    id its Description ends with (its Environment names that file)."""
    from .pool import PoolEntry, pool_file

    env_id = plan.env_id_of_description(description)
    path = pool_file(stem)
    entry = PoolEntry.from_file(path) if env_id is not None else None
    return (entry.id, str(path)) if entry is not None and entry.id == env_id else None


def rows_of(reply: str) -> list[UnitInfo]:
    """``busctl --json=short call ... ListUnitsByPatterns`` (``a(ssssssouso)``) as rows."""
    data = json.loads(reply)
    if data.get("type") != "a(ssssssouso)":
        raise ValueError(f"unexpected reply type {data.get('type')!r}")
    (rows,) = data["data"]
    return [UnitInfo(r[0], r[1], r[2], r[3], r[4], r[6]) for r in rows]


def listed_by_busctl(known: Mapping[str, str] | None, *,
                     timeout: float = 5.0) -> dict[str, UnitView] | None:
    """:func:`views` of this user's manager through ``busctl``; None whenever that is not the
    whole answer (no busctl, no bus, an error, a unit to read further): then the caller asks
    through the runtime, which says why where it cannot."""
    user = use_user_manager()
    argv = ["busctl", "--json=short", f"--timeout={timeout:g}"]
    address = bus_address(user)
    if address is not None:
        argv.append(f"--address={address}")
    elif user:
        argv.append("--user")
    argv += ["call", SYSTEMD, MANAGER_PATH, MANAGER, "ListUnitsByPatterns", "asas",
             "0", "1", ENV_UNITS]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 1,
                              check=False, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            return None
        found, unread = views(rows_of(done.stdout), known)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError, TypeError):
        return None
    return None if unread else found
