"""The kill paths (an env's reap, a command's timeout) kill what a scan of /proc found, each
PID checked again once a pidfd pins it: a PID that ended and was reused since the scan is
another process, which lives on. Real processes; the scan is made to return a bystander, as
a reused PID would look to it."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
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
    # Popen returns at the exec, before the new program's environment is set up: read empty.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/environ", "rb") as f:
            if f.read():
                break
        time.sleep(0.01)
    return proc


def ended(proc: subprocess.Popen[bytes], within: float = 5.0) -> bool:
    try:
        proc.wait(within)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_kill_marked_kills_the_marked_and_only_them(
        spawned: list[subprocess.Popen[bytes]]) -> None:
    marked = [start(spawned, {reaper.ENV_MARKER: "envA"}) for _ in range(3)]
    bystander = start(spawned, {reaper.ENV_MARKER: "envB"})
    unmarked = start(spawned)
    assert reaper.kill_marked(reaper.ENV_MARKER, "envA") == 3
    assert all(ended(proc) and proc.returncode == -9 for proc in marked)
    assert not ended(bystander, 0.2) and not ended(unmarked, 0.01)


def test_a_walk_looks_at_a_process_only_once_it_is_pinned(
        spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The look and the kill are of the same process: nothing is looked at between a scan
    and a kill without a pidfd holding it (a PID reused there would be another process)."""
    marked = start(spawned, {reaper.ENV_MARKER: "envA"})
    pinned: set[int] = set()
    looked_unpinned: list[int] = []
    opened = os.pidfd_open

    def pidfd_open(pid: int, flags: int = 0) -> int:
        pinned.add(pid)
        return opened(pid, flags)


    def reading(path: str, *args: object, **kwargs: object) -> object:
        parts = str(path).split("/")
        if len(parts) == 4 and parts[1] == "proc" and parts[2].isdigit() and \
                parts[3] == "environ" and int(parts[2]) not in pinned:
            looked_unpinned.append(int(parts[2]))
        return open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    monkeypatch.setattr(reaper, "open", reading, raising=False)  # (the module's open())
    assert reaper.kill_marked(reaper.ENV_MARKER, "envA") == 1
    assert ended(marked)
    assert looked_unpinned == []


def test_kill_pipe_holders_kills_the_holders_and_only_them(
        spawned: list[subprocess.Popen[bytes]]) -> None:
    holder = start(spawned, stdout=subprocess.PIPE)
    bystander = start(spawned)
    pipes = processes.pipe_ids(holder.pid)
    assert pipes
    assert processes.kill_pipe_holders(pipes) == 1
    assert ended(holder)
    assert not ended(bystander, 0.2)
    assert processes.kill_pipe_holders(set()) == 0


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
    assert not ended(proc, 0.2)
    assert reaper.kill_checked(proc.pid, lambda pid: True) is True
    assert ended(proc) and proc.returncode == -9
    assert reaper.kill_checked(2 ** 22 + 1, lambda pid: True) is False  # no such process


