"""The systemd runtime: every environment a set of transient units, limits held by the kernel.

The plan (``plan.py``) decides the properties; the façade (``bus.py``) talks to the manager; this
module is the sequence: start the env's units, run a command as a unit of its own with its
stdio passed as file descriptors (as ``systemd-run --pipe`` does), read its end from systemd.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import os
import sys
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from ... import diskcap, sandbox
from ...config import Config
from ...container import plan as cplan
from ...exceptions import (
    CommandNotExecutableError,
    CommandNotFoundError,
    EnvironmentClosedError,
    EnvironmentExistsError,
    GestvenvError,
    RuntimeUnavailableError,
    SystemdError,
    ValidationError,
)
from ...models import Enforcement, ExecResult, IsolationLevel, ResourceLimits
from ...names import POOL_PREFIX
from ...registry import EnvRecord, lock_path, state_path
from ...shield import protected, shielded
from .. import container
from ..base import CommandSpec, Runtime, Usage, streamed
from ..unitview import UnitView
from . import cgroups, plan, pool, units
from .booted import systemd_booted
from .bus import (
    SERVICE,
    UNIT,
    NoSuchUnit,
    SystemdBus,
    connection,
    unit_path,
    variants,
)
from .plan import Capabilities, Property, UnitNames
from .units import use_user_manager

PIPE_GRACE = 1.0
# The env unit's process and its stop action (stdlib only, run as files).
_HOLDER = str(Path(__file__).resolve().parents[2] / "holder.py")
_REAPER = str(Path(__file__).resolve().parents[2] / "reaper.py")

# systemd's exit statuses for a command that could not be started (systemd.exec(5)).
EXIT_EXEC, EXIT_CHDIR = 203, 200


async def live_units(known: Mapping[str, str] | None = None) -> dict[str, UnitView] | None:
    """The env units of this user's manager, or None when there is no systemd to ask (not
    booted, unreachable): then the state files are all there is to go by. ``known``: the
    caller's envs (name -> id, from the state files it has read): their units are told apart
    in one D-Bus call for all (see :meth:`SystemdRuntime.live_environments`)."""
    if not systemd_booted():
        return None
    from .. import runtime_named

    try:
        return await runtime_named("systemd").live_environments(known)
    except GestvenvError:
        return None


class SystemdRuntime(Runtime):
    name = "systemd"
    # Units of commands that share our terminal (capture=False), per manager: they are not in
    # our terminal's process group, so its Ctrl-C reaches them through signal_foreground().
    _foreground: ClassVar[set[tuple[bool, str]]] = set()
    # Commands of one env running at once in this process: an OOM kill seen on the env's slice
    # cannot be pinned on one of them.
    _running: ClassVar[dict[str, set[str]]] = {}
    _overlapped: ClassVar[set[str]] = set()

    # What each manager (key: a user manager?) can enforce and its own cgroup, probed once per
    # process: every runtime object, event loop and environment of the process shares it.
    _probed: ClassVar[dict[bool, tuple[Capabilities, str]]] = {}
    _probing: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]] = \
        weakref.WeakKeyDictionary()

    def __init__(self, max_total_memory_mb: int | None = None) -> None:
        self.user = use_user_manager()
        self.max_total_memory_mb = max_total_memory_mb
        self._caps: Capabilities | None = None
        self._root_cgroup = ""  # the manager's own cgroup: "" for the system manager

    # -- setup --------------------------------------------------------------------------------

    async def _bus(self) -> SystemdBus:
        if not systemd_booted():
            raise RuntimeUnavailableError(
                "the systemd runtime needs systemd as PID 1 (no /run/systemd/system here); "
                "use runtime 'local'")
        return await connection(self.user)

    async def prepare(self) -> None:
        """Connect (once per event loop) and probe the manager (once per process)."""
        bus = await self._bus()
        if self._caps is not None:
            return
        probed = self._probed.get(self.user)
        if probed is None:
            lock = self._probing.setdefault(asyncio.get_running_loop(), asyncio.Lock())
            async with lock:  # (50 envs created at once probe once)
                probed = self._probed.get(self.user)
                if probed is None:
                    probed = self._probed[self.user] = await self._probe(bus)
        self._caps, self._root_cgroup = probed

    async def _probe(self, bus: SystemdBus) -> tuple[Capabilities, str]:
        root_cgroup = ""
        if self.user:
            root = str(await bus.manager_property("ControlGroup"))
            root_cgroup = root.rstrip("/")
            controllers = await asyncio.to_thread(cgroups.delegated_controllers, root)
        else:
            controllers = await asyncio.to_thread(cgroups.system_controllers)
        caps = Capabilities(
            user=self.user, controllers=controllers, cgroup_v2=cgroups.is_v2(),
            bpf_firewall=not self.user,
            user_namespaces=await asyncio.to_thread(cgroups.user_namespaces_allowed),
            swap_uncapped=not cgroups.is_v2() and await asyncio.to_thread(cgroups.swap_active),
            version=plan.systemd_version(str(await bus.manager_property("Version"))))
        return caps, root_cgroup

    @classmethod
    def forget_probes(cls) -> None:
        """Probe again at the next prepare() (tests)."""
        cls._probed.clear()

    @property
    def capabilities(self) -> Capabilities:
        if self._caps is None:
            raise RuntimeError("SystemdRuntime.prepare() was not awaited")
        return self._caps

    def plan(self, limits: ResourceLimits, isolation: IsolationLevel) -> Enforcement:
        return plan.enforcement(limits, isolation, self.capabilities)

    def _sandbox(self, record: EnvRecord) -> list[Property]:
        return plan.sandbox_properties(sandbox_spec(record), self.capabilities)

    # -- the environment ----------------------------------------------------------------------

    async def _ensure_parent_slice(self, bus: SystemdBus, max_total_memory_mb: int | None) -> None:
        settled = f"{plan.PARENT_SLICE}:{max_total_memory_mb}"
        if settled in bus.settled:
            return  # once per connection: later envs cost one StartTransientUnit each
        # Envs created at once wait for the first one's check (50 at once made 50).
        pending = bus.settling.get(settled)
        if pending is None:
            pending = bus.settling[settled] = asyncio.ensure_future(
                self._set_up_parent_slice(bus, max_total_memory_mb))

            def done(task: asyncio.Future[None]) -> None:
                bus.settling.pop(settled, None)
                if not task.cancelled():
                    task.exception()  # (retrieved: its waiters may all be gone)
            pending.add_done_callback(done)
        await asyncio.shield(pending)
        bus.settled.add(settled)

    async def _set_up_parent_slice(self, bus: SystemdBus, max_total_memory_mb: int | None) -> None:
        props = plan.parent_slice_properties(max_total_memory_mb, self.capabilities)
        # Loaded, not looked up: a distro package's gestvenv.slice is a unit file that nothing
        # may have started yet (GetUnit knows only units in memory).
        current = await bus.properties(plan.PARENT_SLICE, UNIT, load=True)
        if current.get("LoadState") != "loaded" or \
                current.get("ActiveState") not in ("active", "activating"):
            try:
                await bus.start_transient_unit(plan.PARENT_SLICE, props)
                return
            except SystemdError as exc:
                if "UnitExists" not in exc.dbus_name:
                    raise
        # Loaded already (a unit file, or an earlier transient slice): the caps are the
        # config's, set at runtime (a drop-in under /run, gone at reboot).
        wanted = {k: v for k, _, v in props if k == "MemoryMax"}
        if wanted:
            slice_props = await bus.properties(plan.PARENT_SLICE, "org.freedesktop.systemd1.Slice",
                                               load=True)
            if slice_props.get("MemoryMax") != wanted["MemoryMax"]:
                await bus.call(
                    "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
                    "SetUnitProperties", "sba(sv)",
                    [plan.PARENT_SLICE, True, variants(p for p in props if p[0] == "MemoryMax")],
                    what="setting gestvenv.slice's MemoryMax")

    async def start(self, record: EnvRecord) -> None:
        bus = await self._bus()
        await self.prepare()
        caps = self.capabilities
        names = UnitNames.of(record.stem)
        limits = ResourceLimits.from_dict(record.limits)
        if container.of(record) is not None and limits.max_processes is not None:
            # conmon and runc run in the slice too: the container holds max_processes
            # itself (--pids-limit); the slice leaves room (container.plan.SLICE_TASKS).
            limits = replace(limits, max_processes=limits.max_processes + cplan.SLICE_TASKS)
        await self._ensure_parent_slice(bus, self.max_total_memory_mb)
        sandbox = self._sandbox(record)
        holder = plan.HolderArgs(
            python=_python(), script=_HOLDER,
            state_file=str(state_path(record.name)), env_id=record.id,
            owner_pid=record.owner_pid, owner_start=record.owner_started,
            idle_timeout=record.idle_timeout, reaper=_REAPER, env_path=record.path,
            registry_lock=str(lock_path()),
            environ=tuple(f"{k}={v}" for k, v in container.reaper_environ(record).items()),
            expires_at=record.expires_at if record.max_ttl else None)
        description = f"python {record.python_version}, {record.backend} storage, {record.path}"
        # An extendable TTL: RuntimeMaxSec is max_ttl, systemd's backstop (gestvenv.ttl).
        env_props = plan.env_properties(names, record.name, description,
                                        record.max_ttl or record.ttl, holder, sandbox)
        slice_props = plan.slice_properties(names, record.name, limits, caps)
        try:
            result = await bus.start_transient_unit(names.env, env_props,
                                                    aux=[(names.slice, slice_props)])
        except SystemdError as exc:
            if "UnitExists" not in exc.dbus_name:
                raise
            # A unit of this name is loaded. A former env's (stopping, or left by a crash)
            # goes: our registry reserved the name. A live env of another registry (another
            # runtime dir of this user, on the same manager) keeps it.
            view = await self._view(bus, names.env)
            if view is not None and view.env_id != record.id and view.state in \
                    plan.LIVE_UNIT_STATES and not await asyncio.to_thread(view.orphaned):
                raise EnvironmentExistsError(
                    f"environment name {record.name!r} is in use on this systemd manager by "
                    f"another gestvenv registry (state file {view.state_file}); "
                    f"unit {names.env}") from None
            await self._stop_units(bus, names)
            result = await bus.start_transient_unit(names.env, env_props,
                                                    aux=[(names.slice, slice_props)])
        if result != "done":
            raise SystemdError(f"systemd could not start {names.env} (job {result}); see "
                               f"`journalctl -u {names.env}`", "job-" + result)

    async def start_container(self, record: EnvRecord) -> EnvRecord:
        """The env's container, in its slice: the slice's limits hold it, its end ends it.
        (docker's daemon places its containers itself: the engine holds the limits.)"""
        if not container.in_slice(record):
            return await container.start(record)
        names = UnitNames.of(record.stem)
        return await container.start(
            record, cgroup_parent=names.slice,
            oom_cgroup=f"{self._root_cgroup}/{plan.PARENT_SLICE}/{names.slice}")

    async def _stop_units(self, bus: SystemdBus, names: UnitNames) -> None:
        for unit in (names.env, names.slice):
            await bus.stop_unit(unit)
            await bus.reset_failed(unit)

    async def stop(self, record: EnvRecord) -> None:
        await self.stop_units_of(record.stem, record.id)

    async def stop_units_of(self, stem: str, env_id: str | None = None) -> None:
        """Stop the units of an env whose units run under ``stem`` (its name, or its pool
        unit's); with ``env_id``, only if they are that env's (a create that lost the race
        for a name must not stop the winner's)."""
        if not systemd_booted():
            return  # nothing of systemd's can be left on a host it does not run
        bus = await self._bus()
        names = UnitNames.of(stem)
        # Its slice and commands end with its own unit (BindsTo=, StopWhenUnneeded=): a unit
        # that is gone, or another env's, leaves nothing of this env to stop.
        if env_id is not None:
            owner = await self._owner(bus, names.env)
            if owner is None or owner[1] != env_id:
                return
            # Its commands stop first (After=); nothing to reset: the units are collected when
            # inactive or failed. Its slice would stop once unneeded, but systemd 252 does not
            # always notice at once (seen under load in CI): stopped here, once the env unit's
            # stop action (which reads the slice's figures) is done, so that nothing of the env
            # is left when destroy returns.
            await bus.stop_unit(names.env)
            await bus.stop_unit(names.slice)
            return
        await self._stop_units(bus, names)

    async def _view(self, bus: SystemdBus, unit: str, state: str | None = None,
                    path: str | None = None) -> UnitView | None:
        """An env unit as its manager sees it, in small reads (a service's GetAll is ~200
        values); None if it is not loaded. ``path``: its object path, from a listing of loaded
        units (then no GetUnit)."""
        try:
            if path is None:
                path = await bus.get_unit(unit)
            environment = await bus.get(path, SERVICE, "Environment")
            if state is None:
                state = str(await bus.get(path, UNIT, "ActiveState"))
        except NoSuchUnit:
            return None
        variables = dict(e.split("=", 1) for e in environment or [] if "=" in e)
        return UnitView(state=state, env_id=variables.get(plan.UNIT_ENV_ID),
                        state_file=variables.get(plan.UNIT_STATE_FILE))

    async def _owner(self, bus: SystemdBus, unit: str) -> tuple[str, str | None] | None:
        """(ActiveState, env id) of a loaded env unit, None if it is not loaded: one call
        (ListUnitsByPatterns of its name, whose row has its Description, which ends with the
        env's id), or three for a unit started by an older gestvenv (its Environment)."""
        row = next((r for r in await bus.list_units([unit]) if r.name == unit), None)
        if row is None:
            return None
        env_id = plan.env_id_of_description(row.description)
        if env_id is not None:
            return row.active_state, env_id
        view = await self._view(bus, unit, row.active_state, row.path)
        return None if view is None else (view.state, view.env_id)

    async def live_environments(self, known: Mapping[str, str] | None = None
                                ) -> dict[str, UnitView]:
        """Every env unit of this manager, in one ListUnitsByPatterns: a unit whose Description
        names the env ``known`` has under its name (name -> id: the caller's registry) is
        that env's, its state file the registry's own. Only the others (another registry's,
        orphans, units of an older gestvenv) are read one by one, all at once, for the state
        file their Environment names."""
        bus = await self._bus()
        out, unread = units.views(await bus.list_units([units.ENV_UNITS]), known)
        views = await asyncio.gather(*(self._view(bus, unit.name, unit.active_state, unit.path)
                                       for _, unit in unread))
        for (name, _), view in zip(unread, views, strict=True):
            if view is not None:
                out[name] = view
        return out

    # -- the pool (see pool.py) ------------------------------------------------------------

    def pool_key(self, record: EnvRecord) -> str:
        """What a pool unit serving ``record`` must have been started with (plan.pool_key)."""
        spec = sandbox_spec(record.evolve(path=plan.POOL_PATH))
        return plan.pool_key(interpreter=record.interpreter, backend=record.backend,
                             root=str(Path(record.path).parent), user=self.user,
                             sandbox=plan.sandbox_properties(spec, self.capabilities))

    async def pool_units(self) -> dict[str, str]:
        """The running pool units of this manager: stem -> env id (one call)."""
        bus = await self._bus()
        out = {}
        for row in await bus.list_units([f"gestvenv-{POOL_PREFIX}*.service"]):
            stem = plan.env_name_of_unit(row.name)
            env_id = plan.env_id_of_description(row.description)
            if stem and env_id and row.active_state in plan.LIVE_UNIT_STATES:
                out[stem] = env_id
        return out

    async def start_pool_unit(self, entry: pool.PoolEntry, template: EnvRecord,
                              config: Config) -> None:
        """Start an unclaimed pool unit like ``template``'s env unit would be (same key), with
        no limit on its slice yet, its holder waiting for a claim in its pool file."""
        bus = await self._bus()
        await self.prepare()
        names = UnitNames.of(entry.stem)
        await self._ensure_parent_slice(bus, self.max_total_memory_mb)
        record = template.evolve(name=entry.stem, id=entry.id, path=entry.path)
        holder = plan.HolderArgs(
            python=_python(), script=_HOLDER, state_file=entry.file, env_id=entry.id,
            reaper=_REAPER, env_path=entry.path, registry_lock=str(lock_path()), pool=True)
        env_props = plan.env_properties(
            names, entry.stem, f"{entry.description}, {entry.path}", pool.backstop(config),
            holder, self._sandbox(record))
        # (Its Description says it waits: systemctl shows pool units as such.)
        env_props = [p if p[0] != "Description" else plan.prop(
            "Description", plan.pool_description(entry.stem, f"{entry.description}, "
                                                 f"{entry.path}", entry.id)) for p in env_props]
        slice_props = plan.slice_properties(names, entry.stem, ResourceLimits(), self.capabilities)
        slice_props = [p if p[0] != "Description" else plan.prop(
            "Description", f"gestvenv pool unit {entry.stem}, unclaimed: all its processes")
            for p in slice_props]
        result = await bus.start_transient_unit(names.env, env_props,
                                                aux=[(names.slice, slice_props)])
        if result != "done":
            raise SystemdError(f"systemd could not start {names.env} (job {result})",
                               "job-" + result)

    async def adopt(self, record: EnvRecord) -> None:
        """Make the pool unit ``record`` claimed its env's: its limits on its slice and its
        name in the Descriptions, set live (SetUnitProperties); the holder has read (or soon
        reads) the claim. Raises :class:`pool.PoolUnitGone` if the unit is not running."""
        bus = await self._bus()
        await self.prepare()
        names = UnitNames.of(record.stem)
        limits = ResourceLimits.from_dict(record.limits)
        described = plan.claimed_description(
            record.name, record.stem,
            f"python {record.python_version}, {record.backend} storage, {record.path}",
            record.id)
        outcomes = await asyncio.gather(
            self._owner(bus, names.env),
            bus.set_unit_properties(names.slice, plan.live_slice_properties(
                names, record.name, limits, self.capabilities)),
            bus.set_unit_properties(names.env, [plan.prop("Description", described)]),
            return_exceptions=True)
        owner = outcomes[0]
        if isinstance(owner, BaseException) or owner is None or owner[1] != record.id \
                or owner[0] not in ("active", "activating"):
            raise pool.PoolUnitGone(f"{names.env} is not running")
        for outcome in outcomes[1:]:
            if isinstance(outcome, NoSuchUnit):
                raise pool.PoolUnitGone(f"{names.env} is not running")
            if isinstance(outcome, BaseException):
                raise outcome

    def guarantees(self, record: EnvRecord | None = None) -> Sequence[str]:
        if record is not None and record.max_ttl:
            return (
                "systemd runtime (an extendable TTL, max_ttl): the limits are its slice's "
                "cgroup settings, enforced by systemd and the kernel whatever happens to "
                "gestvenv's processes; the TTL is held by the env unit's process (gestvenv's "
                "holder, exact, following extensions): were that process stopped, the env "
                f"would end at its unit's RuntimeMaxSec, {record.max_ttl} s from its start, "
                "and each command at the same time",
                *self.guarantees(None)[1:])
        ttl = ("systemd runtime (a pooled env): the limits are its slice's cgroup settings, "
               "enforced by systemd and the kernel whatever happens to gestvenv's processes; "
               "each command's RuntimeMaxSec ends it at the TTL, and the unit's process "
               "(gestvenv's holder) ends the env then: if that process were stopped, the env's "
               "files would wait for the pool unit's own RuntimeMaxSec (see its notes)"
               ) if record is not None and record.pooled else (
               "systemd runtime: the TTL is the env unit's RuntimeMaxSec and the limits are its "
               "slice's cgroup settings, enforced by systemd and the kernel whatever happens to "
               "gestvenv's processes")
        return (
            ttl,
            "systemd runtime: when the env's unit stops, for whatever reason, its processes end "
            "and its stop action (gestvenv's reaper) deletes its files and state; what a crash "
            "or power loss leaves is removed by gestvenv-cleanup.timer (also at boot)",
        )

    async def usage(self, record: EnvRecord) -> Usage:
        bus = await self._bus()
        names = UnitNames.of(record.stem)
        try:
            slice_props = await bus.properties(names.slice, "org.freedesktop.systemd1.Slice")
        except NoSuchUnit:
            return Usage(processes=0, memory_bytes=0, cpu_seconds=0.0, disk_bytes=0)
        cgroup = str(slice_props.get("ControlGroup") or "")
        memory = _counter(slice_props.get("MemoryCurrent"))
        cpu = _counter(slice_props.get("CPUUsageNSec")) / 1e9
        # MemoryPeak exists from systemd 256; on 252 (and a hybrid host) it is the kernel's
        # high-water mark of the slice's cgroup.
        peak = _counter(slice_props.get("MemoryPeak")) or None

        def from_files() -> tuple[float | None, int | None, int]:
            return (None if cpu else cgroups.cpu_seconds(cgroup),
                    peak or cgroups.memory_peak(cgroup), len(cgroups.pids(cgroup)))

        procs = 0
        if cgroup:
            measured, peak, procs = await asyncio.to_thread(from_files)
            cpu = cpu or measured or 0.0  # CPUUsageNSec is unset on a hybrid host
        return Usage(processes=procs, memory_bytes=memory, cpu_seconds=cpu, disk_bytes=0,
                     memory_peak_bytes=peak,
                     memory_peak_source="cgroup" if peak is not None else None)

    # -- commands -----------------------------------------------------------------------------

    async def run(self, record: EnvRecord, command: CommandSpec) -> ExecResult:
        if container.of(record) is not None:
            # exec'd into the env's container, which is in the env's slice: its limits hold.
            return await container.run(record, command)
        bus = await self._bus()
        await self.prepare()
        names = UnitNames.of(record.stem)
        unit = names.command(uuid.uuid4().hex[:12])
        spec = sandbox_spec(record)
        # What the command sees of the host (None: all of it, below namespace isolation).
        seen = functools.partial(sandbox.visible, env_path=spec.env_path, hide=spec.hide,
                                 expose=spec.expose) if spec.level.sandboxed else None
        cwd = os.getcwd()
        if seen is not None:
            cwd = sandbox.command_cwd(command.cwd, cwd, record.path, seen)
        elif command.cwd:
            cwd = os.path.join(cwd, command.cwd)  # systemd wants it absolute
        _check_utf8(command.argv, cwd)
        pipes = _Pipes(command)
        try:
            # systemd wants an absolute program path; the program still sees argv[0] as given.
            program = os.path.join(cwd, command.argv[0])
            if seen is not None:
                _check_visible(record, seen, cwd, program)
            argv = list(command.argv)
            if record.sandbox_uid is not None:
                # Dropped to the env's own uid by setpriv, after systemd has set up the
                # namespaces (which needs root): argv[0] becomes the program's path.
                argv = [*plan.setpriv_argv(record.sandbox_uid), program, *argv[1:]]
                program = plan.SETPRIV
            end = plan.command_end(record.expires_at, record.pooled,
                                   record.created_at + record.max_ttl if record.max_ttl
                                   else None)
            limit = plan.command_time_limit(command.timeout, end, time.time())
            props = plan.command_properties(names, record.name, argv, command.environ,
                                            cwd, limit,
                                            plan.sandbox_properties(spec, self.capabilities),
                                            pipes.indexes, program=program)
            return await self._run_unit(bus, record, unit, props, pipes, command,
                                        self._may_run(bus, record, command.argv[0], cwd))
        finally:
            pipes.close()

    @classmethod
    async def signal_foreground(cls, signum: int) -> None:
        """Send ``signum`` to the processes of every command sharing our terminal."""
        for user, unit in list(cls._foreground):
            bus = await connection(user)
            await bus.kill_unit(unit, signum)

    async def _may_run(self, bus: SystemdBus, record: EnvRecord, program: str,
                       cwd: str) -> None:
        """Raise if the command cannot run in the env: a script whose interpreter is missing,
        or an env whose unit is gone. The name may have passed to another env since this
        handle was made (ours ended, another registry's took the name): a command must never
        join someone else's env. (Both at once: one round trip.)"""
        names = UnitNames.of(record.stem)
        checked, unit_owner = await asyncio.gather(
            asyncio.to_thread(_check_interpreter, program, cwd),
            self._owner(bus, names.env), return_exceptions=True)
        for outcome in (checked, unit_owner):
            if isinstance(outcome, BaseException):
                raise outcome
        assert not isinstance(unit_owner, BaseException)
        owner = unit_owner[1] if unit_owner is not None \
            and unit_owner[0] in plan.LIVE_UNIT_STATES else None
        if owner != record.id:
            raise EnvironmentClosedError(
                f"environment {record.name!r} has ended: its unit {names.env} is "
                + ("no longer running (TTL, idle timeout, its creator exited, or it was "
                   "stopped)" if owner is None else "now another environment's"))

    async def _run_unit(self, bus: SystemdBus, record: EnvRecord, unit: str,
                        props: list[Property], pipes: _Pipes,
                        command: CommandSpec, may_run: Awaitable[None]) -> ExecResult:
        changed = asyncio.Event()
        slice_cgroup = f"{self._root_cgroup}/{plan.PARENT_SLICE}/{UnitNames.of(record.stem).slice}"
        keeps_figures = plan.unit_keeps_figures(self.capabilities)
        meter: cgroups.Meter | None = None
        figures: tuple[int | None, float | None] = (None, None)
        unwatch: Callable[[], Coroutine[Any, Any, None]] | None = None
        oom: cgroups.OomWatch | None = None
        oom_fired = False
        started = time.monotonic()
        chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        pumps: list[asyncio.Future[Any]] = []
        foreground = (self.user, unit)
        if not command.capture:
            self._foreground.add(foreground)
        running = self._running.setdefault(record.id, set())
        if running:
            self._overlapped.update(running | {unit})
        running.add(unit)
        signals = UnitSignals(changed)
        armed = False
        try:
            # Watched before it starts, so that no change is missed (asked while the checks
            # run); the OOM watch is opened before too, so that an OOM kill in the first
            # instant is seen, once the env is known to be ours (the meter resets a figure of
            # the slice). (Cgroup files, in memory: read here, not in a thread.)
            # (systemd < 256: its figures are measured on the env's slice around it.)
            watching, allowed = await asyncio.gather(bus.watch(unit, signals.update), may_run,
                                                     return_exceptions=True)
            if not isinstance(watching, BaseException):
                unwatch = watching
            for outcome in (allowed, watching):
                if isinstance(outcome, BaseException):
                    raise outcome
            oom, meter = _watch_slice(slice_cgroup, not keeps_figures)
            try:
                result = await bus.start_transient_unit(unit, props, unix_fds=pipes.passed)
                if result in ("dependency", "canceled"):  # its env unit could not start
                    raise NoSuchUnit(result)
            except NoSuchUnit:  # BindsTo= names the env's unit: it is gone
                raise EnvironmentClosedError(
                    f"environment {record.name!r} has ended: its unit "
                    f"{UnitNames.of(record.stem).env} is no longer running (TTL, idle timeout, "
                    "its creator exited, or it was stopped)") from None
            pipes.close_passed()  # systemd has its copies: EOF comes when the command ends
            pumps = [asyncio.ensure_future(_pump(name, fd, chunks, command))
                     for name, fd in pipes.readers.items()]
            if pipes.writer is not None:
                pumps.append(asyncio.ensure_future(_feed(pipes.take_writer(),
                                                         command.input or b"")))
            if result != "done":
                await _raise_if_not_started(bus, unit, result, command.argv[0])
            if command.handle is not None:  # (its signals: to every process of its unit)
                command.handle._arm(functools.partial(bus.kill_unit, unit))
                armed = True
            # Its end, from its signals (its exit status comes with them); a signal missed (a
            # manager re-executing itself) costs a second, then it is asked.
            while signals.final is None:
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)
                    continue
                try:  # loaded for sure: AddRef=yes holds it until we unref it
                    state = await bus.get(unit_path(unit), UNIT, "ActiveState")
                except NoSuchUnit:
                    break
                if state in ("inactive", "failed"):
                    break
            final = signals.final
            if final is not None:
                service = dict(final)
                if keeps_figures:
                    service.update(await _props(bus, unit, _FIGURE_PROPS))
            else:
                service = await _exit_props(bus, unit, figures=keeps_figures)
            if meter is not None:
                figures = meter.end()
            elif "MemoryPeak" in service:
                cpu_ns = _counter(service.get("CPUUsageNSec"))
                figures = (_counter(service.get("MemoryPeak")) or None,
                           cpu_ns / 1e9 if cpu_ns else None)
            if pumps:
                # Output ends when the last holder of the pipes exits; a process that escaped
                # the unit is not waited for.
                await asyncio.wait(pumps, timeout=PIPE_GRACE)
        except BaseException:
            # Cancelled (Ctrl-C, a task group, the caller's own timeout): the command does not
            # outlive its caller.
            await shielded(bus.stop_unit(unit))
            raise
        finally:
            if armed and command.handle is not None:
                command.handle._disarm()
            self._foreground.discard(foreground)
            running.discard(unit)
            if not running:
                self._running.pop(record.id, None)
            overlapped = unit in self._overlapped
            self._overlapped.discard(unit)
            for pump in pumps:
                if not pump.done():
                    pump.cancel()
            if oom is not None:
                oom_fired = oom.fired()
                oom.close()
            if meter is not None:
                meter.close()
            # Let go of its unit and its signals: not waited for (the result is read), but
            # done even if we are cancelled, or asyncio.run ends meanwhile (protected tasks are
            # waited for there).
            _in_background(bus.unref(unit))
            if unwatch is not None:
                _in_background(unwatch())
        duration = time.monotonic() - started
        returncode = plan.exit_status(int(service.get("ExecMainCode", 1)),
                                      int(service.get("ExecMainStatus", 0)))
        killed_by = None
        svc_result = service.get("Result")
        if svc_result == "timeout" and command.timeout is not None \
                and duration >= command.timeout - 0.05:
            # (Result=timeout also follows a SIGKILL after the stop timeout, when the TTL or a
            # destroy stopped a command that ignores SIGTERM: not the command's own timeout.)
            killed_by = "timeout"
        elif svc_result == "oom-kill" or (oom_fired and returncode == -9 and not overlapped):
            killed_by = "memory"
        elif returncode < 0 and (ends := await _ends_at(record)) is not None \
                and time.time() >= ends - 0.25:
            killed_by = "ttl"  # stopped with the env's unit at its RuntimeMaxSec
        return ExecResult(argv=command.argv, returncode=returncode,
                          stdout=b"".join(chunks["stdout"]).decode(errors="replace"),
                          stderr=b"".join(chunks["stderr"]).decode(errors="replace"),
                          duration=duration, killed_by=killed_by,
                          oom_killed=svc_result == "oom-kill" or (oom_fired and not overlapped),
                          # (Measured on the env's slice: another command of it running
                          # meanwhile would be counted in. Not said rather than wrong.)
                          peak_memory_bytes=None if overlapped and meter else figures[0],
                          cpu_seconds=None if overlapped and meter else figures[1])


