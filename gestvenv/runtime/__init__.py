"""Runtimes: what runs an environment's processes and enforces its limits."""

from __future__ import annotations

from ..config import Config
from ..exceptions import RuntimeUnavailableError
from .base import CommandSpec, Runtime, StreamCallback, Usage
from .local import LocalRuntime

__all__ = [
    "CommandSpec",
    "LocalRuntime",
    "Runtime",
    "StreamCallback",
    "Usage",
    "runtime_named",
    "select_runtime",
]


def select_runtime(config: Config, requested: str | None = None) -> Runtime:
    """The runtime for new environments: ``requested``, else config's ``runtime`` key."""
    choice = (requested or config.runtime).lower()
    if choice in ("auto", "local"):
        # The systemd runtime is not built yet: "auto" means local everywhere for now.
        return LocalRuntime()
    raise RuntimeUnavailableError(f"unknown runtime {choice!r}; available: auto, local")


def runtime_named(name: str) -> Runtime:
    """The runtime that runs an existing environment, from the name in its state file."""
    if name == "local":
        return LocalRuntime()
    raise RuntimeUnavailableError(f"environment uses runtime {name!r}, not available here")
