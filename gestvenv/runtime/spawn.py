"""Running one command as our child and waiting for it: its output, its deadline (its
timeout or its env's TTL), and on cancellation nothing of its tree left. The local runtime runs
every command so (bare or under bubblewrap), and both runtimes run a container env's commands
so (``podman exec``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import functools
import os
import subprocess
import time
from collections.abc import Callable, Sequence

from ..exceptions import (
    CommandNotExecutableError,
    CommandNotFoundError,
    CommandNotRunningError,
    GestvenvError,
)
from ..handle import CommandHandle
from ..models import ExecResult
from ..registry import EnvRecord
from ..shield import shielded
from . import processes
from .base import CommandSpec, streamed

PIPE_GRACE = 1.0


class StatusPipe:
    """The pipe through which a sandbox's init (:data:`bwrap.INIT`) reports the command's own
    status: "E<errno>" if it could not be started, else "S<returncode>"."""

    def __init__(self) -> None:
        self.reader, self.writer = os.pipe()
        os.set_blocking(self.reader, False)
        self.reported = False

    def close_writer(self) -> None:
        if self.writer >= 0:
            os.close(self.writer)
            self.writer = -1

    def close(self) -> None:
        self.close_writer()
        if self.reader >= 0:
            os.close(self.reader)
            self.reader = -1

    def returncode(self, returncode: int, program: str) -> int:
        """The command's own status (raises for a command that could not be started); the
        wrapper's ``returncode`` if there is no report (it failed, or was killed: then
        ``reported`` stays False)."""
        reader, self.reader = self.reader, -1
        code, self.reported = _sandboxed_status(reader, returncode, program)
        return code


async def run_process(record: EnvRecord, command: CommandSpec, argv: Sequence[str], *,
                      exec_id: str, cwd: str | None,
                      preexec: Callable[[], None] | None = None,
                      status: StatusPipe | None = None,
                      environ: dict[str, str] | None = None,
                      wrapped: bool = False) -> ExecResult:
    """Run ``argv`` for ``command`` as our child and wait: its output, its timeout (or the
    env's TTL: ``killed_by``), and on cancellation nothing of it left. Its tree is found by
    ``exec_id`` in the environment of each process (and by the output pipes it holds).
    ``wrapped``: ``argv`` runs the command rather than being it (bwrap, an engine's exec):
    never signalled for it."""
    environ = {**(command.environ if environ is None else environ),
               processes.EXEC_MARKER: exec_id}
    deadline_kind, timeout = _deadline(record, command.timeout)
    if command.input is not None:
        stdin: int | None = subprocess.PIPE
    else:
        stdin = subprocess.DEVNULL if command.capture else None
    out = subprocess.PIPE if command.capture else None
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=out, stderr=out, cwd=cwd,
            env=environ,
            # Captured commands get a session of their own (one group to kill); interactive
            # ones stay in the terminal's foreground group so that Ctrl-C and job control
            # reach them.
            start_new_session=command.capture,
            preexec_fn=preexec,
            pass_fds=(status.writer,) if status is not None else (),
        )
    except BaseException as exc:
        if status is not None:
            status.close()
        if isinstance(exc, FileNotFoundError):  # e.g. the interpreter of its "#!" line
            raise CommandNotFoundError(
                f"cannot run {command.argv[0]}: {exc.strerror}") from None
        if isinstance(exc, OSError):  # EACCES, ENOEXEC (a "#!" line too long or malformed)
            raise CommandNotExecutableError(
                f"cannot run {command.argv[0]}: {exc.strerror}") from None
        raise
    if status is not None:
        status.close_writer()
    # The command's output pipes: whoever still holds them at a timeout is of its tree,
    # even a process that scrubbed its environment (and so its marker).
    pipes = processes.pipe_ids(proc.pid) if command.capture else set()
    killed_by = None
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    collector = asyncio.ensure_future(_collect(proc, command, chunks))

    def kill_tree() -> None:
        try:
            processes.kill_marked(processes.EXEC_MARKER, exec_id)
        finally:  # (whatever failed there: the holders of its output go too)
            processes.kill_pipe_holders(pipes)

    try:
        if command.handle is not None:
            command.handle._arm(functools.partial(
                _signal, exec_id, pipes, command.argv[0], proc, proc.pid if wrapped else None,
                command.handle))
        done, _ = await asyncio.wait({collector}, timeout=timeout)
        while not done and deadline_kind == "ttl" and record.max_ttl:
            # An extendable TTL may have moved meanwhile (Environment.extend_ttl): its state
            # file says; gone, the env has ended.
            from .. import registry

            fresh = await asyncio.to_thread(registry.current, record)
            if fresh is None or fresh.expires_at == record.expires_at:
                break
            record = fresh
            deadline_kind, timeout = _deadline(record, command.timeout,
                                               time.monotonic() - started)
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
        if status is not None:
            status.close()
        await shielded(asyncio.to_thread(kill_tree))
        raise
    finally:
        if command.handle is not None:
            command.handle._disarm()
    stdout, stderr = b"".join(chunks["stdout"]), b"".join(chunks["stderr"])
    duration = time.monotonic() - started
    returncode = proc.returncode if proc.returncode is not None else await proc.wait()
    if status is not None:
        returncode = status.returncode(returncode, command.argv[0])
    if killed_by is None and returncode == -9 and record.expires_at is not None \
            and time.time() >= record.expires_at - 0.05:
        killed_by = "ttl"  # the watchdog ended the environment while this ran
    return ExecResult(argv=command.argv, returncode=returncode,
                      stdout=stdout.decode(errors="replace"),
                      stderr=stderr.decode(errors="replace"),
                      duration=duration, killed_by=killed_by)


# Seconds a signal waits for the command to exist (bwrap and its init start it a few ms after
# the launcher) and to be told (a process in execve is not, for a moment).
SIGNAL_START_WAIT = 2.0


async def _signal(exec_id: str, pipes: set[str], program: str,
                  proc: asyncio.subprocess.Process, launcher: int | None,
                  handle: CommandHandle, signum: int) -> None:
    """A command's signal (CommandHandle), to each process of its tree: once it exists."""
    deadline = time.monotonic() + SIGNAL_START_WAIT
    pause = 0.005
    while True:
        async with handle._walk_slot():
            sent, refused = await asyncio.to_thread(processes.signal_command, exec_id, pipes,
                                                    signum, launcher)
        if sent:
            return
        if refused:
            raise GestvenvError(f"signal {signum} to {program}: not permitted (its processes "
                                "run under uids this process cannot signal)")
        if proc.returncode is not None or time.monotonic() >= deadline:
            raise CommandNotRunningError(f"{program}: no process of the command is left")
        # Only its wrappers yet (the command is being started), or a process in execve, not
        # told yet (processes._identity): again in a moment. (Backing off: a command that
        # hides from the walk must not have the service scan /proc 200 times a second.)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.1)


def _deadline(record: EnvRecord, timeout: float | None,
              elapsed: float = 0.0) -> tuple[str, float | None]:
    """The earlier of the command's timeout (``elapsed`` of it spent) and the environment's
    TTL, and which one it is."""
    if timeout is not None:
        timeout = max(0.0, timeout - elapsed)
    if record.expires_at is None:
        return "timeout", timeout
    remaining = max(0.0, record.expires_at - time.time())
    if timeout is not None and timeout <= remaining:
        return "timeout", timeout
    return "ttl", remaining


def _sandboxed_status(status_r: int, returncode: int, program: str) -> tuple[int, bool]:
    """The command's own status, as the sandbox's init reported it (bwrap gives 128+N for a
    death by signal N), and True; bwrap's if there is no report (bwrap failed, or was
    killed), and False."""
    try:
        report = os.read(status_r, 64).decode(errors="replace")
    except OSError:  # BlockingIOError: no report
        report = ""
    finally:
        os.close(status_r)
    if report.startswith("E"):  # then "S127" from the init
        errno_ = int(report[1:].partition("S")[0] or errno.ENOEXEC)
        text = os.strerror(errno_)
        if errno_ == errno.ENOENT:
            raise CommandNotFoundError(f"cannot run {program}: {text}")
        raise CommandNotExecutableError(f"cannot run {program}: {text}")
    if report.startswith("S"):
        with contextlib.suppress(ValueError):
            return int(report[1:]), True
    return returncode, False


async def _collect(proc: asyncio.subprocess.Process, command: CommandSpec,
                   chunks: dict[str, list[bytes]]) -> None:
    stream = command.stream

    async def pump(name: str, reader: asyncio.StreamReader | None) -> None:
        if reader is None:
            return
        # Incremental: a UTF-8 character split across two reads is shown whole.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while data := await reader.read(65536):
            command.kept(chunks[name], data)
            if stream is not None:
                await streamed(stream, name, decoder.decode(data))
        if stream is not None and (tail := decoder.decode(b"", final=True)):
            await streamed(stream, name, tail)

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
