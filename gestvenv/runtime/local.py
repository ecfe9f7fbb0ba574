"""The local runtime, for hosts without systemd: a process group per command, rlimits, a watchdog,
and at namespace isolation a bubblewrap sandbox per command (:mod:`.bwrap`).

What it cannot enforce it says so in :meth:`LocalRuntime.plan`; the manager then refuses the
environment unless unenforced limits are explicitly allowed.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import diskcap
from .. import sandbox as sandbox_ids
from ..exceptions import (
    CommandNotFoundError,
    RuntimeUnavailableError,
    ValidationError,
)
from ..models import (
    NOT_HELD,
    Enforcement,
    ExecResult,
    IsolationLevel,
    LimitStatus,
    ResourceLimits,
    in_threat_order,
    network_held,
)
from ..registry import EnvRecord, lock_path, state_path
from . import bwrap, processes
from .base import CommandSpec, Runtime, Usage
from .spawn import StatusPipe, run_process

MB = 1 << 20
SANDBOX_TASKS = 2  # bwrap's init (PID 1) and ours, in the command's namespaces
HOLDER = str(Path(__file__).resolve().parents[1] / "holder.py")
HOLDER_MARKER = "GESTVENV_HOLDER_OF"  # in the environment of an env's own (local) holder


def _spawn_holder(record: EnvRecord) -> None:
    argv = [os.path.realpath(sys.executable), "-I", "-S", "-B", HOLDER,
            "--state-file", str(state_path(record.name)), "--env-id", record.id,
            "--env-path", record.path, "--registry-lock", str(lock_path())]
    if record.owner_pid is not None:
        argv += ["--owner-pid", str(record.owner_pid),
                 "--owner-start", repr(record.owner_started or 0.0)]
    if record.idle_timeout:
        argv += ["--idle-timeout", str(record.idle_timeout)]
    if record.expires_at is not None:
        argv += ["--expires-at", repr(record.expires_at)]
    environ = {HOLDER_MARKER: record.id}
    if record.container:  # (the container glue is loaded for container envs only: ~10 ms)
        from . import container

        environ.update(container.reaper_environ(record))
    processes.spawn_detached(argv, environ)


def _user_task_count(uid: int) -> int:
    """Tasks (threads) of real uid ``uid``: what RLIMIT_NPROC counts."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return count


NETWORK_MECHANISM = ("a network namespace of its own for each command, with only lo "
                     "(bubblewrap --unshare-net): the env's commands do not reach each other "
                     "over loopback either")


def protections(applied: IsolationLevel, *, root: bool, own_uid: bool,
                network: LimitStatus | None) -> dict[str, str]:
    """What the local runtime holds against each threat (``models.THREATS``) at the applied
    isolation, and by what; what it does not hold says so. ``own_uid``: a root creator's
    commands run as the env's own unprivileged uid (``EnvRecord.sandbox_uid``)."""
    boxed = applied.sandboxed
    out = {
        "shared_files": sandbox_ids.SHARED_FILES_OWN_UID if boxed and own_uid else
                        sandbox_ids.SHARED_FILES_COPIES + ("; gestvenv's dirs but the env's are "
                                                           "hidden" if boxed else ""),
        "builds": "package code (sdist builds) runs as a command of the env: its limits, "
                  "isolation and network" + (" (bubblewrap)" if boxed else ""),
    }
    out["network"] = network_held(network)
    if not boxed:
        who = "root, as the creator" if root else "the creator's uid"
        for threat in ("privileges", "secrets", "host_writes", "processes", "units",
                       "other_envs", "ipc_uts", "kernel"):
            out[threat] = f"{NOT_HELD}process isolation: commands run as {who}, on the host"
        if not root:
            out["privileges"] = (f"{NOT_HELD}commands run as the creator's unprivileged uid, "
                                 "which setuid programs (sudo, su) can still raise")
        return in_threat_order(out)
    as_root = root and not own_uid
    if as_root:
        out["privileges"] = (f"{NOT_HELD}commands run as root (uid 0) in a user namespace, "
                             "no capability (bwrap --cap-drop ALL), but root's files are theirs")
        out["secrets"] = (f"{NOT_HELD}homes and /run/user are hidden, but commands run as uid "
                          "0: root-only files elsewhere (/etc/shadow) stay readable")
    elif own_uid:
        out["privileges"] = ("an unprivileged uid of the env's own (setpriv: no group, no "
                             "capability, empty bounding set) in a user namespace; setuid bits "
                             "give nothing (no capability in the namespace)")
        out["secrets"] = ("homes and /run/user hidden (tmpfs); root-only files such as "
                          "/etc/shadow are unreadable to the env's uid; world-readable files "
                          "stay readable")
    else:
        out["privileges"] = ("the creator's unprivileged uid in a user namespace, no capability "
                             "(bwrap --cap-drop ALL); setuid bits give nothing")
        out["secrets"] = ("homes and /run/user hidden (tmpfs, the creator's home too); files "
                          "readable by the creator elsewhere stay readable")
    out["host_writes"] = ("the host is bound read-only (bwrap --ro-bind / /), /tmp, /var/tmp, "
                          "/dev/shm and /dev are private: only the env's dir is writable; no "
                          "capability to remount")
    out["processes"] = ("a PID namespace of its own per command, with a fresh /proc: no host "
                        "process is visible or signalable")
    out["units"] = ("/run/user (the user bus, the user manager) and /run/dbus (the system bus) "
                    "hidden" + ("" if as_root else
                                "; the uid has no right to manage system units"))
    out["other_envs"] = ("the env's storage root and gestvenv's dirs hidden (tmpfs), the env's "
                         "own dir bound back" + ("; a uid per env" if own_uid else ""))
    out["ipc_uts"] = "IPC and UTS namespaces of its own per command"
    out["kernel"] = ("no capability (bwrap --cap-drop ALL), /proc/sys and /sys read-only; "
                     "no system call filter: the kernel's own checks (kernel logs stay readable "
                     "where kernel.dmesg_restrict is 0)")
    return in_threat_order(out)


