"""Runtimes: what runs an environment's processes and enforces its limits."""

from __future__ import annotations

from ..config import RUNTIMES, Config
from ..exceptions import RuntimeUnavailableError
from .base import CommandSpec, Runtime, StreamCallback, UnitView, Usage
from .local import LocalRuntime
from .systemd import SystemdRuntime, systemd_booted

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
    choice = (requested or config.runtime).lower()
    if choice == "local":
        return LocalRuntime()
    if choice not in ("auto", "systemd"):
        raise RuntimeUnavailableError(
            f"unknown runtime {choice!r}; available: {', '.join(RUNTIMES)}")
    systemd = SystemdRuntime(config.max_total_memory_mb)
    if choice == "systemd":
        await systemd.prepare()
        return systemd
    if not systemd_booted():
        return LocalRuntime()
    try:
        await systemd.prepare()
    except RuntimeUnavailableError as exc:
        return LocalRuntime(note=f"systemd runtime not usable ({exc}): local runtime applied")
    return systemd


def runtime_named(name: str) -> Runtime:
    """The runtime that runs an existing environment, from the name in its state file."""
    if name == "local":
        return LocalRuntime()
    if name == "systemd":
        return SystemdRuntime()
    raise RuntimeUnavailableError(f"environment uses runtime {name!r}, not available here")
