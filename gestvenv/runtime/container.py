"""An environment's container (container isolation), under either runtime.

The env's container is started once its dir exists (:func:`start`), from the base image of
its interpreter (:mod:`gestvenv.container.images`), and lives as long as the env: its
commands are ``podman exec``s into it (:func:`run`), run as our children by
:func:`.spawn.run_process` exactly as the local runtime runs its own, so that results,
timeouts and ``killed_by`` are the same at every level. Under systemd the container and its
conmon are scopes in the env's slice (``--cgroup-parent``), so the slice's limits hold them
and its end ends them; locally the engine holds the limits (``--memory``...).

What ends it: :func:`stop` (a destroy), and the env's reaper (its unit's stop action or its
local holder), which removes every container labelled with the env's id
(``reaper.remove_containers``): at the TTL, when its creator dies, and after a crash the
cleanup timer's sweep (:func:`sweep`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import diskcap, reaper, storage
from ..config import Config
from ..container import engine as engines
from ..container import images
from ..container import plan as cplan
from ..exceptions import (
    CommandNotExecutableError,
    CommandNotFoundError,
    EnvironmentClosedError,
    RuntimeUnavailableError,
    ValidationError,
)
from ..models import ExecResult
from ..registry import EnvRecord, state_path
from ..templates import TemplateCache
from . import processes
from .base import CommandSpec
from .bwrap import EXEC_FAILED, INIT
from .spawn import StatusPipe, run_process
from .systemd.cgroups import OomWatch
from .unitview import UnitView

# Moves the status pipe to fd 3, where ``podman exec --preserve-fds 1`` passes it on to the
# sandbox init (bwrap.INIT) that runs the command in the container: bash (dash takes no fd
# above 9), else the interpreter (a few ms more).
_FD3_BASH = 'exec 3>&"$0"; exec "$@"'
_FD3_PYTHON = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.execvp(sys.argv[2], sys.argv[2:])"
_NO_SUCH = ("no such container", "no container with name or id", "is not running",
            "container state improper", "can only create exec sessions on running containers",
            "has already been removed", "does not exist in database")


def of(record: EnvRecord) -> dict[str, Any] | None:
    """The env's container facts (engine, name, image...), or None below container isolation."""
    return record.container or None


def conf_dir() -> Path:
    return storage.runtime_dir()


async def choose(requested: str) -> tuple[engines.Engine | None, str]:
    """The engine for a new container env (config ``container_engine``), or None and why."""
    engine, why = await asyncio.to_thread(engines.find, requested, conf_dir())
    if engine is not None:
        refused = cplan.unusable(engine.name, rootless=engine.rootless,
                                 cgroup_version=engine.cgroup_version)
        if refused is not None:
            return None, refused
    return engine, why


def engine_of(record: EnvRecord) -> engines.Engine:
    """The engine an env was made with, as its state file says: only podman or docker, by a
    path that names it (a state file cannot make gestvenv run another program)."""
    facts = of(record) or {}
    name, path = str(facts.get("engine")), str(facts.get("path"))
    if name not in ("podman", "docker") or not os.path.isabs(path) \
            or os.path.basename(path) != name or not _trusted(path):
        raise RuntimeUnavailableError(
            f"environment {record.name!r} names an unknown container engine {name!r} at "
            f"{path!r}")
    environ = {k: str(v) for k, v in dict(facts.get("environ") or {}).items()
               if k in (*engines.ENDPOINT_VARS, "CONTAINERS_CONF", "DOCKER_BUILDKIT")}
    return engines.Engine(facts["engine"], facts["path"], bool(facts.get("rootless")),
                          int(facts.get("cgroup_version") or 1), environ)


def _trusted(path: str) -> bool:
    """A program root may run: root's, and nobody else may change it (for other users, a
    state file is their own: what it names is their choice)."""
    if os.geteuid() != 0:
        return True
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & 0o022


