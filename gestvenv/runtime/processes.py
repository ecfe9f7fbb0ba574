"""Finding and killing an environment's processes without cgroups.

Every process gestvenv starts carries ``GESTVENV_ENV_ID`` (and ``GESTVENV_EXEC_ID`` per command) in
its environment, which its descendants inherit, even those that left the process group with
setsid() or were reparented to init. Reading /proc/PID/environ finds them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence

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


def pipe_holders(pipes: set[str]) -> set[int]:
    """The processes (but us) that hold one of ``pipes`` open."""
    if not pipes:
        return set()
    me = os.getpid()
    found = set()
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
                    found.add(int(entry.name))
                    break
            except OSError:
                continue
    return found


def kill_pipe_holders(pipes: set[str]) -> int:
    """SIGKILL every process (but us) that holds one of ``pipes`` open."""
    killed = 0
    for pid in pipe_holders(pipes):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            continue
    return killed


# What runs a command without being it: the sandbox (bwrap, and its pid 1), the engine's CLI
# and monitor of a container's exec. They carry the command's marker and hold its pipes.
WRAPPERS = frozenset({"bwrap", "podman", "docker", "conmon"})


def is_wrapper(exe: str, argv: Sequence[bytes], init: bytes) -> bool:
    """Whether a process of a command's tree is a wrapper of it rather than the command: by
    its executable, or the sandbox's init (``python -c INIT``, :data:`bwrap.INIT`), which
    forks the command and reports its status (a TERM to it would orphan the command)."""
    return os.path.basename(exe) in WRAPPERS or init in argv


def _identity(pid: int) -> tuple[str, list[bytes]]:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        argv = []
    return exe, argv


def signal_command(exec_id: str, pipes: set[str], signum: int) -> tuple[int, int]:
    """Send ``signum`` once to a command's processes: those marked with its ``exec_id`` and
    those holding its output ``pipes`` (as :func:`kill_marked` and :func:`kill_pipe_holders`
    find them to end it), but its wrappers (:func:`is_wrapper`): a signal is the command's to
    handle, and USR1 to bwrap would end it. Returns (signalled, refused: EPERM, as a rootless
    container's processes under subordinate uids)."""
    from .bwrap import INIT

    init = INIT.encode()
    pids = {p for p in marked_pids(EXEC_MARKER, exec_id) if not is_zombie(p)}
    pids |= {p for p in pipe_holders(pipes) if not is_zombie(p)}
    sent = refused = 0
    for pid in sorted(pids):
        if is_wrapper(*_identity(pid), init):
            continue
        try:
            os.kill(pid, signum)
            sent += 1
        except PermissionError:
            refused += 1
        except ProcessLookupError:
            continue
    return sent, refused


def spawn_detached(argv: list[str], env: dict[str, str]) -> None:
    """Start ``argv`` outside our process tree, through sh's "&": not our child (no zombie),
    it outlives us. ``env`` is added to ours, without the markers of the env we may run in."""
    environ = {k: v for k, v in os.environ.items() if k not in (ENV_MARKER, EXEC_MARKER)}
    subprocess.run(["/bin/sh", "-c", 'exec "$@" </dev/null >/dev/null 2>&1 &', "sh", *argv],
                   env={**environ, **env}, check=True, start_new_session=True)
