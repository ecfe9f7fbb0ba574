"""CommandHandle's pure parts: which signals may be sent, and which processes of a command's
tree are its wrappers (never signalled)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gestvenv.exceptions import CommandNotRunningError, ValidationError
from gestvenv.handle import CommandHandle, signal_number
from gestvenv.runtime import processes
from gestvenv.runtime.bwrap import INIT
from gestvenv.runtime.processes import is_wrapper


@pytest.mark.parametrize(("given", "number"), [
    ("TERM", signal.SIGTERM), ("sigint", signal.SIGINT), (" SIGHUP ", signal.SIGHUP),
    (signal.SIGUSR1, signal.SIGUSR1), (9, signal.SIGKILL), ("STOP", signal.SIGSTOP)])
def test_sendable_signals(given: int | str, number: int) -> None:
    assert signal_number(given) == number


@pytest.mark.parametrize("given", ["SEGV", "SIGBUS", "", "TERM;KILL", 0, 11, 4096, True, 1.0,
                                   None])
def test_other_signals_are_refused(given: object) -> None:
    with pytest.raises(ValidationError):
        signal_number(given)  # type: ignore[arg-type]


def test_wrappers_are_told_from_the_command() -> None:
    init = INIT.encode()
    launcher = 100
    assert is_wrapper(100, 1, "/usr/bin/bwrap", [b"bwrap"], launcher, init)       # launched
    assert is_wrapper(101, 100, "/usr/bin/bwrap", [b"bwrap"], launcher, init)     # its pid 1
    assert is_wrapper(100, 1, "/usr/bin/podman", [b"podman", b"exec"], launcher, init)
    assert is_wrapper(102, 101, "/usr/bin/python3.11",
                      [b"python", b"-I", b"-S", b"-B", b"-c", init, b"5"], launcher, init)
    assert is_wrapper(7, 1, "/usr/bin/conmon", [b"conmon"], launcher, init)
    assert is_wrapper(8, 7, "/usr/sbin/runc", [b"runc", b"init"], launcher, init)
    # bwrap's pid 1 forked, not yet exec'd into the init: a bwrap child of a bwrap.
    assert is_wrapper(106, 101, "/usr/bin/bwrap", [b"bwrap"], launcher, init,
                      parent_exe="/usr/bin/bwrap")
    assert is_wrapper(106, 101, "/usr/bin/setpriv", [b"setpriv", b"--reuid=4242"], launcher,
                      init, parent_exe="/usr/bin/bwrap")       # (then exec'd into the init)
    assert not is_wrapper(107, 102, "/usr/bin/setpriv", [b"setpriv"], launcher, init,
                          parent_exe="/usr/bin/python3.11")    # the command's own setpriv
    assert not is_wrapper(103, 102, "/usr/bin/python3.11", [b"python", b"-c", b"print(1)"],
                          launcher, init)
    # A command that is itself named bwrap or docker is the command: by pid, not by name.
    assert not is_wrapper(104, 103, "/env/bin/docker", [b"docker", b"build"], launcher, init)
    assert not is_wrapper(105, 104, "/usr/bin/bwrap", [b"bwrap"], launcher, init)
    # Bare (no launcher): the process gestvenv started is the command.
    assert not is_wrapper(100, 1, "/usr/bin/sleep", [b"sleep", b"60"], None, init)
    assert not is_wrapper(100, 1, "/usr/bin/bwrap", [b"bwrap"], None, init)
    assert not is_wrapper(100, 1, "/usr/sbin/runc", [b"runc", b"list"], None, init)  # bare


def test_a_signal_sent_while_the_command_starts_waits_for_it() -> None:
    asyncio.run(_states())


async def _states() -> None:
    """The handle's states (the runtimes' side faked: this is the handle's own logic)."""
    handle = CommandHandle()
    got: list[int] = []

    async def deliver(signum: int) -> None:
        got.append(signum)

    handle._take()
    assert handle.running
    with pytest.raises(ValidationError, match="running another command"):
        handle._take()                              # (a second execute() with it)
    early = asyncio.ensure_future(handle.signal("TERM"))
    await asyncio.sleep(0.05)
    assert not early.done() and got == []           # waits for the command to run
    handle._arm(deliver)
    await early
    assert got == [signal.SIGTERM]
    handle._disarm()
    with pytest.raises(CommandNotRunningError, match="has ended"):
        await handle.signal("TERM")
    handle._take()                                  # reusable once ended
    late = asyncio.ensure_future(handle.signal("INT"))
    await asyncio.sleep(0)
    handle._disarm()                                # ended before it ran: said
    with pytest.raises(CommandNotRunningError, match="has ended"):
        await late


def test_what_delivers_is_given_once_running_and_delivers_nothing_itself() -> None:
    """The service waits for a starting command with this, outside its delivery slots."""
    async def main() -> None:
        handle = CommandHandle()
        got: list[int] = []

        async def deliver(signum: int) -> None:
            got.append(signum)

        with pytest.raises(CommandNotRunningError, match="not started"):
            await handle._once_running()
        handle._take()
        waiting = asyncio.ensure_future(handle._once_running())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        handle._arm(deliver)
        assert await waiting is deliver and got == []

    asyncio.run(main())


