"""The systemd runtime: each environment a set of transient units (see ``plan``)."""

from .runtime import SystemdRuntime, systemd_booted

__all__ = ["SystemdRuntime", "systemd_booted"]