def _watch_slice(cgroup: str, meter: bool) -> tuple[cgroups.OomWatch, cgroups.Meter | None]:
    """The env slice's OOM watch, and a meter of what comes next in it (one thread hop)."""
    return cgroups.OomWatch(cgroup), cgroups.Meter(cgroup) if meter else None


def _in_background(step: Coroutine[Any, Any, None]) -> None:
    """Run ``step`` to its end without waiting for it: a protected task, which no cancel()
    stops and which asyncio.run waits for when the program's main coroutine ends."""
    task = protected(step)
    _BACKGROUND.add(task)

    def done(finished: asyncio.Task[None]) -> None:
        _BACKGROUND.discard(finished)
        if not finished.cancelled():
            finished.exception()  # (unref and unwatch swallow what may go wrong)
    task.add_done_callback(done)


_BACKGROUND: set[asyncio.Task[None]] = set()  # (referenced until done: not collected midway)


def sandbox_spec(record: EnvRecord) -> plan.SandboxSpec:
    """The env's sandbox as its record decided it at creation. (At container isolation the
    container is the sandbox: the env's own unit, its holder, has none.)"""
    contained = container.of(record) is not None
    return plan.SandboxSpec(
        level=IsolationLevel.PROCESS if contained else record.enforcement_record.isolation_applied,
        network=contained or record.resource_limits.network_access, env_path=record.path,
        hide=tuple(record.sandbox_hide), expose=tuple(record.sandbox_expose),
        uid=record.sandbox_uid,
        temp=tuple(diskcap.capped_temp_dirs(record.enforcement_record, record.path).items()),
        shm_mb=diskcap.cap_of(record.enforcement_record))