def planned(record: EnvRecord, engine: engines.Engine, tools: Sequence[str]) -> EnvRecord:
    """The record with its container's engine, before anything runs: its units and holder
    (whose reaper removes the container) are made with it. ``tools``: host paths its
    commands need, bound read-only (uv for its pip, local package dirs of find_links)."""
    expose = [p for tool in tools for p in (os.path.abspath(tool), os.path.realpath(tool))]
    return record.evolve(container={
        "engine": engine.name, "path": engine.path, "rootless": engine.rootless,
        "cgroup_version": engine.cgroup_version,
        "conf": engine.environ.get("CONTAINERS_CONF", ""),
        # (With the daemon or service it talks to: its stop action must reach the same one.)
        "environ": {**engine.environ, **{k: os.environ[k] for k in engines.ENDPOINT_VARS
                                         if os.environ.get(k)}},
        "name": cplan.container_name(record.name, record.id),
        "expose": [p for p in dict.fromkeys(expose) if os.path.exists(p)]})


def in_slice(record: EnvRecord) -> bool:
    """Whether a systemd runtime's env has its container in its slice: podman's (its
    --cgroup-parent); docker's daemon places its containers itself."""
    return (of(record) or {}).get("engine") == "podman"


def reaper_environ(record: EnvRecord) -> dict[str, str]:
    """What the env's reaper needs to remove its container (its unit's or holder's env)."""
    facts = of(record)
    if facts is None:
        return {}
    return {reaper.CONTAINER_ENGINE: facts["path"], **(facts.get("environ") or {})}


def _user(record: EnvRecord, engine: engines.Engine) -> tuple[str | None, bool]:
    """(--user, --userns keep-id): the env's own uid for a root creator, the creator's uid
    otherwise (rootless podman maps it to itself)."""
    if record.sandbox_uid is not None:
        return f"{record.sandbox_uid}:{record.sandbox_uid}", False
    if engine.rootless:
        return None, True
    if os.geteuid() != 0:  # docker's daemon is root: run as the creator
        return f"{os.geteuid()}:{os.getegid()}", False
    return None, False


def spec_of(record: EnvRecord, engine: engines.Engine, image: str,
            cgroup_parent: str | None) -> cplan.ContainerSpec:
    enforcement = record.enforcement_record
    limits = record.resource_limits
    user, keep_id = _user(record, engine)
    by_engine = cgroup_parent is None
    return cplan.ContainerSpec(
        engine=engine.name, image=image, env_name=record.name, env_id=record.id,
        owner=os.geteuid(), state_file=str(state_path(record.name)),
        env_path=os.path.realpath(record.path), interpreter=record.interpreter,
        network=limits.network_access, user=user, keep_id=keep_id,
        memory_mb=limits.max_memory if by_engine else None,
        processes=limits.max_processes,  # (on the container's own cgroup, in either case)
        cpu_percent=limits.max_cpu_percent if by_engine else None,
        cgroup_parent=cgroup_parent, tmpfs_mb=limits.max_memory,
        temp=tuple(diskcap.capped_temp_dirs(enforcement, record.path).items()),
        shm_mb=diskcap.cap_of(enforcement),
        expose=tuple((of(record) or {}).get("expose") or ()))


async def start(record: EnvRecord, *, cgroup_parent: str | None = None,
                oom_cgroup: str | None = None) -> EnvRecord:
    """Start the env's container (its dir exists, its cap is mounted); the record with what
    it became. ``cgroup_parent``: the env's slice, under systemd (``oom_cgroup`` its cgroup)."""
    engine = engine_of(record)
    manager = "systemd" if cgroup_parent is not None else None
    # Started from the base image straight away; generated first only if the engine says it
    # has none (one engine call saved on every create but the first).
    image = await asyncio.to_thread(images.base_ref, record.interpreter)
    spec = spec_of(record, engine, image, cgroup_parent)
    args = [*cplan.global_args(engine.name, manager), *cplan.run_args(spec)]
    try:
        done = await asyncio.to_thread(engine.run, *args, check=False)
        if done.returncode != 0 and not await asyncio.to_thread(
                images.image_exists, engine, image):
            await asyncio.to_thread(_locked, image, images.ensure_base, engine,
                                    record.interpreter)
            done = await asyncio.to_thread(engine.run, *args, check=False)
        if done.returncode != 0:
            raise engines.EngineError(f"{engine.name} run failed: {engines.last_line(done.stderr)}")
    except engines.EngineError as exc:
        raise RuntimeUnavailableError(
            f"cannot start the container of environment {record.name!r}: {exc}") from None
    container_id = done.stdout.decode().strip().splitlines()[-1]
    if oom_cgroup is None:
        oom_cgroup = await asyncio.to_thread(_cgroup_of, engine, container_id)
    facts = {**(of(record) or {}), "id": container_id, "image": image,
             "user": spec.user or "", "oom_cgroup": oom_cgroup or ""}
    return record.evolve(container=facts)


