"""Value types of the public API: limits, isolation, storage, results."""

from __future__ import annotations

import enum
import signal
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from .exceptions import ValidationError


class IsolationLevel(enum.StrEnum):
    """How strongly an environment's processes are separated from the host.

    The level requested is not always the level applied: a runtime applies the strongest level it
    can up to the one requested, and ``Environment.isolation`` always reports the one applied.
    """

    PROCESS = "process"      # own process group / unit; same filesystem and network view
    NAMESPACE = "namespace"  # plus private /tmp, read-only system dirs, optional private network
    CONTAINER = "container"  # plus a private view of the filesystem (only the env is writable)
    CHROOT = "chroot"        # root directory changed to the environment

    @property
    def rank(self) -> int:
        return list(IsolationLevel).index(self)

    # Ordered by strength, not as strings ("container" < "namespace" alphabetically):
    # ``env.isolation >= IsolationLevel.NAMESPACE`` means what it says.
    def _rank_of(self, other: object) -> int | None:
        if not isinstance(other, str):
            return None
        try:
            return IsolationLevel(other).rank
        except ValueError:
            return None

    def __lt__(self, other: object) -> bool:
        rank = self._rank_of(other)
        return NotImplemented if rank is None else self.rank < rank

    def __le__(self, other: object) -> bool:
        rank = self._rank_of(other)
        return NotImplemented if rank is None else self.rank <= rank

    def __gt__(self, other: object) -> bool:
        rank = self._rank_of(other)
        return NotImplemented if rank is None else self.rank > rank

    def __ge__(self, other: object) -> bool:
        rank = self._rank_of(other)
        return NotImplemented if rank is None else self.rank >= rank

    @property
    def sandboxed(self) -> bool:
        """Namespace isolation or above: commands run in a sandbox of namespaces, which hides
        most of the host (what each runtime builds of it: docs/isolation.md)."""
        return self.rank >= IsolationLevel.NAMESPACE.rank

    @classmethod
    def parse(cls, value: str | IsolationLevel) -> IsolationLevel:
        return _parse_enum(cls, value, "isolation level")


class StorageBackend(enum.StrEnum):
    """Where an environment's files live."""

    TMPFS = "tmpfs"    # a tmpfs under the runtime dir (/run/gestvenv or $XDG_RUNTIME_DIR)
    MEMORY = "memory"  # /dev/shm
    DISK = "disk"      # the disk, beside the shared uv cache (reflinks where it has them)

    @classmethod
    def parse(cls, value: str | StorageBackend) -> StorageBackend:
        return _parse_enum(cls, value, "storage backend")


E = TypeVar("E", bound=enum.Enum)


def _parse_enum(cls: type[E], value: str | E, what: str) -> E:
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in cls)
        raise ValidationError(f"unknown {what} {value!r}; allowed: {allowed}") from None


_LIMIT_MAX = 1 << 40  # MB (1 EiB) or processes


@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """Limits for everything that runs in one environment. ``None`` means no limit.

    max_memory and max_disk are in MB (2**20 bytes); max_cpu_percent is a share of one CPU
    (200 means two full CPUs).
    """

    max_memory: int | None = None
    max_disk: int | None = None
    max_processes: int | None = None
    max_cpu_percent: float | None = None
    network_access: bool = True

    def __post_init__(self) -> None:
        for name in ("max_memory", "max_disk", "max_processes"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValidationError(f"{name} must be a positive integer or None, not {value!r}")
            if value > _LIMIT_MAX:  # (beyond any machine; and what the kernel's calls take)
                raise ValidationError(f"{name} must be at most {_LIMIT_MAX}, not {value}")
        cpu = self.max_cpu_percent
        if cpu is not None and (
            isinstance(cpu, bool) or not isinstance(cpu, int | float) or not 0 < cpu <= 100_000
        ):
            raise ValidationError(f"max_cpu_percent must be in (0, 100000], not {cpu!r}")
        if not isinstance(self.network_access, bool):
            raise ValidationError(f"network_access must be a bool, not {self.network_access!r}")

    def requested(self) -> dict[str, Any]:
        """The limits that restrict something (network_access only when it is False)."""
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "network_access"}
        if not self.network_access:
            out["network_access"] = False
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResourceLimits:
        return cls(**{k: data.get(k) for k in ("max_memory", "max_disk", "max_processes",
                                                "max_cpu_percent")},
                   network_access=bool(data.get("network_access", True)))


