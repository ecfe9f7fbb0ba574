"""Signals for a running command (CommandHandle), against the real runtime: the local one on
this host (bare or under bubblewrap, and a container's ``exec`` where podman runs), systemd's
``KillUnit`` in the test host. A signal is the command's to handle; it reaches every process of
the command, and only those."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import pytest

import gestvenv
from gestvenv import CommandHandle, CommandNotRunningError, IsolationLevel, ValidationError

from .support import env_pids

# (The handlers write with os.write: a print() in a handler that lands while the main code is
# still in its own print() raises "reentrant call" and the command exits 1.)
TRAPS_TERM = """
import os, signal, sys, time
def ended(signum, _):
    os.write(1, b"handled %d\\n" % signum)
    sys.exit(3)
signal.signal(signal.SIGTERM, ended)
signal.signal(signal.SIGUSR1, lambda signum, _: os.write(1, b"usr1\\n"))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


async def started(env: gestvenv.Environment, argv: list[str], handle: CommandHandle,
                  marker: str = "ready") -> asyncio.Future[gestvenv.ExecResult]:
    """The command running, once it printed ``marker``."""
    seen = asyncio.Event()
    text: list[str] = []

    def shown(_name: str, data: str) -> None:
        text.append(data)
        if marker in "".join(text):
            seen.set()
    task = asyncio.ensure_future(env.execute(argv, handle=handle, stream=shown, timeout=60))
    waiting = asyncio.ensure_future(seen.wait())
    await asyncio.wait({task, waiting}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    assert seen.is_set(), task.result() if task.done() else "the command never got ready"
    assert handle.running
    return task


@pytest.mark.parametrize("isolation", [IsolationLevel.PROCESS, IsolationLevel.NAMESPACE,
                                       IsolationLevel.CONTAINER])
async def test_a_signal_the_command_handles(isolation: IsolationLevel) -> None:
    async with gestvenv.ephemeral("sig-handled", isolation_level=isolation) as env:
        print("isolation applied:", env.info()["enforcement"]["isolation_applied"])
        handle = CommandHandle()
        task = await started(env, ["python", "-c", TRAPS_TERM], handle)
        await handle.signal("USR1")
        await handle.signal(signal.SIGTERM)
        result = await task
    assert result.returncode == 3, result
    assert "usr1" in result.stdout and "handled 15" in result.stdout, result
    assert result.killed_by is None
    assert not handle.running
    with pytest.raises(CommandNotRunningError, match="has ended"):
        await handle.signal("TERM")


async def test_a_signal_reaches_every_process_of_the_command_and_no_other() -> None:
    async with gestvenv.ephemeral("sig-tree") as env:
        bystander = CommandHandle()
        other = await started(env, ["python", "-c", TRAPS_TERM], bystander)
        handle = CommandHandle()
        tree = await started(env, ["sh", "-c", "sleep 60 & sleep 60 & echo ready; wait"],
                             handle)
        await handle.signal("SIGTERM")
        result = await asyncio.wait_for(tree, 20)
        assert result.returncode == -signal.SIGTERM, result
        assert not other.done()                      # another command of the env: untouched
        await bystander.signal("TERM")
        assert (await other).returncode == 3
        left = [p for p in env_pids(env.id) if _comm(p) == "sleep"]
        assert left == [], "a process of the signalled tree outlived it"


async def test_bad_signals_and_a_handle_not_running_are_refused() -> None:
    handle = CommandHandle()
    with pytest.raises(CommandNotRunningError, match="not started"):
        await handle.signal("TERM")
    for bad in ("SEGV", "NOPE", 0, 99, True, 1.5):
        with pytest.raises(ValidationError):
            await handle.signal(bad)  # type: ignore[arg-type]
    async with gestvenv.ephemeral("sig-busy") as env:
        task = await started(env, ["python", "-c", TRAPS_TERM], handle)
        with pytest.raises(ValidationError, match="running another command"):
            await env.execute(["true"], handle=handle)
        await handle.signal("TERM")
        assert (await task).returncode == 3
        again = await env.execute(["true"], handle=handle)  # reusable once ended
        assert again.ok


async def test_stop_and_cont() -> None:
    async with gestvenv.ephemeral("sig-stop") as env:
        handle = CommandHandle()
        task = await started(env, ["python", "-c", TRAPS_TERM], handle)
        await handle.signal("STOP")
        await asyncio.sleep(0.3)
        [pid] = [p for p in env_pids(env.id) if b"handled" in _cmdline(p)]
        assert _state(pid) == "T"
        await handle.signal("CONT")
        await asyncio.sleep(0.3)
        assert _state(pid) in ("S", "R")
        await handle.signal("TERM")
        assert (await task).returncode == 3


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("isolation", [IsolationLevel.PROCESS, IsolationLevel.NAMESPACE])
async def test_a_signal_sent_before_the_command_runs_reaches_it(
        isolation: IsolationLevel) -> None:
    """Sent as execute() is called (before its unit, or bwrap's init, has started it): held
    until the command runs, then delivered; never lost."""
    async with gestvenv.ephemeral("sig-early", isolation_level=isolation) as env:
        for _ in range(3):
            handle = CommandHandle()
            task = asyncio.ensure_future(env.execute(["sleep", "20"], handle=handle))
            await asyncio.sleep(0)                   # execute() has taken the handle
            assert handle.running
            await handle.signal("TERM")
            result = await asyncio.wait_for(task, 15)
            assert result.returncode == -signal.SIGTERM, result


async def test_a_busy_handle_starts_no_second_command(tmp_path: Path) -> None:
    flag = tmp_path / "ran"
    async with gestvenv.ephemeral("sig-shared") as env:
        handle = CommandHandle()
        first = asyncio.ensure_future(env.execute(["sleep", "20"], handle=handle))
        second = asyncio.ensure_future(env.execute(["touch", str(flag)], handle=handle))
        with pytest.raises(ValidationError, match="running another command"):
            await second
        await handle.signal("TERM")
        assert (await first).returncode == -signal.SIGTERM
    assert not flag.exists(), "the refused command ran"


async def test_a_command_named_like_a_wrapper_is_signalled(tmp_path: Path) -> None:
    """Wrappers are told by their PID, not their name: a command of its own called docker (a
    CI step) gets its signals."""
    async with gestvenv.ephemeral("sig-named") as env:
        docker = env.path / "bin" / "docker"
        shutil.copy2("/bin/sleep", docker)            # (its /proc/PID/exe says docker)
        handle = CommandHandle()
        task = asyncio.ensure_future(env.execute(["docker", "20"], handle=handle))
        await asyncio.sleep(0.5)
        await handle.signal("TERM")
        assert (await asyncio.wait_for(task, 15)).returncode == -signal.SIGTERM
