"""Finding and killing an environment's processes without cgroups.

Every process gestvenv starts carries ``GESTVENV_ENV_ID`` (and ``GESTVENV_EXEC_ID`` per command) in
its environment, which its descendants inherit, even those that left the process group with
setsid() or were reparented to init. Reading /proc/PID/environ finds them all.
"""

from __future__ import annotations

import os
import signal
import time

ENV_MARKER = "GESTVENV_ENV_ID"
EXEC_MARKER = "GESTVENV_EXEC_ID"


def marked_pids(key: str, value: str) -> list[int]:
    """PIDs whose initial environment has ``key=value`` (only processes we may read)."""
    needle = f"{key}={value}".encode()
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if needle in data.split(b"\0"):
            found.append(pid)
    return found


def kill_marked(key: str, value: str, *, passes: int = 50) -> int:
    """SIGKILL every process marked ``key=value`` until none is left; return how many were hit.

    Several passes because a process may fork while we kill its parent.
    """
    killed: set[int] = set()
    for _ in range(passes):
        pids = [p for p in marked_pids(key, value) if not _is_zombie(p)]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    return len(killed)


def pipe_ids(pid: int) -> set[str]:
    """The pipes behind ``pid``'s stdout and stderr, as /proc shows them ("pipe:[INODE]")."""
    ids = set()
    for fd in (1, 2):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            ids.add(target)
    return ids


def kill_pipe_holders(pipes: set[str]) -> int:
    """SIGKILL every process (but us) that holds one of ``pipes`` open."""
    if not pipes:
        return 0
    me = os.getpid()
    killed = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry.name}/fd/{fd}") in pipes:
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed += 1
                    break
            except OSError:
                continue
    return killed


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state follows the command name, which is in parentheses and may contain spaces.
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True