# The threats an isolation level is judged against (``Enforcement.protections``), in the order
# ``show`` lists them: what code inside an environment may try.
THREATS: dict[str, str] = {
    "privileges": "keep or gain privileges (capabilities, setuid, root)",
    "secrets": "read private host files (/etc/shadow, /root, the creator's home)",
    "host_writes": "write the host (/usr, /etc, /var/lib) or remount it",
    "processes": "see or signal processes outside the environment",
    "units": "start, stop or change units over the system or user bus",
    "other_envs": "read or write other environments' files",
    "shared_files": "edit the shared cache or snapshots through installed files",
    "ipc_uts": "share IPC objects or the hostname with the host",
    "kernel": "change sysctls, load modules, read kernel logs, set the clock",
    "network": "reach the network (when network_access=False)",
    "builds": "run package build code outside the environment's limits and isolation",
}
NOT_HELD = "not held: "


def network_held(status: LimitStatus | None) -> str:
    """The "network" threat from the network_access limit's status (None: not cut off)."""
    if status is None:
        return f"{NOT_HELD}network_access=True"
    return status.mechanism if status.enforced else NOT_HELD + status.mechanism


def in_threat_order(held: dict[str, str]) -> dict[str, str]:
    """``held`` (threat -> mechanism) in the order of THREATS (state files sort their keys)."""
    return {threat: held[threat] for threat in THREATS if threat in held}


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """Whether one requested limit is really enforced, and by what."""

    requested: Any
    enforced: bool
    mechanism: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Enforcement:
    """The honest record of what a runtime applies for one environment."""

    runtime: str
    isolation_requested: IsolationLevel
    isolation_applied: IsolationLevel
    limits: dict[str, LimitStatus] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # What the applied isolation holds against each threat (keys of THREATS), and by what;
    # a threat it does not hold says so ("not held: ...").
    protections: dict[str, str] = field(default_factory=dict)

    @property
    def unenforced(self) -> dict[str, LimitStatus]:
        return {k: v for k, v in self.limits.items() if not v.enforced}

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "isolation_requested": self.isolation_requested.value,
            "isolation_applied": self.isolation_applied.value,
            "limits": {k: v.to_dict() for k, v in self.limits.items()},
            "notes": list(self.notes),
            "protections": dict(self.protections),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Enforcement:
        return cls(
            runtime=data["runtime"],
            isolation_requested=IsolationLevel(data["isolation_requested"]),
            isolation_applied=IsolationLevel(data["isolation_applied"]),
            limits={k: LimitStatus(**v) for k, v in data.get("limits", {}).items()},
            notes=tuple(data.get("notes", ())),
            protections=in_threat_order(dict(data.get("protections", {}))),
        )


@dataclass(frozen=True, slots=True)
class ExecResult:
    """The outcome of one command run in an environment.

    ``returncode`` is the exit status, or ``-N`` when the process died of signal N (as in
    :mod:`subprocess`). ``killed_by`` says who ended it when gestvenv knows: ``"timeout"``,
    ``"ttl"`` (the environment expired), ``"memory"`` (a runtime that can tell an OOM kill:
    cgroups; under the local runtime's RLIMIT_AS an allocation fails instead, and the program
    reports it, Python with MemoryError) or ``None``. ``oom_killed`` is True when the kernel
    OOM-killed a process of the command's, even one whose death the command survived (a build
    tool whose compiler was killed).

    ``peak_memory_bytes`` and ``cpu_seconds`` are the command's own (its whole process tree's)
    highest memory use and CPU time, where the runtime can measure them: under systemd, from
    the kernel's counters of the command's cgroup; ``None`` elsewhere (the local runtime cannot
    tell one command's processes from a concurrent one's in the kernel's figures).
    """

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    killed_by: str | None = None
    oom_killed: bool = False
    peak_memory_bytes: int | None = None
    cpu_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_by is None

    @property
    def timed_out(self) -> bool:
        return self.killed_by == "timeout"

    def describe(self) -> str:
        if self.killed_by == "timeout":
            return f"timed out after {self.duration:.1f}s and was killed"
        if self.killed_by == "ttl":
            return "was killed because the environment reached its TTL"
        if self.killed_by == "memory":
            return "was killed by the environment's memory limit"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"was killed by {name}"
        return f"exited with status {self.returncode}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["argv"] = list(self.argv)
        return data