class LocalRuntime(Runtime):
    name = "local"

    def __init__(self, note: str | None = None) -> None:
        self.note = note  # why "auto" chose this runtime, when it had a choice

    def watch_creators(self) -> None:
        """The per-user watchdog holds TTL, idle timeout and dead creators: started unless
        one runs."""
        from ..watch import ensure_watchdog

        ensure_watchdog()

    def plan(self, limits: ResourceLimits, isolation: IsolationLevel) -> Enforcement:
        creator = os.geteuid()
        root = creator == 0
        status: dict[str, LimitStatus] = {}
        if limits.max_memory is not None:
            status["max_memory"] = LimitStatus(
                limits.max_memory, True,
                "RLIMIT_AS on each process (address space per process, not the env's total)")
        if limits.max_cpu_percent is not None:
            status["max_cpu_percent"] = LimitStatus(
                limits.max_cpu_percent, False, "needs a cpu cgroup (systemd runtime)")
        # (max_disk: the storage's own filesystem holds it, whatever the runtime; diskcap.)
        notes = [self.note] if self.note else []
        applied = IsolationLevel.PROCESS
        if isolation is not IsolationLevel.PROCESS:
            reason = bwrap.probe_for(creator, namespaces=True)
            if reason is None:
                applied = IsolationLevel.NAMESPACE
                if isolation.rank > applied.rank:
                    notes.append(
                        f"isolation {isolation.value} requested; the local runtime applies "
                        "namespace isolation (bubblewrap): already a read-only host where only "
                        "the env's dir and its private /tmp, /var/tmp and /dev/shm are writable, "
                        "but no system call filter and no change of root directory")
            else:
                notes.append(f"isolation {isolation.value} requested; the local runtime "
                             f"applies process isolation only: {reason}")
        if not limits.network_access:
            reason = bwrap.probe_for(creator, namespaces=applied is IsolationLevel.NAMESPACE)
            status["network_access"] = LimitStatus(False, True, NETWORK_MECHANISM) \
                if reason is None else LimitStatus(
                    False, False, f"needs a private network namespace: {reason}")
        own_uid = sandbox_ids.needs_own_uid(creator, applied)
        if limits.max_processes is not None:
            if applied is IsolationLevel.NAMESPACE and own_uid:
                status["max_processes"] = LimitStatus(
                    limits.max_processes, True,
                    "RLIMIT_NPROC on the env's own uid: its task count at command start + "
                    "max_processes")
            elif applied is IsolationLevel.NAMESPACE and not root:
                status["max_processes"] = LimitStatus(
                    limits.max_processes, True,
                    "RLIMIT_NPROC in each command's own user namespace: max_processes tasks "
                    "per command, not for the env as a whole")
            else:
                status["max_processes"] = LimitStatus(
                    limits.max_processes, not root,
                    "root is exempt from RLIMIT_NPROC" if root else
                    "RLIMIT_NPROC: the user's task count at command start + max_processes")
        held = protections(applied, root=root, own_uid=own_uid,
                           network=status.get("network_access"))
        return Enforcement(self.name, isolation, applied, status, tuple(notes), held)

    async def start(self, record: EnvRecord) -> None:
        """The env's own watchdog: gestvenv's holder, as under systemd (where it is the env
        unit's process), detached from us. It ends and reaps the env at its TTL, when its
        creator dies, when it has been idle, or when its state file is deleted. The per-user
        watchdog (started when the env was registered) sweeps too, should this one be killed."""
        await asyncio.to_thread(_spawn_holder, record)

    async def start_container(self, record: EnvRecord) -> EnvRecord:
        """The env's container, with the engine's own limits (no slice holds them here)."""
        from . import container

        return await container.start(record)

    async def stop(self, record: EnvRecord) -> None:
        # Its container first (it holds the env's dir bound inside). Its holder is left to
        # leave by itself (within 0.5 s of its state file going): no second scan of /proc on
        # every destroy.
        if record.container:
            from . import container

            await container.stop(record)
        await asyncio.to_thread(processes.kill_marked, processes.ENV_MARKER, record.id)

    def guarantees(self, record: EnvRecord | None = None) -> Sequence[str]:
        return (
            "local runtime: the TTL, idle timeout and a dead creator are handled by the env's "
            "own watchdog process (it then deletes the env's files) and by a per-user one "
            "(about 0.5 s late), not by systemd: if both are killed, nothing ends the "
            "environment until the next gestvenv command (any command restarts the per-user "
            "watchdog, which then sweeps)",
            "local runtime: processes are found by an environment marker (and, at a timeout, "
            "by holding the command's output pipes); one that clears its environment and "
            "closes those pipes escapes cleanup",
            "local runtime: nothing survives a reboot except DISK-backed files, which stay "
            "until the next gestvenv command (its watchdog sweeps orphans at once, then every "
            "cleanup_interval); there is no timer at boot",
            "local runtime: at namespace isolation (bubblewrap) each command has namespaces of "
            "its own (PID, IPC, network without network access, /tmp): the env's commands "
            "neither see each other's processes nor share a loopback network or /tmp (with "
            "max_disk, /tmp and /var/tmp are the env's own, in its cap, shared by its "
            "commands); only the env's dir is common to them. A working directory hidden by "
            "the sandbox (a home, /tmp) is refused",
        )

    async def usage(self, record: EnvRecord) -> Usage:
        return (await self.usage_many([record]))[0]

    async def usage_many(self, records: Sequence[EnvRecord]) -> list[Usage]:
        # One walk of /proc for every env (a refresh of ``top`` samples them all).
        def read() -> list[Usage]:
            found = processes.marked_pids_of(processes.ENV_MARKER, {r.id for r in records})
            return [_usage_of(found.get(r.id, [])) for r in records]
        return await asyncio.to_thread(read)

    async def run(self, record: EnvRecord, command: CommandSpec) -> ExecResult:
        if record.container:
            from . import container

            return await container.run(record, command)
        box = sandbox_of(record)
        argv: Sequence[str] = command.argv
        cwd, preexec, status = command.cwd, _rlimits(record), None
        exec_id = uuid.uuid4().hex
        if box is not None:
            # bwrap is run from / and told where to go inside (a dir it would not find inside
            # is refused before); the rlimits are set by its init, just before the command.
            status = StatusPipe()
            argv = _sandboxed_argv(record, box, command, status.writer)
            cwd, preexec = "/", None
        return await run_process(record, command, argv, exec_id=exec_id, cwd=cwd,
                                 preexec=preexec, status=status, wrapped=box is not None)