# podman's own parent cgroup for its containers under the cgroupfs manager (root's).
_PODMAN_CGROUPFS_PARENT = "/libpod_parent"


def _locked(ref: str, make: Callable[..., str], *args: Any) -> str:
    """``make(*args)`` under a lock of this user's for image ``ref``: creators that need the
    same image at once make it once (the others find it made)."""
    lock = conf_dir() / f"image-{hashlib.sha256(ref.encode()).hexdigest()[:16]}.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        return make(*args)


def _cgroup_of(engine: engines.Engine, container_id: str) -> str | None:
    """The container's memory cgroup (where its OOM kills are counted): where podman's
    cgroupfs manager puts it, if it is there; else from its init's /proc/PID/cgroup (one
    engine call), the same for both engines and cgroup drivers."""
    if engine.name == "podman" and not engine.rootless:
        known = f"{_PODMAN_CGROUPFS_PARENT}/libpod-{container_id}"
        for root in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
            if os.path.isdir(root + known):
                return known
    done = engine.run("inspect", "--format", "{{.State.Pid}}", container_id, check=False)
    try:
        lines = Path(f"/proc/{int(done.stdout.decode().strip())}/cgroup").read_text()
    except (OSError, ValueError):
        return None
    return cgroup_in(lines.splitlines())


def cgroup_in(lines: Sequence[str]) -> str | None:
    """The memory cgroup in /proc/PID/cgroup's lines: v1's memory controller, else v2's."""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return None


def _cwd(record: EnvRecord, requested: str | None) -> str:
    env_path = os.path.realpath(record.path)

    def inside(path: str) -> bool:
        path = os.path.normpath(path)
        return path == env_path or path.startswith(env_path + "/")

    if requested is None:
        here = os.getcwd()
        return here if inside(here) else env_path
    cwd = os.path.abspath(requested)
    if not inside(os.path.realpath(cwd)):
        raise ValidationError(
            f"working directory {cwd} does not exist inside environment {record.name!r} "
            "(container isolation: its root is its image; of the host, only the env's own dir "
            f"{record.path} is there): pass a cwd inside the env's dir")
    return cwd