def _check_visible(record: EnvRecord, seen: Callable[[str], bool], cwd: str,
                   program: str) -> None:
    """A cwd or a program the env's sandbox hides: said plainly, before systemd would fail
    with a bare "cannot change directory" or the command with "no such file"."""
    hidden = ("(namespace isolation hides homes, /tmp, /var/tmp, /dev/shm and gestvenv's dirs "
              f"but the env's own dir {record.path})")
    if not seen(cwd):
        raise ValidationError(
            f"working directory {cwd} is hidden inside environment {record.name!r} {hidden}: "
            "pass a cwd that is visible inside, such as the env's dir")
    if not seen(os.path.normpath(program)):
        raise CommandNotFoundError(
            f"cannot run {program}: it is hidden inside environment {record.name!r} {hidden}")


def _check_utf8(argv: Sequence[str], cwd: str) -> None:
    """systemd takes UTF-8 only: a command line with undecodable bytes cannot be a unit."""
    for text in (*argv, cwd):
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ValidationError(
                f"{text.encode(errors='surrogateescape')!r} is not valid UTF-8; the systemd "
                "runtime can only pass UTF-8 arguments and paths to a unit") from None


def _check_interpreter(program: str, cwd: str) -> None:
    """A script whose "#!" interpreter is missing: "not found", as a shell (and the local
    runtime) would say. systemd reports only a generic exec failure for it."""
    try:
        with open(os.path.join(cwd, program), "rb") as f:
            head = f.read(256)
    except OSError:
        return
    if not head.startswith(b"#!"):
        return
    words = head[2:].split(b"\n", 1)[0].split()
    if words and not os.path.exists(words[0]):
        raise CommandNotFoundError(
            f"cannot run {program}: its interpreter {words[0].decode(errors='replace')} "
            "does not exist")