def test_no_descriptor_left_is_an_error_not_a_no(
        spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that cannot look (EMFILE) must not pass for "not ours": the kill would skip
    the process and say nothing."""
    proc = start(spawned, {reaper.ENV_MARKER: "envA"})

    def no_fd(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pidfd_open", no_fd)
    with pytest.raises(OSError, match="Too many open files"):
        reaper.kill_marked(reaper.ENV_MARKER, "envA")
    monkeypatch.undo()
    real_open = open

    def no_fd_for_environ(path: str, *args: object, **kwargs: object) -> object:
        if str(path).endswith("/environ"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(reaper, "open", no_fd_for_environ, raising=False)
    with pytest.raises(OSError, match="Too many open files"):
        reaper.kill_marked(reaper.ENV_MARKER, "envA")
    assert not ended(proc, 0.1)


@pytest.mark.parametrize("error", [errno.ENOSYS, errno.EPERM])
def test_without_pidfds_it_checks_then_kills(
        error: int, spawned: list[subprocess.Popen[bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No pidfd_open (an old kernel), or refused (a seccomp filter that predates it answers
    EPERM): the check, then kill(2), as before pidfds; never "not ours"."""
    proc = start(spawned)

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    assert reaper.kill_checked(proc.pid, lambda pid: False) is False
    assert not ended(proc, 0.2)
    assert reaper.kill_checked(proc.pid, lambda pid: True) is True
    assert ended(proc) and proc.returncode == -9


def test_a_refused_pidfd_signal_falls_back_to_kill(
        spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A filter that allows pidfd_open but refuses pidfd_send_signal: still killed, and
    nothing new is raised out of the kill paths."""
    proc = start(spawned, {reaper.ENV_MARKER: "envA"})

    def refused(handle: int, sig: int, siginfo: object = None, flags: int = 0) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(signal, "pidfd_send_signal", refused)
    assert reaper.kill_marked(reaper.ENV_MARKER, "envA") == 1
    assert ended(proc) and proc.returncode == -9


def test_pidfd_pid_names_the_pinned_process_until_it_ends(
        spawned: list[subprocess.Popen[bytes]]) -> None:
    proc = start(spawned)
    handle = os.pidfd_open(proc.pid)
    try:
        assert reaper.pidfd_pid(handle) == proc.pid
        proc.kill()
        proc.wait()
        assert reaper.pidfd_pid(handle) in (-1, None)  # (-1 from Linux 5.?, older: not said)
        # Ended, and /proc said so: a process that took its PID meanwhile is not killed.
        assert reaper.kill_checked(proc.pid, lambda pid: True) is False
    finally:
        os.close(handle)


def test_is_marked(spawned: list[subprocess.Popen[bytes]]) -> None:
    proc = start(spawned, {reaper.ENV_MARKER: "one"})
    assert reaper.is_marked(proc.pid, reaper.ENV_MARKER, "one")
    assert not reaper.is_marked(proc.pid, reaper.ENV_MARKER, "on")
    assert not reaper.is_marked(proc.pid, reaper.EXEC_MARKER, "one")
    assert not reaper.is_marked(2 ** 22 + 1, reaper.ENV_MARKER, "one")  # no such process


def test_kill_marked_returns_once_what_it_killed_has_exited(
        spawned: list[subprocess.Popen[bytes]]) -> None:
    """A SIGKILLed process holds its mounts, namespaces and memory until it is through exit():
    a big one takes a while to free its memory. Each is a zombie (our child, not yet reaped)
    by the time kill_marked returns."""
    big = [sys.executable, "-c", "import time; b = bytearray(400 << 20); time.sleep(60)"]
    procs = []
    for _ in range(2):
        proc = subprocess.Popen(big, env={**os.environ, reaper.ENV_MARKER: "envBig"})
        spawned.append(proc)
        procs.append(proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(
            _rss_mb(proc.pid) > 350 for proc in procs):
        time.sleep(0.05)
    assert reaper.kill_marked(reaper.ENV_MARKER, "envBig") == 2
    assert [reaper.is_zombie(proc.pid) for proc in procs] == [True, True]


def _rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) >> 10
    return 0


def test_wait_exited_gives_up_at_its_timeout_and_closes_every_pidfd(
        spawned: list[subprocess.Popen[bytes]]) -> None:
    alive, dead = start(spawned), start(spawned)
    dead.kill()
    handles = [os.pidfd_open(alive.pid), os.pidfd_open(dead.pid)]
    started = time.monotonic()
    assert reaper.wait_exited(handles, timeout=0.3) == 1
    assert 0.25 < time.monotonic() - started < 2
    for handle in handles:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(handle)


# A Python of its own, its fd limit lowered to 64 (lowering needs no privilege), with
# ``spawn(n, value)``: n `sleep`s marked ``value``, all killed at the end whatever happened;
# ``sigkilled()``: how many of them SIGKILL ended.
UNDER_FD_LIMIT = """\
import os, resource, subprocess, threading
from gestvenv import reaper
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
MARK = reaper.ENV_MARKER
procs = []
def spawn(n, value):
    env = {**os.environ, MARK: value}
    procs.extend(subprocess.Popen(["sleep", "60"], env=env, close_fds=True) for _ in range(n))
def sigkilled():
    return sum(proc.wait(10) == -9 for proc in procs)
try:
BODY
finally:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
"""


def under_fd_limit(body: str) -> list[str]:
    """What ``body`` prints, run under :data:`UNDER_FD_LIMIT`, split in words."""
    script = UNDER_FD_LIMIT.replace("BODY", textwrap.indent(textwrap.dedent(body), "    "))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True).stdout.split()


def test_a_kill_of_more_processes_than_the_fd_limit_kills_them_all() -> None:
    """The pidfds kept for the wait are capped under the fd limit: the walk still opens each
    process's files to look at it (a fork bomb's thousands, under a limit of 1024)."""
    out = under_fd_limit("""
        spawn(150, "envMany")
        print(reaper.kill_marked(MARK, "envMany"), sigkilled())
    """)
    assert out == ["150", "150"], out


def test_concurrent_kills_of_more_processes_than_the_fd_limit_kill_them_all() -> None:
    """The pidfds kept for the waits are one budget for all of a process's threads (an API
    service's kills run at once in worker threads)."""
    out = under_fd_limit("""
        for n in range(5):
            spawn(40, f"env{n}")
        killed, errors = [], []
        def kill(n):
            try:
                killed.append(reaper.kill_marked(MARK, f"env{n}"))
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=kill, args=(n,)) for n in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(sum(killed), sigkilled(), errors)
    """)
    assert out == ["200", "200", "[]"], out


def test_a_process_whose_main_thread_exited_is_still_found_and_killed(
        spawned: list[subprocess.Popen[bytes]]) -> None:
    """Its main thread gone (pthread_exit), another running on: /proc shows it as a zombie
    with an empty environ and no fds, yet it runs. Seen through its live thread."""
    script = ("import ctypes, threading, time\n"
              "threading.Thread(target=time.sleep, args=(60,)).start()\n"
              "time.sleep(0.2)\n"
              "ctypes.CDLL(None).pthread_exit(None)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            env={**os.environ, reaper.ENV_MARKER: "envThreads"})
    spawned.append(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and reaper.proc_dirs(proc.pid) == [f"/proc/{proc.pid}"]:
        time.sleep(0.02)
    assert len(reaper.proc_dirs(proc.pid)) == 2, "its main thread did not exit"
    assert not reaper.is_zombie(proc.pid)
    assert reaper.is_marked(proc.pid, reaper.ENV_MARKER, "envThreads")
    assert proc.stdout is not None
    its_stdout = {os.readlink(f"/proc/self/fd/{proc.stdout.fileno()}")}  # (one pipe, 2 ends)
    assert processes.pipe_holders(its_stdout) == {proc.pid}
    assert reaper.kill_marked(reaper.ENV_MARKER, "envThreads") == 1
    assert ended(proc) and proc.returncode == -9


def test_a_kill_in_a_process_short_of_descriptors_still_kills_them_all() -> None:
    """Most of the fd limit already in use: the walk gives back the pidfds it keeps and goes
    on, and kills every process (the walk used to raise at the first EMFILE and leave the
    rest running)."""
    out = under_fd_limit("""
        spawn(40, "envShort")
        held = [os.open("/dev/null", os.O_RDONLY)
                for _ in range(56 - len(os.listdir("/proc/self/fd")))]
        try:
            killed = reaper.kill_marked(MARK, "envShort")
        except OSError as exc:
            killed = repr(exc)
        print(killed, sigkilled())
    """)
    assert out[-1] == "40", out


def test_a_signal_reaches_a_process_whose_main_thread_exited(
        spawned: list[subprocess.Popen[bytes]]) -> None:
    script = ("import ctypes, threading, time\n"
              "threading.Thread(target=time.sleep, args=(60,)).start()\n"
              "time.sleep(0.2)\n"
              "ctypes.CDLL(None).pthread_exit(None)\n")
    proc = subprocess.Popen([sys.executable, "-c", script],
                            env={**os.environ, reaper.EXEC_MARKER: "execThreads"})
    spawned.append(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(reaper.proc_dirs(proc.pid)) == 1:
        time.sleep(0.02)
    assert processes.signal_command("execThreads", set(), signal.SIGTERM) == (1, 0)
    assert ended(proc) and proc.returncode == -signal.SIGTERM


def test_an_idle_check_that_cannot_look_counts_the_env_busy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Never ended as idle on a look that failed (no descriptor left)."""
    from types import SimpleNamespace

    from gestvenv import cleanup

    def short(key: str, value: str) -> list[int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(processes, "marked_pids", short)
    assert cleanup._busy(SimpleNamespace(id="x")) is True  # type: ignore[arg-type]
    monkeypatch.setattr(processes, "marked_pids", lambda key, value: [])
    assert cleanup._busy(SimpleNamespace(id="x")) is False  # type: ignore[arg-type]
