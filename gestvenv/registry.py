"""The registry: one JSON state file per environment, visible to every process of the user.

Files are created exclusively (write a temp file, then ``link()`` it: fails if the name exists) so
two concurrent creates of one name cannot both win, and updated with ``os.replace`` so a reader
never sees half a file. Quota checks and the reservation happen under one ``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .exceptions import (
    EnvironmentClosedError,
    EnvironmentExistsError,
    EnvironmentNotFoundError,
    QuotaExceededError,
)
from .models import Enforcement, ResourceLimits
from .names import POOL_PREFIX, validate_name
from .storage import runtime_dir, state_dir

STATE_VERSION = 1
_POOL_STEM_RE = re.compile(re.escape(POOL_PREFIX) + r"[0-9a-f]{8}", re.ASCII)


def is_pool_stem(stem: str) -> bool:
    """A pool unit's stem: ``gvpool-`` and 8 hex digits (never an env's name)."""
    return bool(_POOL_STEM_RE.fullmatch(stem))


@dataclass(frozen=True)
class EnvRecord:
    """Everything gestvenv knows about one environment, as stored in its state file."""

    name: str
    id: str
    path: str
    backend: str
    runtime: str
    interpreter: str
    python_version: str
    created_at: float
    ttl: int | None
    idle_timeout: int | None
    limits: dict[str, Any]
    enforcement: dict[str, Any]
    owner_pid: int | None = None
    owner_started: float | None = None
    last_activity: float = 0.0
    status: str = "creating"
    builder: str = "uv"
    packages: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environ: dict[str, str] = field(default_factory=dict)
    uid: int = field(default_factory=os.geteuid)
    # The unprivileged uid (and gid) the env's commands run as when a root creator asked for
    # namespace isolation or more; None: they run as the creator.
    sandbox_uid: int | None = None
    # At namespace isolation and above: gestvenv's own dirs the env's commands must not see
    # (hidden under an empty tmpfs), and paths under hidden trees they need (bound read-only).
    sandbox_hide: list[str] = field(default_factory=list)
    sandbox_expose: list[str] = field(default_factory=list)
    # At container isolation: its engine, its container's name and id, its image
    # (gestvenv.runtime.container); empty below.
    container: dict[str, Any] = field(default_factory=dict)
    # The stem its systemd units run under when it is not its name: a pooled env keeps its
    # pool unit's (``gvpool-<hex8>``: gestvenv-gvpool-<hex8>.service, its slice, its dir).
    unit_stem: str = ""
    # The uid a service (gestvenv serve, as root) created it for: its commands run as that
    # uid (sandbox_uid), and through the API only that uid (or root) sees and acts on it.
    caller_uid: int | None = None
    # The lifetime its TTL may be extended to (gestvenv.ttl); None: its TTL is fixed.
    max_ttl: int | None = None
    version: int = STATE_VERSION

    @property
    def stem(self) -> str:
        """What its units and its dir are named after (:func:`storage.env_dir_name`)."""
        return self.unit_stem or self.name

    @property
    def pooled(self) -> bool:
        return bool(self.unit_stem)

    @property
    def expires_at(self) -> float | None:
        return self.created_at + self.ttl if self.ttl else None

    @property
    def resource_limits(self) -> ResourceLimits:
        return ResourceLimits.from_dict(self.limits)

    @property
    def enforcement_record(self) -> Enforcement:
        return Enforcement.from_dict(self.enforcement)

    def owner_alive(self) -> bool:
        """True if the creating process still runs (same PID and start time), or there is none."""
        if self.owner_pid is None:
            return True
        from .reaper import process_started

        started = process_started(self.owner_pid)
        if started is None:
            return False
        return self.owner_started is None or abs(started - self.owner_started) < 0.5

    def state(self, now: float | None = None, *, owner_alive: bool | None = None) -> str:
        """creating, ready, expired, orphaned (its owner died) or destroying. ``owner_alive``:
        whether its owner runs, when the caller knows (see :func:`owners_alive`)."""
        now = time.time() if now is None else now
        alive = self.owner_alive if owner_alive is None else lambda: owner_alive
        if self.status in ("creating", "destroying"):
            return self.status if alive() else "orphaned"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        if not alive():
            return "orphaned"
        return self.status

    def holds_quota(self, now: float | None = None, *, owner_alive: bool | None = None) -> bool:
        """Counted against max_concurrent and max_total_memory_mb: every env but those a
        sweep removes (expired, orphaned)."""
        return self.state(now, owner_alive=owner_alive) not in ("expired", "orphaned")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EnvRecord:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError("unknown state file version")
        known = {f for f in cls.__dataclass_fields__}
        record = cls(**{k: v for k, v in data.items() if k in known})
        validate_name(record.name)
        if record.unit_stem and not is_pool_stem(record.unit_stem):
            raise ValueError(f"not a pool unit's stem: {record.unit_stem!r}")
        return record

    def evolve(self, **changes: Any) -> EnvRecord:
        return replace(self, **changes)


def state_path(name: str, folder: Path | None = None) -> Path:
    """The state file of env ``name``; ``folder``: the state dir, when the caller has it
    (``state_dir()`` makes sure of it on each call)."""
    return (folder or state_dir()) / f"{validate_name(name)}.json"



def lock_path() -> Path:
    return runtime_dir() / "registry.lock"


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """The registry lock: serialises quota checks with reservations across processes (and
    with the reaper of an env's unit, which takes it to remove the env's state file)."""
    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_tmp(record: EnvRecord) -> Path:
    tmp = state_dir() / f".{record.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(record.to_json())
    return tmp


def owners_alive(records: Iterable[EnvRecord]) -> dict[tuple[int | None, float | None], bool]:
    """Whether each distinct owner of ``records`` still runs, asked once per owner: the envs
    of one process (50 created at once) cost one look at it, not one each."""
    alive: dict[tuple[int | None, float | None], bool] = {}
    for record in records:
        key = (record.owner_pid, record.owner_started)
        if key not in alive:
            alive[key] = record.owner_alive()
    return alive


def quota_holders(records: Sequence[EnvRecord], now: float,
                  alive: Mapping[tuple[int | None, float | None], bool]) -> list[EnvRecord]:
    """The records counted against the quotas, given whether their owners run."""
    return [r for r in records
            if r.holds_quota(now, owner_alive=alive[(r.owner_pid, r.owner_started)])]


# A pool unit taken for a reservation: (the record as it claims it, what to do once its state
# file exists). See gestvenv.runtime.systemd.pool.
Taken = tuple[EnvRecord, Callable[[EnvRecord], None]]


def reserve(record: EnvRecord, *, max_concurrent: int, max_total_memory_mb: int,
            take: Callable[[EnvRecord], Taken | None] | None = None) -> EnvRecord:
    """Register a new environment, or raise if the name is taken or a quota would be exceeded.

    ``take``: under the same lock, once the quotas allow the env, may give the record another
    id, dir and unit stem (a pool unit's) and a step to run once its state file exists (the
    claim, which names it). Returns the record registered."""
    with locked():
        records = list_records()
        live = quota_holders(records, time.time(), owners_alive(records))
        if len(live) >= max_concurrent:
            raise QuotaExceededError(
                f"{len(live)} environments exist; max_concurrent is {max_concurrent} "
                "(gestvenv ephemeral cleanup, or raise [ephemeral] max_concurrent)"
            )
        wanted = record.limits.get("max_memory")
        if wanted:
            used = sum(r.limits.get("max_memory") or 0 for r in live)
            if used + wanted > max_total_memory_mb:
                raise QuotaExceededError(
                    f"max_memory {wanted} MB + {used} MB held by other environments exceeds "
                    f"max_total_memory_mb = {max_total_memory_mb}"
                )
        if take is not None and state_path(record.name).exists():
            take = None  # (refused below: no pool unit is taken for it)
        taken = take(record) if take is not None else None
        if taken is not None:
            record = taken[0]
        tmp = _write_tmp(record)
        try:
            os.link(tmp, state_path(record.name))
        except FileExistsError:
            raise EnvironmentExistsError(
                f"an environment named {record.name!r} already exists "
                f"(gestvenv ephemeral cleanup {record.name})"
            ) from None
        finally:
            tmp.unlink()
        if taken is not None:
            taken[1](record)
    return record


def commit(record: EnvRecord) -> None:
    """Save a record that must still be there: an env destroyed meanwhile (``cleanup NAME``
    while it was being built) is not brought back."""
    with locked():
        try:
            current = load(record.name)
        except EnvironmentNotFoundError:
            current = None
        if current is None or current.id != record.id:
            raise EnvironmentClosedError(
                f"environment {record.name!r} was destroyed while it was being created")
        save(record)


def save(record: EnvRecord) -> None:
    tmp = _write_tmp(record)
    os.replace(tmp, state_path(record.name))


def load(name: str) -> EnvRecord:
    path = state_path(name)
    try:
        return EnvRecord.from_json(path.read_text())
    except FileNotFoundError:
        raise EnvironmentNotFoundError(f"no environment named {name!r}") from None
    except (ValueError, TypeError) as exc:
        raise EnvironmentNotFoundError(f"state file {path} is unreadable: {exc}") from None


def current(record: EnvRecord) -> EnvRecord | None:
    """The environment's state as its file says now; None if it is gone, unreadable, or now
    another environment's (the name reused)."""
    try:
        now = load(record.name)
    except EnvironmentNotFoundError:
        return None
    return now if now.id == record.id else None