def _usage_of(pids: Sequence[int]) -> Usage:
    """Resident memory, peak and CPU time of an env's processes. The peak is the sum of each
    one's own peak (VmHWM): what exited is not in it, and peaks that did not coincide are
    added up, so it is an estimate, said as such (``memory_peak_source``)."""
    import psutil

    memory, peak, cpu, count = 0, 0, 0.0, 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                memory += proc.memory_info().rss
                times = proc.cpu_times()
                # (With its waited-for children's: a tree of short-lived processes keeps
                # its CPU time when they exit, as long as their parent lives.)
                cpu += times.user + times.system + times.children_user + \
                    times.children_system
            peak += _vm_hwm(pid)
            count += 1
        except psutil.Error:
            continue
    return Usage(processes=count, memory_bytes=memory, cpu_seconds=cpu, disk_bytes=0,
                 memory_peak_bytes=peak if count else None,
                 memory_peak_source="VmHWM" if count else None)


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _limit_settings(record: EnvRecord, box: bwrap.Sandbox | None = None) -> list[tuple[int, int]]:
    limits = record.resource_limits
    settings: list[tuple[int, int]] = []
    if limits.max_memory is not None:
        settings.append((resource.RLIMIT_AS, limits.max_memory * MB))
    if limits.max_processes is not None:
        if box is not None and box.namespaced and box.uid is not None:
            # The env's own uid: its tasks are the env's (and our init's, counted here).
            budget = _user_task_count(box.uid) + limits.max_processes + 1
            settings.append((resource.RLIMIT_NPROC, budget))
        elif box is not None and box.namespaced and not box.root:
            # In a user namespace of its own the kernel counts only the command's tasks (of
            # its uid, in that namespace): the limit holds per command, plus bwrap's init and
            # ours.
            settings.append((resource.RLIMIT_NPROC, limits.max_processes + SANDBOX_TASKS))
        elif os.geteuid() != 0:
            budget = _user_task_count(os.getuid()) + limits.max_processes
            settings.append((resource.RLIMIT_NPROC, budget))
    return settings


