"""The systemd runtime: each environment a set of transient units (see ``plan``)."""

from .runtime import SystemdRuntime, live_units, systemd_booted

__all__ = ["SystemdRuntime", "live_units", "systemd_booted"]