async def _raise_if_not_started(bus: SystemdBus, unit: str, job: str, program: str) -> None:
    """A start job that did not end "done" may only mean the command was quick to exit
    non-zero; a command that could not be started at all has systemd's own exit status, or no
    process at all (the unit itself was refused)."""
    service = await _service_props(bus, unit)
    status = service.get("ExecMainStatus")
    if status == EXIT_EXEC:
        raise CommandNotExecutableError(f"cannot run {program}: systemd could not execute it")
    if status == EXIT_CHDIR:
        raise CommandNotFoundError(f"cannot change to the working directory of {program}")
    if not service.get("ExecMainStartTimestampMonotonic"):
        raise SystemdError(f"systemd could not start {unit} (job {job}); see "
                           f"`journalctl -u {unit}`", "job-" + job)


async def _service_props(bus: SystemdBus, unit: str) -> dict[str, Any]:
    try:
        return await bus.properties(unit, SERVICE)
    except NoSuchUnit:
        return {}


_EXIT_PROPS = ("Result", "ExecMainCode", "ExecMainStatus")
_FIGURE_PROPS = ("MemoryPeak", "CPUUsageNSec")  # kept after the end from systemd 256


async def _exit_props(bus: SystemdBus, unit: str, *, figures: bool = False) -> dict[str, Any]:
    """How a command's unit ended (and, with ``figures``, its peak memory and CPU time):
    a few small reads at once, not a GetAll of ~200 values."""
    return await _props(bus, unit, _EXIT_PROPS + (_FIGURE_PROPS if figures else ()))


