"""Finding and killing an environment's processes without cgroups.

Every process gestvenv starts carries ``GESTVENV_ENV_ID`` (and ``GESTVENV_EXEC_ID`` per command) in
its environment, which its descendants inherit, even those that left the process group with
setsid() or were reparented to init. Reading /proc/PID/environ finds them all.
"""

from __future__ import annotations

import errno
import functools
import os
import subprocess
from collections.abc import Sequence

from ..reaper import (  # shared with the env unit's stop action (stdlib only)
    ENV_MARKER,
    EXEC_MARKER,
    OUT_OF_FDS,
    Exits,
    is_marked,
    is_zombie,
    kill_checked,
    kill_marked,
    kill_where,
    marked_pids,
    marked_pids_of,
    read_live,
    read_proc,
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
    return {int(entry.name) for entry in os.scandir("/proc")
            if entry.name.isdigit() and int(entry.name) != me and _holds(int(entry.name), pipes)}


def kill_pipe_holders(pipes: set[str]) -> int:
    """SIGKILL every process (but us) that holds one of ``pipes`` open, each pinned by a pidfd
    before it is looked at (:func:`~gestvenv.reaper.kill_checked`: a PID reused meanwhile is
    another process); returns once they have exited."""
    if not pipes:
        return 0
    with Exits() as exiting:
        # (a holder not ours to kill is passed over, as before)
        killed = kill_where(lambda pid: _holds(pid, pipes), exiting=exiting, skip_refused=True)
        exiting.wait()
    return len(killed)


# The engine's helpers between its exec and the command (its monitor, its OCI runtime while
# it sets the process up): told by name, as gestvenv starts none of them itself.
ENGINE_HELPERS = frozenset({"conmon", "runc", "crun"})


def is_wrapper(pid: int, ppid: int, exe: str, argv: Sequence[bytes], launcher: int | None,
               init: bytes, parent_exe: str = "") -> bool:
    """Whether a process of a command's tree is a wrapper of it rather than the command (a
    signal is the command's to handle; USR1 to bwrap would end it): the process gestvenv
    started when it is not the command itself (``launcher``: bwrap, the engine's ``exec``),
    bwrap's own pid 1 (a bwrap child of it) and what it forks on the way to the init (a bwrap
    or setpriv child of a bwrap), the sandbox's init (``python -c INIT``, :data:`bwrap.INIT`,
    which forks the command and reports its status), the engine's helpers.
    By pid where gestvenv knows it: a command that is itself named bwrap or docker is the
    command."""
    # bwrap's pid 1, and what it forks on the way to the init: a bwrap not yet exec'd, the
    # setpriv that drops to the env's uid (bwrap ... -- setpriv ... python INIT).
    chain = os.path.basename(exe) in ("bwrap", "setpriv")
    if launcher is not None and (pid == launcher or (chain and ppid == launcher) or
                                 (chain and os.path.basename(parent_exe) == "bwrap")):
        return True
    # (the engine's helpers only behind an engine's exec: a bare command named runc is one)
    return (launcher is not None and os.path.basename(exe) in ENGINE_HELPERS) or init in argv


def _identity(pid: int) -> tuple[int, str, list[bytes]] | None:
    """(ppid, executable, argv) of ``pid``, as /proc says now; None if unreadable or if it
    is exec'ing:
    - its executable read before and after differ: its argv may be the old program's
      (bwrap's child becoming the sandbox's init was taken for the command);
    - no argument area at all (0 bytes; a process always has one, ``""`` even for an empty
      argv since Linux 5.18). In execve the new image's executable shows as soon as its
      memory is switched, and its argv only once the loader has set it up: the sandbox's
      init, caught there under CI load, was taken for the command (its argv did not say
      INIT yet) and a signal sent before the command ran killed it (status 143, no report).
      (A zombie or a kernel thread reads so too: neither is a command's to signal.)"""
    exe = _exe(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
    # (through a live thread if its main thread has exited: its own dir reads empty then)
    raw = read_live(pid, functools.partial(read_proc, name="cmdline"))
    if not raw or _exe(pid) != exe:
        return None
    return ppid, exe, raw.split(b"\0")


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _holds(pid: int, pipes: set[str]) -> bool:
    """Whether ``pid`` holds one of ``pipes`` open (seen through a live thread of it if its
    main thread has exited while others run on: its own fd/ is empty then). Running out of
    descriptors raises: it must not pass for "no"."""
    return not pipes.isdisjoint(read_live(pid, _open_files) or [])


def _open_files(where: str) -> list[str] | None:
    """What the fds in ``where``/fd point to ("pipe:[INODE]", paths); None if refused."""
    try:
        fds = os.listdir(f"{where}/fd")
    except OSError as exc:
        if exc.errno in OUT_OF_FDS:
            raise
        return None if exc.errno == errno.EACCES else []
    targets = []
    for fd in fds:
        try:
            targets.append(os.readlink(f"{where}/fd/{fd}"))
        except OSError as exc:
            if exc.errno in OUT_OF_FDS:
                raise
    return targets


def signal_command(exec_id: str, pipes: set[str], signum: int,
                   launcher: int | None = None) -> tuple[int, int]:
    """Send ``signum`` once to a command's processes: those marked with its ``exec_id`` and
    those holding its output ``pipes`` (as :func:`kill_marked` and :func:`kill_pipe_holders`
    find them to end it), but its wrappers (:func:`is_wrapper`). Each is signalled through a
    pidfd opened first and checked again: a PID found by the scan and reused meanwhile (the
    command's code can end its processes, and slow the scan, at will) is another process,
    never signalled (:func:`~gestvenv.reaper.kill_checked`, with its fallbacks). Returns
    (signalled, refused: EPERM, as a rootless container's processes under subordinate
    uids)."""
    from .bwrap import INIT

    init = INIT.encode()
    pids = {p for p in marked_pids(EXEC_MARKER, exec_id) if not is_zombie(p)}
    pids |= {p for p in pipe_holders(pipes) if not is_zombie(p)}

    def the_command_s(pid: int) -> bool:
        seen = _identity(pid)
        if seen is None:
            return False
        ppid, exe, argv = seen
        # (is_marked: also through a live thread, if its main thread has exited)
        return (is_marked(pid, EXEC_MARKER, exec_id) or _holds(pid, pipes)) and \
            not is_wrapper(pid, ppid, exe, argv, launcher, init, _exe(ppid))

    sent = refused = 0
    for pid in sorted(pids):
        try:
            sent += kill_checked(pid, the_command_s, signum)
        except PermissionError:
            refused += 1
    return sent, refused


def spawn_detached(argv: list[str], env: dict[str, str]) -> None:
    """Start ``argv`` outside our process tree, through sh's "&": not our child (no zombie),
    it outlives us. ``env`` is added to ours, without the markers of the env we may run in."""
    environ = {k: v for k, v in os.environ.items() if k not in (ENV_MARKER, EXEC_MARKER)}
    subprocess.run(["/bin/sh", "-c", 'exec "$@" </dev/null >/dev/null 2>&1 &', "sh", *argv],
                   env={**environ, **env}, check=True, start_new_session=True)
