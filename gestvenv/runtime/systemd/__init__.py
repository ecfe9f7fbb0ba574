"""The systemd runtime: each environment a set of transient units (see ``plan``)."""

from typing import TYPE_CHECKING

from .booted import systemd_booted

if TYPE_CHECKING:
    from .runtime import SystemdRuntime, live_units

__all__ = ["SystemdRuntime", "live_units", "systemd_booted"]

if not TYPE_CHECKING:  # loaded on first use (PEP 562), as gestvenv.runtime's names are
    def __getattr__(name: str) -> object:
        if name not in ("SystemdRuntime", "live_units"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from . import runtime

        value = getattr(runtime, name)
        globals()[name] = value
        return value
