"""gestvenv's exceptions: one base class, caught at the CLI boundary.

    GestvenvError
    ├── ConfigError                   a config file, variable or flag holds a bad value
    ├── ValidationError               bad input from the caller, rejected before anything exists
    │   ├── InvalidNameError          a name that is not unit-name and path safe
    │   ├── CommandNotFoundError      the program is neither in the environment nor on PATH
    │   └── CommandNotExecutableError the program exists but cannot be executed
    ├── EnvironmentExistsError        the name is taken (names are unique per user)
    ├── EnvironmentNotFoundError      no such environment (never created, or already gone)
    ├── EnvironmentClosedError        the handle was closed; the environment is gone
    ├── QuotaExceededError            max_concurrent or max_total_memory_mb would be exceeded
    ├── UnenforceableLimitError       a requested limit cannot be enforced by this runtime
    ├── RuntimeUnavailableError       the requested runtime cannot run on this host
    ├── SystemdError                  systemd's manager refused or failed a request
    ├── BuildError                    uv (or venv + pip) failed to build or install
    ├── DiskFullError                 an env's max_disk, or a filesystem gestvenv writes to, is full
    ├── CommandError                  ``execute(..., check=True)`` and the command failed
    └── UnsafePathError               cleanup refused a path outside gestvenv's storage roots
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import ExecResult


class GestvenvError(Exception):
    """Base class of every error gestvenv raises on purpose."""


class ConfigError(GestvenvError):
    """A configuration value is invalid; the message names its source, the key, what is allowed."""


class ValidationError(GestvenvError, ValueError):
    """Bad input from the caller; nothing was created."""


class InvalidNameError(ValidationError):
    """An environment name that is not safe as a systemd unit name and a path component."""


class CommandNotFoundError(ValidationError):
    """The command's program is found neither in the environment's bin/ nor on PATH."""


class CommandNotExecutableError(ValidationError):
    """The program exists but the kernel refuses to run it (permissions, a bad "#!" line)."""


class EnvironmentExistsError(GestvenvError):
    """An environment with this name already exists for this user."""


class EnvironmentNotFoundError(GestvenvError, LookupError):
    """No environment with this name exists for this user."""


class EnvironmentClosedError(GestvenvError):
    """The environment handle was closed (the environment is destroyed)."""


class QuotaExceededError(GestvenvError):
    """Creating the environment would exceed max_concurrent or max_total_memory_mb."""


class UnenforceableLimitError(GestvenvError):
    """A requested limit or isolation cannot be enforced by the selected runtime.

    Pass ``allow_unenforced=True`` (``--allow-unenforced``) to create the environment anyway;
    the limits really applied are then reported by ``Environment.enforcement``.
    """


class RuntimeUnavailableError(GestvenvError):
    """The requested runtime (for example systemd) is not usable on this host."""


class SystemdError(GestvenvError):
    """systemd's manager answered a request with an error; ``dbus_name`` is the D-Bus error name
    (``org.freedesktop.systemd1.UnitExists``, ``org.freedesktop.DBus.Error.InvalidArgs``, ...)."""

    def __init__(self, message: str, dbus_name: str = "") -> None:
        super().__init__(message)
        self.dbus_name = dbus_name


class BuildError(GestvenvError):
    """Building the environment or installing packages failed; ``output`` has the tool's stderr."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output

    def __str__(self) -> str:
        base = super().__str__()
        tail = self.output.strip()
        return f"{base}\n{tail}" if tail else base


class DiskFullError(GestvenvError):
    """Creating or installing met a full filesystem (ENOSPC, EDQUOT): the environment's own
    ``max_disk`` or one of gestvenv's (the storage root, the cache, the state dir); the message
    names which. What the creation had made is removed."""


class CommandError(GestvenvError):
    """A command run with ``check=True`` exited non-zero, timed out or was killed."""

    def __init__(self, result: ExecResult) -> None:
        super().__init__(f"command {result.argv!r} {result.describe()}")
        self.result = result


class CommandNotRunningError(GestvenvError):
    """A signal for a command (:class:`CommandHandle`) that has not started or has ended."""


class UnsafePathError(GestvenvError):
    """Cleanup refused to touch a path outside gestvenv's storage roots (or through a symlink)."""