async def _props(bus: SystemdBus, unit: str, names: tuple[str, ...]) -> dict[str, Any]:
    path = unit_path(unit)
    try:
        values = await asyncio.gather(*(bus.get(path, SERVICE, p) for p in names))
    except NoSuchUnit:
        return {}
    return dict(zip(names, values, strict=True))


class UnitSignals:
    """A command unit's end, as its PropertiesChanged signals tell it (no call to ask).

    systemd sends each change of a unit as two signals, its type's interface first (a
    service's Result, ExecMainCode, ExecMainStatus), then the Unit's (ActiveState): "clients
    may rely on this order to get atomic behavior" (src/core/dbus-unit.c). So when the Unit's
    says the unit is inactive or failed and the service's, received just before, say that its
    process has exited (ExecMainCode, CLD_*, is set: the unit is "inactive" when it is made
    too, before it starts), those are its final values: :attr:`final`. None until then; a
    unit that ends without a process that exited (stopped before it ran) is asked instead.
    """

    def __init__(self, changed: asyncio.Event | None = None) -> None:
        self._changed = changed
        self._service: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None

    def update(self, changed: dict[str, Any]) -> None:
        interface = changed.get("__interface__")
        if interface == SERVICE:
            self._service.update({k: v for k, v in changed.items() if k in _EXIT_PROPS})
        elif interface == UNIT and self.final is None \
                and changed.get("ActiveState") in ("inactive", "failed") \
                and all(k in self._service for k in _EXIT_PROPS) \
                and self._service["ExecMainCode"]:
            self.final = dict(self._service)
        if self._changed is not None:
            self._changed.set()