async def run(record: EnvRecord, command: CommandSpec) -> ExecResult:
    """One command of the env, ``exec``'d into its container and waited for."""
    facts = of(record)
    assert facts is not None
    engine = engine_of(record)
    exec_id = uuid.uuid4().hex
    # podman passes the status pipe on (--preserve-fds); docker cannot: the init's own exit
    # status and its stderr are the report there (bwrap.INIT).
    status = StatusPipe() if engine.name == "podman" else None
    try:
        argv, values = await asyncio.to_thread(_exec_argv, record, engine, command, exec_id,
                                               status.writer if status is not None else -1)
    except BaseException:
        if status is not None:
            status.close()
        raise
    oom = await asyncio.to_thread(_oom_watch, facts.get("oom_cgroup") or "")
    try:
        try:
            # The engine's client carries the env's marker: whatever ends the env (its reaper,
            # a destroy) ends it too, should its creator die while it waits on the container.
            result = await run_process(record, command, argv, exec_id=exec_id, cwd="/",
                                       status=status, environ={**engine.env(), **values,
                                                               processes.ENV_MARKER: record.id},
                                       wrapped=True)
            if status is None:
                result = _reported(result, command.argv[0])
        except (CommandNotFoundError, CommandNotExecutableError) as exc:
            raise type(exc)(
                f"{exc} (inside the container of environment {record.name!r}: its root is "
                "its image, the interpreter and /bin/sh; of the host, only the env's dir)"
            ) from None
        fired = oom.fired() if oom is not None else False
    finally:
        if oom is not None:
            oom.close()
    reported = status is not None and status.reported
    if not reported and _gone(result.stderr) and not await asyncio.to_thread(
            _running, engine, facts.get("id") or facts["name"]):
        raise EnvironmentClosedError(
            f"environment {record.name!r} has ended: its container {facts['name']} is no "
            "longer running (TTL, idle timeout, its creator exited, or it was stopped)")
    if result.killed_by is None and fired and (
            result.returncode == -9 or (not reported and result.returncode == 137)):
        # (Killed before it could report, the status reporter itself maybe: 137 from exec.)
        result = replace(result, returncode=-9, killed_by="memory", oom_killed=True)
    elif fired:
        # A process of its tree was OOM-killed, not the command itself (a build's backend
        # under uv, which then fails): said, as the systemd runtime says it of a unit.
        result = replace(result, oom_killed=True)
    return result


def _running(engine: engines.Engine, container: str) -> bool:
    done = engine.run("inspect", "--format", "{{.State.Running}}", container, check=False)
    return done.returncode == 0 and done.stdout.decode().strip() == "true"


def _reported(result: ExecResult, program: str) -> ExecResult:
    """Without a status channel (docker): the init's exit status (128+N for a signal N) and
    its stderr line for a program it could not start."""
    code = result.returncode
    if code == 127 and (line := _exec_failure(result.stderr)) is not None:
        errno_ = int(line.partition("[Errno ")[2].partition("]")[0] or errno.ENOENT)
        error = CommandNotFoundError if errno_ == errno.ENOENT else CommandNotExecutableError
        raise error(f"cannot run {program}: {os.strerror(errno_)}")
    if 128 < code <= 128 + 64:
        return replace(result, returncode=128 - code)
    return result


def _exec_failure(stderr: str) -> str | None:
    lines = stderr.rstrip("\n").splitlines()
    return lines[-1] if lines and lines[-1].startswith(EXEC_FAILED) else None


def _exec_argv(record: EnvRecord, engine: engines.Engine, command: CommandSpec, exec_id: str,
               status_fd: int) -> tuple[list[str], dict[str, str]]:
    """``[bash FD3] podman exec ... CONTAINER python INIT 3|-1 "" PROGRAM ARGV``, and the
    variables the engine's CLI must have to pass them on by name."""
    facts = of(record)
    assert facts is not None
    cwd = _cwd(record, command.cwd)
    own = cplan.command_environ(command.environ, os.environ, os.path.realpath(record.path),
                                command.passed)
    own[processes.EXEC_MARKER] = exec_id
    channel = status_fd >= 0
    inner = [record.interpreter, "-I", "-S", "-B", "-c", INIT, "3" if channel else "-1", "",
             command.argv[0], *command.argv]
    interactive = command.input is not None or not command.capture
    tty = not command.capture and os.isatty(0)
    args = cplan.exec_args(facts["name"], environ=own, cwd=cwd, argv=inner,
                           interactive=interactive, tty=tty, user=facts.get("user") or None,
                           preserve_fds=1 if channel else 0)
    return [*(_fd3(status_fd) if channel else []), *engine.argv(*args)], \
        cplan.split_environ(own)[1]


@functools.cache
def _bash() -> str | None:
    return shutil.which("bash")


def _fd3(fd: int) -> list[str]:
    bash = _bash()
    if bash is not None:
        return [bash, "-c", _FD3_BASH, str(fd)]
    return [sys.executable, "-I", "-S", "-c", _FD3_PYTHON, str(fd)]


