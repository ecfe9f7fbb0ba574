"""The pool: pre-started, unclaimed env units, so that ``create`` claims one instead of
starting one (``pool_size``, ``pool_idle``).

A pool unit is an env unit like any other (``plan.env_properties``), started before any env
asks for it, under a stem of its own, ``gvpool-<hex8>`` (``gestvenv-gvpool-<hex8>.service`` and
its slice; env names cannot start so, ``names.POOL_PREFIX``): its holder runs, its slice is up
and its env dir (``<stem>-<id8>``, :func:`gestvenv.storage.env_dir_name`) waits empty on its
storage. Its **pool file**, ``<runtime dir>/pool/<stem>.json``, is on the holder's and the
reaper's command lines instead of a state file: it says the unit's env id, dir and key, until
when it waits (``idle_until``) and, once claimed, the claim: the owner (pid and start time),
the env's real state file, its idle timeout and its ``expires_at``.

Claiming (:func:`take`, under the registry lock, in the same reservation as the env's state
file) gives the env the unit's id, dir and stem, then writes the claim; the runtime then sets
the env's limits on the slice and its name in the Descriptions, live (``SystemdRuntime.adopt``).
The holder, which polls its pool file (``holder.PERIOD``), switches to holding the env: its
owner's pidfd, its idle timeout, and its **TTL, which the holder holds** (a running transient
service's RuntimeMaxSec cannot be changed): the pool unit's RuntimeMaxSec, ``default_ttl +
pool_idle``, is only systemd's backstop, and a request whose TTL would outlast it is not
pooled. An unclaimed unit ends by itself after ``pool_idle`` seconds, or when its pool file is
gone; its reaper removes its dir and pool file (and, claimed, the env's state file).

A refill (:func:`refill`, a creator's background task) makes pool files and dirs, under its
lock, before it starts their units: one cut short (its process killed) leaves them without a
unit, a dir maybe without its claim yet. A drain (:func:`drain`, which waits for that lock)
removes them at once, the sweep after :data:`GRACE`.

What a pool unit can serve (:func:`refusal`, :func:`serves`): the systemd runtime, an env its
creator owns (``ephemeral()``, ``ephemeral run``, the pytest fixtures; ``ephemeral create``
keeps named units), no container, no max_disk, no uid of its own, and the same key
(``plan.pool_key``: interpreter, storage, sandbox): everything else of the env's unit is the
same for all, or live-settable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import storage
from ...exceptions import UnsafePathError
from ...names import POOL_PREFIX
from ...registry import EnvRecord, is_pool_stem

if TYPE_CHECKING:
    from ...config import Config
    from .runtime import SystemdRuntime

# Seconds a pool file may be without a running unit: the refill writes it (and the dir) before
# it starts the unit. Older, the sweep removes it (a refill cut short by its process's exit).
GRACE = 5.0
# A unit this close to its idle end is not claimed: its holder may be ending it.
CLAIM_MARGIN = 1.0
# In the pool dir: held by a refill while it makes pool files and dirs, and by a drain.
REFILL_LOCK = ".refill.lock"
# Seconds a drain waits for a refill to have made its files (a few ms, unless it is stopped).
REFILL_WAIT = 5.0
# A pool file's temporary name while it is (re)written (:func:`_write`).
_TEMP = re.compile(rf"\.{POOL_PREFIX}[0-9a-f]{{8}}\.json\.[0-9]+\.[0-9]+\.tmp", re.ASCII)


class PoolUnitGone(Exception):
    """The pool unit a create claimed has ended meanwhile: the create starts a unit instead."""


@dataclass(frozen=True)
class PoolEntry:
    """One pool unit, as its pool file says it."""

    stem: str
    id: str
    path: str
    key: str
    created_at: float
    idle_until: float
    deadline: float | None = None  # when its RuntimeMaxSec (the backstop) ends it
    claim: dict[str, Any] | None = None
    description: str = ""  # python, storage, dir: for the Descriptions
    file: str = field(default="", compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("file")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> PoolEntry | None:
        try:
            data = json.loads(path.read_text())
            entry = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data},
                        file=str(path))
        except (OSError, ValueError, TypeError):
            return None
        if not is_pool_stem(entry.stem) or path.name != f"{entry.stem}.json":
            return None
        return entry


# --- decisions (pure) ------------------------------------------------------------------------

def refusal(*, runtime: str, owned: bool, pool_size: int, container: bool, max_disk: bool,
            own_uid: bool) -> str | None:
    """Why a request cannot be served by a pool unit (None: it can, if one has its key)."""
    if pool_size <= 0:
        return "pool_size is 0"
    if runtime != "systemd":
        return f"the {runtime} runtime has no pool"
    if not owned:
        return "a kept env (ephemeral create) gets units named after it"
    if container:
        return "container isolation: its container goes in a slice started for it"
    if max_disk:
        return "max_disk: its dir is a filesystem of its own"
    if own_uid:
        return "a uid of its own (namespace isolation by root)"
    return None


def serves(entry: PoolEntry, key: str, ttl: int | None, now: float) -> bool:
    """Whether ``entry`` can become an env of ``key`` with ``ttl`` now: unclaimed, not about
    to end unclaimed, and its backstop (RuntimeMaxSec) not before the env's TTL."""
    if entry.claim is not None or entry.key != key or entry.idle_until - now < CLAIM_MARGIN:
        return False
    if entry.deadline is None:
        return True
    return ttl is not None and now + ttl + CLAIM_MARGIN <= entry.deadline


