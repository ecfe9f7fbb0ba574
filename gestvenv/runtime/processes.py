"""Finding and killing an environment's processes without cgroups.

Every process gestvenv starts carries ``GESTVENV_ENV_ID`` (and ``GESTVENV_EXEC_ID`` per command) in
its environment, which its descendants inherit, even those that left the process group with
setsid() or were reparented to init. Reading /proc/PID/environ finds them all.
"""

from __future__ import annotations

import os
import signal
import subprocess

from ..reaper import (  # shared with the env unit's stop action (stdlib only)
    ENV_MARKER,
    EXEC_MARKER,
    is_zombie,
    kill_marked,
    marked_pids,
    marked_pids_of,
)

__all__ = ["ENV_MARKER", "EXEC_MARKER", "is_zombie", "kill_marked", "marked_pids",
           "marked_pids_of"]


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


def spawn_detached(argv: list[str], env: dict[str, str]) -> None:
    """Start ``argv`` outside our process tree, through sh's "&": not our child (no zombie),
    it outlives us. ``env`` is added to ours, without the markers of the env we may run in."""
    environ = {k: v for k, v in os.environ.items() if k not in (ENV_MARKER, EXEC_MARKER)}
    subprocess.run(["/bin/sh", "-c", 'exec "$@" </dev/null >/dev/null 2>&1 &', "sh", *argv],
                   env={**environ, **env}, check=True, start_new_session=True)