def _rlimits(record: EnvRecord) -> Callable[[], None] | None:
    settings = _limit_settings(record)
    if not settings:
        return None

    def apply() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        for which, value in settings:
            resource.setrlimit(which, (value, value))
    return apply


def sandbox_of(record: EnvRecord) -> bwrap.Sandbox | None:
    """The bubblewrap sandbox the env's commands run in, or None (process isolation with the
    host's network), from what its plan applied."""
    enforcement = record.enforcement_record
    namespaced = enforcement.isolation_applied.sandboxed
    net = enforcement.limits.get("network_access")
    private_net = net is not None and net.enforced
    if not namespaced and not private_net:
        return None
    env_path = os.path.realpath(record.path)
    return bwrap.Sandbox(
        level=IsolationLevel.NAMESPACE if namespaced else IsolationLevel.PROCESS,
        network=not private_net, env_path=env_path,
        hide=(os.path.dirname(env_path), *record.sandbox_hide),
        expose=tuple(record.sandbox_expose),  # (the interpreter, uv: gestvenv.sandbox)
        uid=record.sandbox_uid if namespaced and record.uid == 0 else None,
        root=record.uid == 0,
        temp=tuple(diskcap.capped_temp_dirs(enforcement, record.path).items()),
        shm_mb=diskcap.cap_of(enforcement))


def _sandboxed_argv(record: EnvRecord, box: bwrap.Sandbox, command: CommandSpec,
                    status_fd: int) -> list[str]:
    cwd = sandbox_ids.command_cwd(command.cwd, os.getcwd(), record.path, box.visible)
    if not box.visible(cwd):
        raise ValidationError(
            f"working directory {cwd} is hidden inside environment {record.name!r} (namespace "
            "isolation hides homes, /tmp, /var/tmp, /dev and gestvenv's storage but the env's "
            f"own dir {record.path}): pass a cwd that is visible inside, such as the env's dir")
    program = os.path.join(cwd, command.argv[0])
    if not box.visible(os.path.abspath(program)):
        raise CommandNotFoundError(
            f"cannot run {command.argv[0]}: it is hidden inside environment {record.name!r} "
            "(namespace isolation hides homes, /tmp, /var/tmp, /dev and gestvenv's storage but "
            "the env's own dir)")
    tool = bwrap.find_bwrap()
    if tool is None:
        raise RuntimeUnavailableError(
            f"environment {record.name!r} runs its commands under bubblewrap, which is gone")
    return bwrap.bwrap_argv(
        box, bwrap=tool, python=record.interpreter, status_fd=status_fd,
        limits=_limit_settings(record, box), argv=command.argv, cwd=cwd,
        # Interactive commands stay in the terminal's session (Ctrl-C, job control); captured
        # ones have no terminal (they are in a session of their own already).
        new_session=command.capture)