def backstop(config: Config) -> int | None:
    """A pool unit's RuntimeMaxSec: systemd's own bound on it, unclaimed or claimed (its
    holder holds the env's exact TTL). None when envs have no TTL by default."""
    return config.default_ttl + config.pool_idle if config.default_ttl else None


# --- pool files ----------------------------------------------------------------------------

def pool_file(stem: str, folder: Path | None = None) -> Path:
    return (folder or storage.pool_dir()) / f"{stem}.json"


def entries(folder: Path | None = None) -> list[PoolEntry]:
    folder = folder or storage.pool_dir()
    found = []
    for path in sorted(folder.glob(f"{POOL_PREFIX}*.json")):
        entry = PoolEntry.from_file(path)
        if entry is not None:
            found.append(entry)
    return found


def _write(entry: PoolEntry, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(entry.to_json())
    os.replace(tmp, path)


def _create(entry: PoolEntry) -> None:
    """A new pool file, whole or not at all: a refill killed meanwhile leaves nothing of it."""
    path = Path(entry.file)
    if not storage.create_whole(path, entry.to_json().encode(), 0o600):
        _write(entry, path)  # (a temporary file, renamed: the sweep removes one left)


def take(key: str, ttl: int | None, now: float) -> PoolEntry | None:
    """An unclaimed pool unit that serves ``key`` (the oldest): the caller holds the registry
    lock, under which every claim is written."""
    for entry in sorted(entries(), key=lambda e: e.created_at):
        if serves(entry, key, ttl, now):
            return entry
    return None


def write_claim(entry: PoolEntry, *, name: str, state_file: Path, owner_pid: int | None,
                owner_started: float | None, idle_timeout: int | None,
                expires_at: float | None) -> None:
    """Claim ``entry`` for an env whose state file exists: its holder switches to it."""
    claim = {"name": name, "state_file": str(state_file), "owner_pid": owner_pid,
             "owner_start": owner_started, "idle_timeout": idle_timeout,
             "expires_at": expires_at, "claimed_at": time.time()}
    _write(PoolEntry(**{**asdict(entry), "claim": claim}), Path(entry.file))


def forget(stem: str, env_id: str, *, claimed_too: bool = True) -> bool:
    """Remove a pool file if it is still ``env_id``'s (and, without ``claimed_too``, still
    unclaimed: a drain must not take a unit a create has just claimed)."""
    path = pool_file(stem)
    entry = PoolEntry.from_file(path)
    if entry is None or entry.id != env_id or (entry.claim is not None and not claimed_too):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def new_entry(key: str, root: Path, description: str, config: Config,
              now: float) -> PoolEntry:
    stem = f"{POOL_PREFIX}{secrets.token_hex(4)}"
    env_id = uuid.uuid4().hex
    limit = backstop(config)
    return PoolEntry(stem=stem, id=env_id, path=str(root / storage.env_dir_name(stem, env_id)),
                     key=key, created_at=now, idle_until=now + config.pool_idle,
                     deadline=now + limit if limit else None, description=description)


# --- refilling, sweeping, draining --------------------------------------------------------

_REFILLING: set[Any] = set()  # (tasks referenced until done)


def refill_soon(runtime: SystemdRuntime, config: Config, template: EnvRecord, key: str) -> None:
    """Refill the pool in the background. Not waited for: a process that exits meanwhile cuts
    it short, which leaves a pool file and dir without a unit (written first) for a drain or
    the sweep."""
    import asyncio

    task = asyncio.ensure_future(refill(runtime, config, template, key))
    _REFILLING.add(task)

    def done(finished: asyncio.Future[list[str]]) -> None:
        _REFILLING.discard(finished)
        if not finished.cancelled():
            finished.exception()
    task.add_done_callback(done)


async def refill(runtime: SystemdRuntime, config: Config, template: EnvRecord,
                 key: str) -> list[str]:
    """Start pool units of ``key`` (like ``template``, an env of that key) until
    ``pool_size`` wait unclaimed; the stems started. One refill at a time per registry (a
    lock it does not wait for: another refill is already at it)."""
    import asyncio

    from ...exceptions import GestvenvError

    folder = await asyncio.to_thread(storage.pool_dir)
    fd = os.open(folder / REFILL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        live = await runtime.pool_units()
        now = time.time()
        # pool_size bounds the pool as a whole, whatever the keys its units were made for:
        # envs of several keys (network on and off, two storages) must not multiply it.
        waiting = [e for e in await asyncio.to_thread(entries, folder)
                   if e.claim is None and e.idle_until - now > CLAIM_MARGIN
                   and (live.get(e.stem) == e.id or now - e.created_at < GRACE)]
        root = Path(template.path).parent
        description = f"python {template.python_version}, {template.backend} storage"
        planned = []
        for _ in range(config.pool_size - len(waiting)):
            entry = new_entry(key, root, description, config, now)
            planned.append(PoolEntry(**{**asdict(entry),
                                        "file": str(pool_file(entry.stem, folder))}))
        # Made by a thread that keeps the lock until they all exist (it closes it): cancelled
        # meanwhile, this task would let go at once, not the thread, and a drain (which takes
        # the lock) must find all it makes. (Submitted at once: no cancellation in between.)
        making = asyncio.get_running_loop().run_in_executor(None, _make, planned, fd)
        fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
    new = await making
    results = await asyncio.gather(*(runtime.start_pool_unit(e, template, config)
                                     for e in new), return_exceptions=True)
    started = []
    for entry, result in zip(new, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, GestvenvError | OSError):
                raise result
            await asyncio.to_thread(_discard, entry)
        else:
            started.append(entry.stem)
    return started


def _make(planned: list[PoolEntry], lock: int) -> list[PoolEntry]:
    """Each entry's pool file, then its dir (whose claim names the pool file): its unit comes
    after. In a thread holding the refill lock (``lock``), which it closes when done. What it
    could not make all of is discarded, and the error raised."""
    made: list[PoolEntry] = []
    try:
        for entry in planned:
            made.append(entry)
            _create(entry)
            storage.claim_dir(Path(entry.path), Path(entry.file), entry.id)
    except Exception:
        for entry in made:
            _discard(entry)
        raise
    finally:
        os.close(lock)
    return made


def _discard(entry: PoolEntry) -> None:
    """Forget a pool unit's file and remove its dir: only a dir that is this entry's own (named
    for its stem and id, in a marked storage root, and claimed by this very pool file, or left
    empty by a refill cut short before its claim), whatever the pool file says its path is."""
    forget(entry.stem, entry.id)
    path = Path(entry.path)
    with contextlib.suppress(OSError, UnsafePathError):
        storage.check_env_dir(path, entry.stem, entry.id)
        if not storage.is_marked_root(path.parent):
            return
        # Unclaimed, its dir holds nothing but its claim, and only its refill makes a dir of
        # that name (a stem and an id of its own): one without a claim is that refill's, cut
        # short between the mkdir and the claim.
        if storage.claim_of(path) != (entry.id, entry.file) and \
                not storage.left_before_its_claim(path):
            return
        storage.remove_tree(path, [path.parent])


def sweep_files(live: dict[str, str], now: float | None = None) -> dict[str, str]:
    """Pool files whose unit is not running (``live``: stem -> env id of the running pool
    units), older than :data:`GRACE`: removed (their dirs are then orphans), and so are the
    temporary files of pool files never finished. Returns what."""
    now = time.time() if now is None else now
    removed = {}
    folder = storage.pool_dir()
    for path in folder.glob(f".{POOL_PREFIX}*.tmp"):
        try:
            st = path.lstat()
            if _TEMP.fullmatch(path.name) and stat.S_ISREG(st.st_mode) \
                    and now - st.st_mtime >= GRACE:
                path.unlink()
                removed[path.name] = "a pool file its writer never finished"
        except FileNotFoundError:
            continue
    for entry in entries():
        if live.get(entry.stem) == entry.id:
            continue
        try:
            age = now - os.stat(entry.file).st_mtime
        except OSError:
            continue
        if age >= GRACE and forget(entry.stem, entry.id):
            removed[f"{entry.stem} (pool)"] = "a pool file without a running unit"
    return removed


async def drain(runtime: SystemdRuntime) -> list[str]:
    """End every unclaimed pool unit of this registry now: its pool file goes, its unit is
    stopped (its reaper removes its dir), and the dir of one whose unit never ran too."""
    import asyncio

    from ... import registry

    def unclaimed() -> list[PoolEntry]:
        # A refill holds its lock until it has made all its pool files and dirs: waited for,
        # they are drained too (the units it starts afterwards find their pool files gone and
        # end at once). (Claims are written under the registry lock: none lands meanwhile.)
        with _refill_lock(REFILL_WAIT), registry.locked():
            return [e for e in entries()
                    if e.claim is None and forget(e.stem, e.id, claimed_too=False)]

    drained = await asyncio.to_thread(unclaimed)
    await asyncio.gather(*(runtime.stop_units_of(e.stem, e.id) for e in drained))
    for entry in drained:
        await asyncio.to_thread(_discard, entry)
    return [e.stem for e in drained]


@contextlib.contextmanager
def _refill_lock(wait: float) -> Iterator[None]:
    """The refill lock, waited for up to ``wait`` seconds (a refill stopped for longer is not:
    what it made so far is drained, the units it starts later end at once)."""
    fd = os.open(storage.pool_dir() / REFILL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def claim_note(stem: str, limit: int | None) -> str:
    """What a pooled env says of itself (its notes)."""
    held = (f"with the unit's RuntimeMaxSec ({limit} s from the pool unit's start: "
            "default_ttl + pool_idle) as systemd's backstop") if limit else \
        "without a RuntimeMaxSec (default_ttl is 0)"
    return (f"pooled: it runs in the pool unit gestvenv-{stem}.service, started before it was "
            "asked for; its TTL is held by that unit's process (gestvenv's holder, exact: if "
            f"it dies the unit ends), {held}")

