"""Runtimes: what runs an environment's processes and enforces its limits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import RUNTIMES, Config
from ..exceptions import RuntimeUnavailableError

if TYPE_CHECKING:
    from .base import CommandSpec, Runtime, StreamCallback, Usage
    from .local import LocalRuntime
    from .systemd import SystemdRuntime
    from .unitview import UnitView

# Loaded on first use (PEP 562): ``gestvenv.runtime.processes`` or ``.systemd.booted`` must not
# cost the import of every runtime (asyncio, psutil, dbus-next) to a light CLI command.
_EXPORTS = {"CommandSpec": "base", "Runtime": "base", "StreamCallback": "base",
            "UnitView": "unitview", "Usage": "base", "LocalRuntime": "local",
            "SystemdRuntime": "systemd"}

if not TYPE_CHECKING:  # (hidden from mypy: a module __getattr__ would type every typo as Any)
    from ..lazy import exports

    __getattr__ = exports(__name__, _EXPORTS, globals())
    del exports

__all__ = [
    "RUNTIMES",
    "CommandSpec",
    "LocalRuntime",
    "Runtime",
    "StreamCallback",
    "SystemdRuntime",
    "UnitView",
    "Usage",
    "runtime_named",
    "select_runtime",
]


async def select_runtime(config: Config, requested: str | None = None) -> Runtime:
    """The runtime for a new environment: ``requested``, else config's ``runtime`` key.

    ``auto`` is systemd when systemd is PID 1 and its manager answers (the system's for root,
    the user's own otherwise), else local; the local runtime then says why in its notes.
    """
    from .local import LocalRuntime
    from .systemd.booted import systemd_booted

    choice = (requested or config.runtime).lower()
    if choice == "local":
        return _cached("local")
    if choice not in ("auto", "systemd"):
        raise RuntimeUnavailableError(
            f"unknown runtime {choice!r}; available: {', '.join(RUNTIMES)}")
    if choice == "auto" and not systemd_booted():
        return _cached("local")  # (the systemd runtime, dbus-next with it, never imported)
    systemd = _cached("systemd", config.max_total_memory_mb)
    if choice == "systemd":
        await systemd.prepare()
        return systemd
    try:
        await systemd.prepare()  # (probed once per process; connected once per event loop)
    except RuntimeUnavailableError as exc:
        return LocalRuntime(note=f"systemd runtime not usable ({exc}): local runtime applied")
    return systemd


def runtime_named(name: str) -> Runtime:
    """The runtime that runs an existing environment, from the name in its state file: the
    same object for every environment and call of this process (see :func:`_cached`)."""
    if name not in ("local", "systemd"):
        raise RuntimeUnavailableError(f"environment uses runtime {name!r}, not available here")
    return _cached(name)


# One runtime object per (runtime, manager, global memory cap) for the whole process, not one
# per call: the systemd runtime probes its manager once (SystemdRuntime.prepare) and talks to it
# over its event loop's one connection (bus.connection). The manager is the caller's (the
# system's for root, the user's own otherwise), so the euid is part of the key.
_RUNTIMES: dict[tuple[str, int, int | None], Runtime] = {}


def _cached(name: str, max_total_memory_mb: int | None = None) -> Runtime:
    import os

    key = runtime_key(name, os.geteuid(), max_total_memory_mb)
    runtime = _RUNTIMES.get(key)
    if runtime is None:
        if name == "local":
            from .local import LocalRuntime

            runtime = LocalRuntime()
        else:
            from .systemd import SystemdRuntime

            runtime = SystemdRuntime(max_total_memory_mb)
        runtime = _RUNTIMES.setdefault(key, runtime)
    return runtime


def runtime_key(name: str, euid: int, max_total_memory_mb: int | None) -> tuple[str, int,
                                                                                int | None]:
    """What tells two runtime objects apart: the local runtime has no state (one for all);
    a systemd runtime is its manager's (the euid's) with the cap it sets on gestvenv.slice
    (only creating an env sets it: None for the runtime of existing envs)."""
    if name == "local":
        return (name, 0, None)
    return (name, euid, max_total_memory_mb)


def forget_runtimes() -> None:
    """Drop the cached runtime objects (tests)."""
    _RUNTIMES.clear()
