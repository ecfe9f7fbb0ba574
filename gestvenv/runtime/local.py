"""The local runtime, for hosts without systemd: a process group per command, rlimits, a watchdog.

What it cannot enforce it says so in :meth:`LocalRuntime.plan`; the manager then refuses the
environment unless unenforced limits are explicitly allowed.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from ..exceptions import CommandNotExecutableError, CommandNotFoundError
from ..models import Enforcement, ExecResult, IsolationLevel, LimitStatus, ResourceLimits
from ..registry import EnvRecord, lock_path, state_path
from ..shield import shielded
from . import processes
from .base import CommandSpec, Runtime, Usage

MB = 1 << 20
PIPE_GRACE = 1.0
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
    processes.spawn_detached(argv, {HOLDER_MARKER: record.id})


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


class LocalRuntime(Runtime):
    name = "local"

    def __init__(self, note: str | None = None) -> None:
        self.note = note  # why "auto" chose this runtime, when it had a choice

    def plan(self, limits: ResourceLimits, isolation: IsolationLevel) -> Enforcement:
        root = os.geteuid() == 0
        status: dict[str, LimitStatus] = {}
        if limits.max_memory is not None:
            status["max_memory"] = LimitStatus(
                limits.max_memory, True,
                "RLIMIT_AS on each process (address space per process, not the env's total)")
        if limits.max_processes is not None:
            status["max_processes"] = LimitStatus(
                limits.max_processes, not root,
                "root is exempt from RLIMIT_NPROC" if root else
                "RLIMIT_NPROC: the user's task count at command start + max_processes")
        if limits.max_cpu_percent is not None:
            status["max_cpu_percent"] = LimitStatus(
                limits.max_cpu_percent, False, "needs a cpu cgroup (systemd runtime)")
        if limits.max_disk is not None:
            status["max_disk"] = LimitStatus(
                limits.max_disk, False, "needs a size-capped storage (systemd runtime)")
        if not limits.network_access:
            status["network_access"] = LimitStatus(
                False, False, "needs a private network namespace (systemd runtime)")
        notes = [self.note] if self.note else []
        if isolation is not IsolationLevel.PROCESS:
            notes.append(f"isolation {isolation.value} requested; the local runtime applies "
                         "process isolation only (own process group, marked processes)")
        return Enforcement(self.name, isolation, IsolationLevel.PROCESS, status, tuple(notes))

    async def start(self, record: EnvRecord) -> None:
        """The env's own watchdog: gestvenv's holder, as under systemd (where it is the env
        unit's process), detached from us. It ends and reaps the env at its TTL, when its
        creator dies, when it has been idle, or when its state file is deleted. The per-user
        watchdog (started when the env was registered) sweeps too, should this one be killed."""
        await asyncio.to_thread(_spawn_holder, record)

    async def stop(self, record: EnvRecord) -> None:
        # Its holder is left to leave by itself (within 0.5 s of its state file going): no
        # second scan of /proc on every destroy.
        await asyncio.to_thread(processes.kill_marked, processes.ENV_MARKER, record.id)

    def guarantees(self) -> Sequence[str]:
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
        )

    async def usage(self, record: EnvRecord) -> Usage:
        pids = await asyncio.to_thread(processes.marked_pids, processes.ENV_MARKER, record.id)
        memory, cpu, count = 0, 0.0, 0
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    memory += proc.memory_info().rss
                    times = proc.cpu_times()
                    cpu += times.user + times.system
                count += 1
            except psutil.Error:
                continue
        return Usage(processes=count, memory_bytes=memory, cpu_seconds=cpu, disk_bytes=0)

    async def run(self, record: EnvRecord, command: CommandSpec) -> ExecResult:
        exec_id = uuid.uuid4().hex
        environ = {**command.environ, processes.EXEC_MARKER: exec_id}
        deadline_kind, timeout = _deadline(record, command.timeout)
        if command.input is not None:
            stdin: int | None = subprocess.PIPE
        else:
            stdin = subprocess.DEVNULL if command.capture else None
        out = subprocess.PIPE if command.capture else None
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *command.argv, stdin=stdin, stdout=out, stderr=out, cwd=command.cwd,
                env=environ,
                # Captured commands get a session of their own (one group to kill); interactive
                # ones stay in the terminal's foreground group so that Ctrl-C and job control
                # reach them.
                start_new_session=command.capture,
                preexec_fn=_rlimits(record.resource_limits),
            )
        except FileNotFoundError as exc:  # e.g. the interpreter named by its "#!" line
            raise CommandNotFoundError(f"cannot run {command.argv[0]}: {exc.strerror}") from None
        except OSError as exc:  # EACCES, ENOEXEC (a "#!" line too long or malformed)
            raise CommandNotExecutableError(
                f"cannot run {command.argv[0]}: {exc.strerror}") from None
        # The command's output pipes: whoever still holds them at a timeout is of its tree,
        # even a process that scrubbed its environment (and so its marker).
        pipes = processes.pipe_ids(proc.pid) if command.capture else set()
        killed_by = None
        chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        collector = asyncio.ensure_future(_collect(proc, command, chunks))

        def kill_tree() -> None:
            processes.kill_marked(processes.EXEC_MARKER, exec_id)
            processes.kill_pipe_holders(pipes)

        try:
            done, _ = await asyncio.wait({collector}, timeout=timeout)
            if not done:
                killed_by = deadline_kind
                await asyncio.to_thread(kill_tree)
                # Output read so far is kept: the pipes end once their holders are dead. If one
                # escaped anyway, stop reading after a grace period rather than hang.
                done, _ = await asyncio.wait({collector}, timeout=PIPE_GRACE)
                if not done:
                    collector.cancel()
                    await proc.wait()
            else:
                await collector
        except BaseException:
            # Cancelled (Ctrl-C, a task group): the command does not outlive its caller.
            collector.cancel()
            await shielded(asyncio.to_thread(kill_tree))
            raise
        stdout, stderr = b"".join(chunks["stdout"]), b"".join(chunks["stderr"])
        duration = time.monotonic() - started
        returncode = proc.returncode if proc.returncode is not None else await proc.wait()
        if killed_by is None and returncode == -9 and record.expires_at is not None \
                and time.time() >= record.expires_at - 0.05:
            killed_by = "ttl"  # the watchdog ended the environment while this ran
        return ExecResult(argv=command.argv, returncode=returncode,
                          stdout=stdout.decode(errors="replace"),
                          stderr=stderr.decode(errors="replace"),
                          duration=duration, killed_by=killed_by)


def _deadline(record: EnvRecord, timeout: float | None) -> tuple[str, float | None]:
    """The earlier of the command's timeout and the environment's TTL, and which one it is."""
    if record.expires_at is None:
        return "timeout", timeout
    remaining = max(0.0, record.expires_at - time.time())
    if timeout is not None and timeout <= remaining:
        return "timeout", timeout
    return "ttl", remaining


def _rlimits(limits: ResourceLimits) -> Callable[[], None] | None:
    settings: list[tuple[int, int]] = []
    if limits.max_memory is not None:
        settings.append((resource.RLIMIT_AS, limits.max_memory * MB))
    if limits.max_processes is not None and os.geteuid() != 0:
        budget = _user_task_count(os.getuid()) + limits.max_processes
        settings.append((resource.RLIMIT_NPROC, budget))
    if not settings:
        return None

    def apply() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        for which, value in settings:
            resource.setrlimit(which, (value, value))
    return apply


async def _collect(proc: asyncio.subprocess.Process, command: CommandSpec,
                   chunks: dict[str, list[bytes]]) -> None:
    stream = command.stream

    async def pump(name: str, reader: asyncio.StreamReader | None) -> None:
        if reader is None:
            return
        # Incremental: a UTF-8 character split across two reads is shown whole.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while data := await reader.read(65536):
            chunks[name].append(data)
            if stream is not None:
                stream(name, decoder.decode(data))
        if stream is not None and (tail := decoder.decode(b"", final=True)):
            stream(name, tail)

    async def feed() -> None:
        if proc.stdin is None:
            return
        try:
            if command.input:
                proc.stdin.write(command.input)
                await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command did not read all its input: not an error of ours

    await asyncio.gather(feed(), pump("stdout", proc.stdout), pump("stderr", proc.stderr))
    await proc.wait()