def test_a_delivery_waiting_for_its_command_holds_no_one_else_s_walk_slot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A service shares its walk slots among its handles (two for the API's): a wrapped
    command whose real command has not appeared is looked for again and again, and between
    walks holds no slot, so another command's signal is not held up. (The walks faked: a
    command that never appears behind its wrapper.)"""
    import time
    from types import SimpleNamespace

    from gestvenv.runtime import spawn

    walks: list[str] = []

    def signal_command(exec_id: str, pipes: set[str], signum: int,
                       launcher: int | None = None) -> tuple[int, int]:
        walks.append(exec_id)
        time.sleep(0.002)
        return (1, 0) if exec_id == "runs" else (0, 0)  # (only its wrappers yet)

    monkeypatch.setattr(spawn.processes, "signal_command", signal_command)
    monkeypatch.setattr(spawn, "SIGNAL_START_WAIT", 1.0)

    async def main() -> float:
        slots = asyncio.Semaphore(1)
        handles = [CommandHandle() for _ in range(3)]
        for handle in handles:
            handle._walks = slots
        proc = SimpleNamespace(returncode=None)  # (the wrapper runs on)

        def deliver(exec_id: str, handle: CommandHandle) -> asyncio.Future[None]:
            return asyncio.ensure_future(spawn._signal(exec_id, set(), "cmd", proc,  # type: ignore[arg-type]
                                                       4242, handle, signal.SIGTERM))

        waiting = [deliver("never-1", handles[0]), deliver("never-2", handles[1])]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await deliver("runs", handles[2])
        took = time.monotonic() - started
        for late in waiting:
            with pytest.raises(CommandNotRunningError, match="no process of the command"):
                await late
        return took

    took = asyncio.run(main())
    assert took < 0.25, took
    assert walks.count("runs") == 1 and walks.count("never-1") > 10


# A live process that empties its own argument area (prctl PR_SET_MM_MAP, no privilege
# needed): as a process in execve reads, before the loader has set its argv up.
BLANK_ARGV = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.sbrk.restype = ctypes.c_void_p
f = open("/proc/self/stat", "rb").read().rsplit(b")", 1)[1].split()
v = lambda field: int(f[field - 3])
names = ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
         "start_stack", "arg_start", "arg_end", "env_start", "env_end")
class Map(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in names] + [
        ("auxv", ctypes.c_void_p), ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]
m = Map(v(26), v(27), v(45), v(46), v(47), libc.sbrk(0), v(28), v(48), v(48), v(50), v(51),
        None, 0, 0xffffffff)
ok = libc.prctl(35, 14, ctypes.byref(m), ctypes.sizeof(m), 0) == 0  # PR_SET_MM, _MAP
print("blank" if ok else f"errno {ctypes.get_errno()}", flush=True)
time.sleep(30)
"""


def test_a_live_process_with_no_argument_area_is_not_signalled_yet() -> None:
    """Marked as a command's and holding nothing else: not taken for the command (nor for
    anything) while it has no argv, so not signalled in that walk."""
    exec_id = "c" * 32
    proc = subprocess.Popen([sys.executable, "-c", BLANK_ARGV], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, processes.EXEC_MARKER: exec_id})
    try:
        said = proc.stdout.readline().strip() if proc.stdout else ""
        if said != "blank":
            pytest.skip(f"prctl(PR_SET_MM_MAP) refused here ({said})")
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes() == b""
        assert processes._identity(proc.pid) is None
        assert processes.signal_command(exec_id, set(), signal.SIGTERM) == (0, 0)
        time.sleep(0.1)
        assert proc.poll() is None, "signalled"
    finally:
        proc.kill()
        proc.wait()


def test_a_bare_command_not_told_yet_is_looked_for_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a wrapper too, a walk that finds nothing to signal while the command still
    runs is tried again: a process in execve is not told for a moment (CI: a signal sent as
    a bare command started raised "no process of the command is left"). The first two walks
    faked as that moment, then the real one on a real process."""
    from types import SimpleNamespace

    from gestvenv.runtime import spawn

    real = processes.signal_command
    walks: list[int] = []

    def signal_command(exec_id: str, pipes: set[str], signum: int,
                       launcher: int | None = None) -> tuple[int, int]:
        walks.append(signum)
        return (0, 0) if len(walks) <= 2 else real(exec_id, pipes, signum, launcher)

    monkeypatch.setattr(spawn.processes, "signal_command", signal_command)
    sleeper = subprocess.Popen(["sleep", "30"], env={processes.EXEC_MARKER: "b" * 32})
    try:
        async def main() -> None:
            handle = CommandHandle()
            proc = SimpleNamespace(returncode=None)  # (still running)
            await spawn._signal("b" * 32, set(), "sleep", proc,  # type: ignore[arg-type]
                                None, handle, signal.SIGTERM)

        asyncio.run(main())
        assert sleeper.wait(5) == -signal.SIGTERM and len(walks) == 3
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_pid_found_by_the_scan_but_not_the_command_s_is_never_signalled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A PID the scan found and that is now another process (reused): the check through its
    pidfd sees no mark of the command, and it is not signalled."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        monkeypatch.setattr(processes, "marked_pids", lambda key, value: [other.pid])
        assert processes.signal_command("0" * 32, set(), signal.SIGTERM) == (0, 0)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_process_with_no_argument_area_has_no_identity_yet() -> None:
    """In execve a process shows its new executable before its argv exists (the sandbox's
    init, signalled there, was taken for the command). A zombie has no argument area either:
    a real one stands in for that moment, which cannot be held open from here."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == b""
        assert processes._identity(pid) is None
        assert processes._identity(os.getpid()) is not None  # (a live one has its argv)
    finally:
        os.waitpid(pid, 0)