def _counter(value: Any) -> int:
    """systemd's "unset" for a counter is 2**64-1."""
    if value is None or int(value) >= (1 << 64) - 1:
        return 0
    return int(value)


def _python() -> str:
    """The real interpreter, not a venv's link to it (which may sit in a hidden /var/tmp)."""
    return os.path.realpath(sys.executable) if sys.executable else "/usr/bin/python3"


async def _pump(name: str, fd: int, chunks: dict[str, list[bytes]],
                command: CommandSpec) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", buffering=0))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while data := await reader.read(65536):
            command.kept(chunks[name], data)
            if command.stream is not None:
                await streamed(command.stream, name, decoder.decode(data))
        if command.stream is not None and (tail := decoder.decode(b"", final=True)):
            await streamed(command.stream, name, tail)
    finally:
        transport.close()


async def _feed(fd: int, data: bytes) -> None:
    """Write the command's input and close the pipe (its EOF). Owns ``fd``."""
    def write() -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command did not read all its input
        finally:
            os.close(fd)
    await asyncio.to_thread(write)


class _Pipes:
    """A command's stdio: pipes we read (captured) or our own terminal (interactive), as file
    descriptors passed to systemd in the StartTransientUnit message."""

    def __init__(self, command: CommandSpec) -> None:
        self.passed: list[int] = []   # the unit's ends, closed once systemd has its copies
        self.readers: dict[str, int] = {}
        self.writer: int | None = None
        self.indexes: dict[str, int] = {}
        try:
            for stream, own in (("stdout", 1), ("stderr", 2)):
                if command.capture:
                    r, w = os.pipe()
                    self.readers[stream] = r
                    self._pass(stream, w)
                else:
                    self._pass(stream, os.dup(own))
            if command.input is not None:
                r, w = os.pipe()
                self.writer = w
                self._pass("stdin", r)
            elif not command.capture:
                self._pass("stdin", os.dup(0))
        except BaseException:
            self.close()
            raise

    def _pass(self, stream: str, fd: int) -> None:
        self.indexes[stream] = len(self.passed)
        self.passed.append(fd)

    def close_passed(self) -> None:
        for fd in self.passed:
            os.close(fd)
        self.passed = []

    def take_writer(self) -> int:
        assert self.writer is not None
        fd, self.writer = self.writer, None
        return fd

    def close(self) -> None:
        self.close_passed()
        for fd in [*self.readers.values(), *([self.writer] if self.writer is not None else [])]:
            os.close(fd)
        self.readers, self.writer = {}, None


async def _ends_at(record: EnvRecord) -> float | None:
    """The env's end as its state file says now: an extendable TTL may have moved since the
    command started (a caller's signal after an extension is not a TTL kill); the record's
    own otherwise, or if the state is gone."""
    if not record.max_ttl:
        return record.expires_at
    from ... import registry

    current = await asyncio.to_thread(registry.current, record)
    return record.expires_at if current is None else current.expires_at
