"""The kill paths (an env's reap, a command's timeout) kill what a scan of /proc found, each
PID checked again once a pidfd pins it: a PID that ended and was reused since the scan is
another process, which lives on. Real processes; the scan is made to return a bystander, as
a reused PID would look to it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from gestvenv import reaper
from gestvenv.runtime import processes

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start(spawned: list[subprocess.Popen[bytes]], env: dict[str, str] | None = None,
          **kwargs: object) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(SLEEP, env={**os.environ, **(env or {})}, **kwargs)  # type: ignore[call-overload]
    spawned.append(proc)
    return proc


def ended(proc: subprocess.Popen[bytes], within: float = 5.0) -> bool:
    try:
        proc.wait(within)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_kill_marked_spares_a_pid_the_scan_found_that_no_longer_carries_the_mark(
        spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    marked = start(spawned, {reaper.ENV_MARKER: "envA"})
    bystander = start(spawned, {reaper.ENV_MARKER: "envB"})
    time.sleep(0.2)  # (its environ readable: exec'd)
    scan = reaper.marked_pids
    monkeypatch.setattr(reaper, "marked_pids",
                        lambda key, value: [*scan(key, value), bystander.pid])
    assert reaper.kill_marked(reaper.ENV_MARKER, "envA", passes=3) == 1
    assert ended(marked)
    assert marked.returncode == -9
    assert not ended(bystander, 0.3)


def test_kill_pipe_holders_spares_a_pid_that_no_longer_holds_the_pipes(
        spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    holder = start(spawned, stdout=subprocess.PIPE)
    bystander = start(spawned)
    time.sleep(0.2)
    pipes = processes.pipe_ids(holder.pid)
    assert pipes
    scan = processes.pipe_holders
    monkeypatch.setattr(processes, "pipe_holders",
                        lambda wanted: scan(wanted) | {bystander.pid})
    assert processes.kill_pipe_holders(pipes) == 1
    assert ended(holder)
    assert not ended(bystander, 0.3)


def test_kill_checked_asks_once_the_process_is_pinned(
        spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    proc = start(spawned)
    order: list[str] = []
    opened = os.pidfd_open

    def pidfd_open(pid: int, flags: int = 0) -> int:
        order.append("pinned")
        return opened(pid, flags)

    def still_ours(pid: int) -> bool:
        order.append("checked")
        return False

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    assert reaper.kill_checked(proc.pid, still_ours) is False
    assert order == ["pinned", "checked"]
    assert not ended(proc, 0.3)
    assert reaper.kill_checked(proc.pid, lambda pid: True) is True
    assert ended(proc) and proc.returncode == -9
    assert reaper.kill_checked(proc.pid, lambda pid: True) is False  # reaped: gone


def test_kill_checked_without_pidfds_checks_then_kills(
        spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    proc = start(spawned)

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    assert reaper.kill_checked(proc.pid, lambda pid: False) is False
    assert not ended(proc, 0.3)
    assert reaper.kill_checked(proc.pid, lambda pid: True) is True
    assert ended(proc)


def test_is_marked(spawned: list[subprocess.Popen[bytes]]) -> None:
    proc = start(spawned, {reaper.ENV_MARKER: "one"})
    time.sleep(0.3)
    assert reaper.is_marked(proc.pid, reaper.ENV_MARKER, "one")
    assert not reaper.is_marked(proc.pid, reaper.ENV_MARKER, "on")
    assert not reaper.is_marked(proc.pid, reaper.EXEC_MARKER, "one")
    assert not reaper.is_marked(2 ** 22 + 1, reaper.ENV_MARKER, "one")  # no such process
