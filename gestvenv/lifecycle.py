"""Creating and destroying environments: the two pipelines everything else calls."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

from . import diskcap, overlay, registry, sandbox, storage
from .builder import find_interpreter, make_builder, pip_cache_dir
from .config import Config
from .exceptions import (
    BuildError,
    DiskFullError,
    UnenforceableLimitError,
    UnsafePathError,
    ValidationError,
)
from .inside import InsideInstaller
from .models import Enforcement, IsolationLevel, ResourceLimits, StorageBackend
from .reaper import process_started
from .registry import EnvRecord
from .runtime import Runtime, runtime_named, select_runtime
from .runtime.systemd.pool import PoolUnitGone
from .shield import in_thread, shielded
from .ttl import extension_cap
from .ttl import note as ttl_note

if TYPE_CHECKING:
    from .container.engine import Engine
    from .runtime.systemd import SystemdRuntime

CREATING_VENV = "creating its virtualenv"


@dataclass(frozen=True)
class EnvSpec:
    """A validated request for one environment (defaults already taken from config)."""

    name: str
    packages: tuple[str, ...]
    requirements: tuple[Path, ...]
    python: str | None
    limits: ResourceLimits
    isolation: IsolationLevel
    backend: StorageBackend
    ttl: int | None
    idle_timeout: int | None
    allow_unenforced: bool
    owned: bool  # destroyed when its creator exits (the context manager), or kept (CLI create)
    runtime: str | None = None
    environ: tuple[tuple[str, str], ...] = ()  # variables for every command
    # A root creator's, for a caller of that uid (gestvenv serve): the env's commands (and
    # its builds) run as this uid, not one of the env's own; namespace isolation or more.
    run_as: int | None = None


def check_run_as(run_as: int | None, creator: int, applied: IsolationLevel) -> None:
    """An environment run as another uid: only a root creator switches uids, and only in a
    sandbox (its dir is under root's storage, which only the sandbox shows it; process
    isolation would show it nothing, or everything). Pure: tests/unit/test_run_as.py."""
    if run_as is None:
        return
    if creator != 0:
        raise ValidationError(f"only root creates environments that run as another uid "
                              f"({run_as}); this process is uid {creator}")
    if run_as == 0 or run_as < 0:
        raise ValidationError(f"run_as must be a user's uid, not {run_as}")
    if not applied.sandboxed:
        raise UnenforceableLimitError(
            f"an environment that runs as uid {run_as} needs namespace isolation or more "
            f"(here: {applied.value}): its commands reach their dir through the sandbox only")


def check_enforcement(enforcement: Enforcement, allow_unenforced: bool) -> None:
    missing = enforcement.unenforced
    if missing and not allow_unenforced:
        detail = "; ".join(f"{k}={v.requested!r}: {v.mechanism}" for k, v in missing.items())
        raise UnenforceableLimitError(
            f"the {enforcement.runtime} runtime cannot enforce {detail}. Pass "
            "allow_unenforced=True (--allow-unenforced) to create the environment anyway"
        )


async def create(spec: EnvSpec, config: Config) -> EnvRecord:
    """Reserve the name, build the venv, start the runtime's group, install: or undo it all.
    Under systemd, an env its creator owns claims a pool unit when one serves it (see
    ``runtime.systemd.pool``)."""
    try:
        return await _create(spec, config, use_pool=True)
    except PoolUnitGone:
        # The pool unit it claimed had ended (undone like any failed create): one is started.
        return await _create(spec, config, use_pool=False)


async def _create(spec: EnvSpec, config: Config, *, use_pool: bool) -> EnvRecord:
    runtime = await select_runtime(config, spec.runtime)
    enforcement, engine = await _isolation(runtime, spec, config)
    # max_disk is the storage's to hold (a filesystem of the env's own), whatever the runtime.
    disk = None
    if spec.limits.max_disk is not None:
        memory = enforcement.limits.get("max_memory")
        facts = diskcap.Facts(
            sandboxed=enforcement.isolation_applied.sandboxed,
            # (A container's cgroup is one: the engine's --memory.)
            memory_cgroup=(runtime.name == "systemd" or engine is not None)
            and memory is not None and memory.enforced,
            preallocate=config.preallocate)
        disk = diskcap.status(spec.limits.max_disk, spec.backend,
                              await asyncio.to_thread(diskcap.probe), facts)
    enforcement = diskcap.with_status(enforcement, disk)
    check_enforcement(enforcement, spec.allow_unenforced)
    check_run_as(spec.run_as, os.geteuid(), enforcement.isolation_applied)
    cap = diskcap.cap_of(enforcement)  # MB, when a filesystem of its own holds max_disk
    interpreter = await asyncio.to_thread(find_interpreter, spec.python)
    root = await asyncio.to_thread(storage.storage_root, spec.backend, config)
    if cap is not None:
        free = await asyncio.to_thread(diskcap.free_bytes, root.path)
        if (why := diskcap.too_big(cap, spec.backend, free, str(root.path))) is not None:
            raise DiskFullError(f"cannot create environment {spec.name!r}: {why}")
    env_id = uuid.uuid4().hex
    builder = make_builder(config, env_id)
    me, started = os.getpid(), process_started(os.getpid())
    now = time.time()
    record = EnvRecord(
        name=spec.name, id=env_id, path=str(root.path / storage.env_dir_name(spec.name, env_id)),
        backend=spec.backend.value, runtime=runtime.name, interpreter=interpreter.path,
        python_version=interpreter.version, created_at=now, ttl=spec.ttl or None,
        max_ttl=extension_cap(config.max_ttl, spec.ttl),
        idle_timeout=spec.idle_timeout or None, limits=spec.limits.to_dict(),
        # Every env is owned by its creator while it is being built (a creator killed half-way
        # leaves an orphan the watchdog removes); a kept one is released when ready.
        enforcement=enforcement.to_dict(), owner_pid=me, owner_started=started,
        caller_uid=spec.run_as,
        last_activity=now,
        builder=builder.name, packages=list(spec.packages),
        notes=[n for n in (root.note, *enforcement.notes,
                           ttl_note(extension_cap(config.max_ttl, spec.ttl))) if n],
        environ=dict(spec.environ),
    )
    if enforcement.isolation_applied.sandboxed:
        record = await asyncio.to_thread(_with_sandbox, record, config, builder.tools(),
                                         spec.run_as)
    if engine is not None:  # (its unit's reaper removes it; sweeps look for it from now on)
        from .runtime import container  # (only here: container envs are the rare ones)

        record = container.planned(record, engine,
                                   _container_tools(config, builder.tools()))
        await asyncio.to_thread(container.mark_used, config)
    pool_key, take = _pool_take(runtime, spec, record, config, engine is not None,
                                cap is not None) if use_pool else (None, None)
    stage, path = "reserving its name", Path(record.path)
    # What the reservation registered when it took a pool unit (another id, dir and stem):
    # filled by its thread, so that the undo finds it even when this task was cancelled
    # before the thread's result came back.
    taken: list[EnvRecord] = []
    async with AsyncExitStack() as undo:
        # The undo is armed before the reservation: a cancellation may land while the reserving
        # thread has already written the state file. destroy() only ever removes this record
        # (matched by id), so a failed reservation (name taken) undoes nothing of another's.
        undo.push_async_callback(lambda: shielded(destroy(taken[0] if taken else record,
                                                          config)))
        try:
            # Threads are waited for when cancelled (in_thread), so that the undo runs after
            # the state file or the dir exists, never before it.
            # Before the state file exists: a creator killed right after reserving is
            # noticed too. (And again after: a watchdog about to exit may not have seen it.)
            await in_thread(runtime.watch_creators)
            await in_thread(registry.reserve, record, max_concurrent=config.max_concurrent,
                            max_total_memory_mb=config.max_total_memory_mb,
                            **({"take": _taking(take, taken)} if take is not None else {}))
            if taken:  # a pool unit's: its id, dir and units
                record, path = taken[0], Path(taken[0].path)
                builder = make_builder(config, record.id)
            # Package code runs in the env; before its first command, its files go to its uid.
            builder.inside = InsideInstaller(record, runtime, hand_over_first=True)
            builder.share_read_only = record.sandbox_uid is not None
            builder.overlay = overlay.chosen(
                euid=os.geteuid(), sandboxed=enforcement.isolation_applied.sandboxed,
                link_mode=config.link_mode, runtime=runtime.name,
                same_mount_ns=runtime.name == "systemd" and overlay.same_mount_ns_as_init())
            await in_thread(runtime.watch_creators)  # from now on a dead creator is noticed
            # Started right after the reservation, before the dir and the build: from here on
            # the env's end (its files' too) is systemd's to guarantee, whatever becomes of us.
            state_file = registry.state_path(record.name)
            if record.pooled:
                # Claimed: its unit runs, its dir waits; its limits and name are set live.
                stage = "claiming its pool unit"
                await _adopt(runtime, record)
            else:
                stage = "starting its units"
                await runtime.start(record)
                stage = "making its directory"
                await in_thread(storage.claim_dir, path, state_file, record.id)
            if pool_key is not None:
                _refill(runtime, config, record, pool_key)
            if cap is not None:
                stage = f"making its {cap} MB filesystem"
                await in_thread(diskcap.make, path, spec.backend, cap, config.preallocate)
                await in_thread(storage.write_claim, path, state_file, record.id)
            starting: asyncio.Future[EnvRecord] | None = None
            if engine is not None:
                # Started while its venv is made (an engine call of a few hundred ms): a build
                # inside waits for it (InsideInstaller.ready), and so does the undo, which
                # must find it (a thread cannot be cancelled).
                starting = asyncio.ensure_future(runtime.start_container(record))
                undo.push_async_callback(lambda: shielded(_settled(starting)))
                builder.inside.ready = starting
            stage = CREATING_VENV
            await builder.create(path, interpreter)
            stage = "installing its packages"
            await builder.populate(path, interpreter, spec.packages, spec.requirements)
            if starting is not None:
                stage = "starting its container"
                record = await starting
            await builder.inside.hand_over()  # (done already if a build ran inside)
            if engine is not None and builder.template is not None:
                stage = "making its package set's image"
                from .runtime import container

                record = await in_thread(container.with_packages_image, record, engine,
                                         *builder.template)
            record = record.evolve(status="ready", last_activity=time.time())
            if not spec.owned:
                record = record.evolve(owner_pid=None, owner_started=None)
            stage = "writing its state"
            await in_thread(registry.commit, record)
        except (OSError, BuildError) as exc:
            # Judged before the undo, while the filesystems still hold what filled them.
            # (python -m venv swallows ensurepip's ENOSPC: there only, a used-up cap says it.)
            swallowed = stage == CREATING_VENV and await in_thread(diskcap.used_up, path)
            if not diskcap.is_full(exc) and not swallowed:
                raise
            raise await in_thread(full_error, record, config, stage) from exc
        undo.pop_all()
    return record


def _pool_take(runtime: Runtime, spec: EnvSpec, record: EnvRecord, config: Config,
               contained: bool, capped: bool
               ) -> tuple[str | None, Callable[[EnvRecord], registry.Taken | None] | None]:
    """The pool key of a request a pool unit may serve, and how the reservation takes one
    (None, None: not one for the pool)."""
    from .runtime.systemd import pool

    if pool.refusal(runtime=runtime.name, owned=spec.owned, pool_size=config.pool_size,
                    container=contained, max_disk=capped,
                    own_uid=record.sandbox_uid is not None) is not None:
        return None, None
    key = cast("SystemdRuntime", runtime).pool_key(record)
    limit = pool.backstop(config)

    def take(reserving: EnvRecord) -> registry.Taken | None:
        # (An extendable TTL may run to max_ttl: a unit whose backstop ends sooner cannot
        # serve it.)
        entry = pool.take(key, reserving.max_ttl or reserving.ttl, time.time())
        if entry is None:
            return None
        claimed = reserving.evolve(id=entry.id, path=entry.path, unit_stem=entry.stem,
                                   notes=[*reserving.notes, pool.claim_note(entry.stem, limit)])

        def claim(registered: EnvRecord) -> None:
            pool.write_claim(entry, name=registered.name,
                             state_file=registry.state_path(registered.name),
                             owner_pid=registered.owner_pid,
                             owner_started=registered.owner_started,
                             idle_timeout=registered.idle_timeout,
                             expires_at=registered.expires_at)
        return claimed, claim
    return key, take


def _taking(take: Callable[[EnvRecord], registry.Taken | None],
            taken: list[EnvRecord]) -> Callable[[EnvRecord], registry.Taken | None]:
    """``take``, keeping what it took in ``taken`` (the record the reservation registers)."""
    def wrapped(record: EnvRecord) -> registry.Taken | None:
        result = take(record)
        if result is not None:
            taken.append(result[0])
        return result
    return wrapped


async def _adopt(runtime: Runtime, record: EnvRecord) -> None:
    await cast("SystemdRuntime", runtime).adopt(record)


def _refill(runtime: Runtime, config: Config, record: EnvRecord, key: str) -> None:
    from .runtime.systemd import pool

    pool.refill_soon(cast("SystemdRuntime", runtime), config, record, key)


async def _settled(task: asyncio.Future[EnvRecord]) -> None:
    """Wait for ``task`` to end, however it ends (its outcome is the create's to report)."""
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # (retrieved: never "exception was never retrieved")


async def _isolation(runtime: Runtime, spec: EnvSpec,
                     config: Config) -> tuple[Enforcement, Engine | None]:
    """What the runtime applies, and at container isolation the engine that runs it: none
    found, the strongest sandbox without one (namespace), and the env says so."""
    if spec.isolation.rank < IsolationLevel.CONTAINER.rank:
        return runtime.plan(spec.limits, spec.isolation), None
    from .container import plan as cplan
    from .runtime import container

    engine, why = await container.choose(config.container_engine)
    if engine is None:
        fallback = runtime.plan(spec.limits, IsolationLevel.NAMESPACE)
        note = (f"isolation {spec.isolation.value} requested; no container engine ({why}): "
                f"{fallback.isolation_applied.value} isolation applied, the strongest sandbox "
                f"of the {runtime.name} runtime without one")
        return replace(fallback, isolation_requested=spec.isolation,
                       notes=(note, *fallback.notes)), None
    # The runtime holds the limits it holds at process level (under systemd, the env's
    # slice, where the container goes); the container holds the isolation.
    base = runtime.plan(spec.limits, IsolationLevel.PROCESS)
    return cplan.enforcement(
        base, spec.limits, engine=engine.name, rootless=engine.rootless,
        own_uid=sandbox.needs_own_uid(os.geteuid(), IsolationLevel.CONTAINER),
        slice_holds=runtime.name == "systemd" and engine.name == "podman",
        requested=spec.isolation), engine


def full_error(record: EnvRecord, config: Config, stage: str) -> DiskFullError:
    """The one-line error for a full filesystem met while ``stage`` (creating, installing)."""
    backend = StorageBackend(record.backend)
    others = {f"the {backend.value} storage root": Path(record.path).parent,
              "the package cache": storage.uv_cache_dir(config),
              "gestvenv's state dir": storage.runtime_dir_path()}
    return diskcap.explain_full(record.name, stage, diskcap.spaces(
        Path(record.path), diskcap.cap_of(record.enforcement_record), others))


def _container_tools(config: Config, tools: list[str]) -> list[str]:
    """What a container env's commands need of the host: the builder's ``tools`` (uv, or the
    pip its pip runs), and the local dirs packages are found in (find_links), bound
    read-only."""
    local = [link for link in config.find_links if "://" not in link and os.path.isdir(link)]
    return [*tools, *local]


def _with_sandbox(record: EnvRecord, config: Config, tools: list[str],
                  run_as: int | None = None) -> EnvRecord:
    """The env's sandbox: its own uid (a root creator's; ``run_as``: a caller's, for whom a
    service creates it), what its commands must not see (gestvenv's dirs) and what they need
    from hidden trees (the interpreter, the builder's ``tools``: uv, or the pip its pip
    runs)."""
    uid = run_as
    if uid is None and sandbox.needs_own_uid(os.geteuid(),
                                             record.enforcement_record.isolation_applied):
        taken = {r.sandbox_uid for r in registry.list_records() if r.sandbox_uid is not None}
        uid = sandbox.uid_for(record.id, taken)
    dirs = [str(storage.runtime_dir_path()), str(storage.uv_cache_dir(config)),
            str(storage.templates_dir(config)), str(pip_cache_dir(config)),
            *map(str, storage.all_roots(config))]
    if os.geteuid() == 0:
        dirs += map(str, (storage.ROOT_RUNTIME_DIR, storage.ROOT_CACHE_DIR))
    hide, expose = sandbox.sandbox_paths(record.interpreter, tools,
                                         [d for d in dirs if os.path.isdir(d)])
    return record.evolve(sandbox_uid=uid, sandbox_hide=hide, sandbox_expose=expose)


async def destroy(record: EnvRecord, config: Config) -> None:
    """Stop every process, delete the files (only inside the storage roots), forget the env.

    Idempotent. A path the state file may not name (outside the roots, another env's dir, a
    symlink) is refused: nothing is deleted through it, the state file is removed and
    :class:`UnsafePathError` says what was refused.
    """
    path = Path(record.path)
    runtime = runtime_named(record.runtime)
    roots = await asyncio.to_thread(storage.env_roots, path, config)
    # Judged before the stop: under systemd the unit's reaper deletes the env's dir from its
    # own copy of the path and refuses the same things, but only its journal would say so.
    refused = await asyncio.to_thread(_refusal, path, record, roots)
    try:
        await runtime.stop(record)
        if refused is None or await asyncio.to_thread(os.path.islink, path):
            # (A link still there is removed, never followed, and reported.)
            await asyncio.to_thread(storage.remove_tree, path, roots)
        if refused is not None:
            raise refused
    except UnsafePathError:
        await asyncio.to_thread(registry.remove, record)
        raise
    await asyncio.to_thread(registry.remove, record)
    if record.pooled:  # (its reaper removes its pool file; not if its unit never ran)
        from .runtime.systemd import pool

        await asyncio.to_thread(pool.forget, record.stem, record.id)


def _refusal(path: Path, record: EnvRecord, roots: list[Path]) -> UnsafePathError | None:
    try:
        storage.check_env_dir(path, record.stem, record.id)
        storage.check_inside_roots(path, roots)
    except UnsafePathError as exc:
        return exc
    return None


async def destroy_many(records: Sequence[EnvRecord], config: Config) -> list[tuple[str, str]]:
    """Destroy several environments concurrently; return (name, error) for those that failed."""
    results = await asyncio.gather(*(destroy(r, config) for r in records), return_exceptions=True)
    failures = []
    for record, result in zip(records, results, strict=True):
        if isinstance(result, BaseException):
            failures.append((record.name, str(result)))
    return failures