def _gone(stderr: str) -> bool:
    text = stderr.lower()
    return any(s in text for s in _NO_SUCH)


def _oom_watch(cgroup: str) -> OomWatch | None:
    return OomWatch(cgroup) if cgroup else None


async def stop(record: EnvRecord) -> None:
    """Kill and remove the env's container: by its id (one engine call); by its label if it
    has none yet (a create undone half-way). Idempotent; the reaper and the sweep find any
    other by its label."""
    facts = of(record)
    if facts is None:
        return
    try:
        engine = engine_of(record)
    except RuntimeUnavailableError:
        return  # (a state file naming no engine: its reaper and the sweep find it by label)
    if facts.get("id"):
        await asyncio.to_thread(engines.remove_containers, engine, [facts["id"]])
    else:
        await asyncio.to_thread(remove_of, engine, record.id)


def remove_of(engine: engines.Engine, env_id: str) -> int:
    try:
        found = engine.ours(env_id=env_id)
    except engines.EngineError:
        return 0
    engines.remove_containers(engine, [c["id"] for c in found])
    return len(found)


def with_packages_image(record: EnvRecord, engine: engines.Engine, key: str,
                        template: Path) -> EnvRecord:
    """The record with the image of its package set: its base image and a layer of the set's
    snapshot, made by the first env of the set and reused by the others (``images save``
    takes it elsewhere). A failure costs the env nothing but that image, and says so."""
    facts = dict(of(record) or {})
    try:
        base = facts.get("image") or _locked(images.base_ref(record.interpreter),
                                             images.ensure_base, engine, record.interpreter)
        facts["packages_image"] = _locked(images.packages_ref(key), images.ensure_packages,
                                          engine, base, key, template, record.interpreter)
    except engines.EngineError as exc:
        return record.evolve(container=facts, notes=[
            *record.notes, f"the image of its package set could not be made: {exc}"])
    return record.evolve(container=facts)


def sweep(config: Config) -> list[str]:
    """gestvenv's containers of this user whose env is gone (their state file is missing or
    now names another env: the rule of :meth:`UnitView.orphaned`), killed and removed; then
    the images of this config's package sets no longer snapshotted (bases stay: they are
    the interpreter's, remade in seconds only when it changes; ``images prune`` removes
    them). Only what carries gestvenv's labels is touched. What it removed, said."""
    if not used_mark(config).exists():
        return []  # (this user never made a container env: no engine to ask, no cost)
    engine, _ = engines.find(config.container_engine, conf_dir())
    if engine is None:
        return []
    try:
        found = engine.ours(owner=os.geteuid())
    except engines.EngineError:
        return []
    gone = [c for c in found if UnitView(
        state=c["state"], env_id=c.get(f"label:{engines.LABEL_ID}"),
        state_file=c.get(f"label:{engines.LABEL_STATE}")).orphaned()]
    engines.remove_containers(engine, [c["id"] for c in gone])
    out = [f"container {c['name']} (its environment is gone)" for c in gone]
    with contextlib.suppress(engines.EngineError):
        out += [f"image {ref}" for ref in images.prune(
            engine, live_template_keys(config), bases=False,
            snapshots=str(storage.templates_dir(config)))]
    return out


def used_mark(config: Config) -> Path:
    """Made when this user's first container env is: from then on, sweeps ask the engine for
    containers left behind (it survives reboots, as the engine's records do)."""
    return storage.cache_base(config) / "containers-used"


def mark_used(config: Config) -> None:
    mark = used_mark(config)
    if not mark.exists():
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()


def engine_for(requested: str) -> engines.Engine:
    """The engine of config ``container_engine``, or :class:`RuntimeUnavailableError` with
    why not (``images``)."""
    engine, why = engines.find(requested, conf_dir())
    if engine is None:
        raise RuntimeUnavailableError(f"no container engine: {why}")
    return engine


def live_template_keys(config: Config) -> set[str]:
    """The package sets still snapshotted: their images are kept."""
    return TemplateCache(storage.templates_dir(config), config.template_ttl).live_keys()