def remove(record: EnvRecord) -> None:
    """Forget an environment, unless the name was reused by another one meanwhile."""
    path = state_path(record.name)
    with locked():
        try:
            current = EnvRecord.from_json(path.read_text())
        except FileNotFoundError:
            return
        except (ValueError, TypeError):
            current = None
        if current is None or current.id == record.id:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def touch(name: str, env_id: str) -> None:
    """Record activity now (for the idle timeout); a no-op if the env is gone or was replaced."""
    with locked(), contextlib.suppress(EnvironmentNotFoundError):
        record = load(name)
        if record.id == env_id and record.status == "ready":
            save(record.evolve(last_activity=time.time()))


def list_records() -> list[EnvRecord]:
    records = []
    for path in sorted(state_dir().glob("*.json")):
        try:
            records.append(EnvRecord.from_json(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
    return records


def any_state_file() -> bool:
    """Whether any environment has a state file (names only: nothing is parsed)."""
    try:
        with os.scandir(state_dir()) as entries:
            return any(e.name.endswith(".json") for e in entries)
    except FileNotFoundError:
        return False


def stale_temp_files() -> list[Path]:
    """Temporary state files whose writer died before linking or renaming them (a creator
    SIGKILLed at that instant): the writer's PID is in the name (see ``_write_tmp``)."""
    import psutil

    stale = []
    for path in state_dir().glob(".*.tmp"):
        try:
            pid = int(path.name.split(".")[-3])
            age = time.time() - path.stat().st_mtime
        except (ValueError, IndexError, OSError):
            continue
        # A live writer holds its file for microseconds; an old one with a live PID is a
        # recycled PID.
        if not psutil.pid_exists(pid) or age > 60:
            stale.append(path)
    return stale


def unreadable_state_files() -> list[Path]:
    """State files that cannot be parsed (tampered or from another version): for cleanup.
    Not one changed in the last seconds: someone may be writing it in place (gestvenv itself
    never does: it renames a finished file over it)."""
    bad = []
    for path in sorted(state_dir().glob("*.json")):
        try:
            EnvRecord.from_json(path.read_text())
        except (OSError, ValueError, TypeError):
            try:
                if time.time() - path.stat().st_mtime > 5:
                    bad.append(path)
            except OSError:
                continue
    return bad
