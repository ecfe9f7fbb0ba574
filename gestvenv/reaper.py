"""The reaper: the only code that deletes an environment, also run by the env's systemd unit.

Under the systemd runtime an environment's own unit runs it as its stop action
(``ExecStopPost=``, privileged so that it sees the host's filesystem, not the unit's private
/tmp), so an environment's files go whenever its unit stops, whoever stops it (its TTL, its
holder for a dead creator or idleness, ``systemctl stop``, a cleanup, a shutdown)::

    python -I -S -B reaper.py PATH ENV_ID STATE_FILE REGISTRY_LOCK [SLICE_CGROUP]

It kills what is left of the environment outside its units (a builder or installer whose
creator died: they carry its marker), says what the environment used (its peak memory and CPU
time, from its slice's cgroup, and its disk), deletes ``PATH`` and forgets the environment (its
state file, if it still names this environment). ``PATH`` comes from the unit's command
line, written when the unit was made, never from the state file: a tampered state file cannot
point it elsewhere. It deletes only a dir named ``<name>-<id[:8]>`` directly inside a storage
root that carries gestvenv's mark, never follows a symlink, never descends into a mount.

Standard library only: the unit runs this file with the base interpreter in isolated mode,
where gestvenv's dependencies are not importable; :mod:`gestvenv.storage` and
:mod:`gestvenv.runtime.processes` import it as a module.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import re
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    from .exceptions import UnsafePathError
except ImportError:  # run as a file by a unit (no package): the same name, for the same uses
    class UnsafePathError(Exception):  # type: ignore[no-redef]
        """A path gestvenv refuses to delete."""

ROOT_MARK = ".gestvenv-root"
CLAIM = ".gestvenv-env"  # in an env's dir: its id and state file (see gestvenv.storage)
ENV_MARKER = "GESTVENV_ENV_ID"  # in the environment of every process gestvenv starts for an env
EXEC_MARKER = "GESTVENV_EXEC_ID"
# In the environment of a container env's reaper (its unit's, its holder's): the engine's CLI.
CONTAINER_ENGINE = "GESTVENV_CONTAINER_ENGINE"
CONTAINER_LABEL = "io.gestvenv.env-id"  # (gestvenv.container.engine.LABEL_ID)
# Deleting never goes below a mount point: umount2(MNT_DETACH) first, or refuse.
_MNT_DETACH = 2
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


# --- processes ---

def remove_containers(env_id: str, engine: str | None = None) -> int:
    """Kill and remove every container labelled with this env's id, through the engine's CLI
    (``$GESTVENV_CONTAINER_ENGINE`` by default; nothing without one). A container that is not
    labelled so is never touched."""
    engine = engine or os.environ.get(CONTAINER_ENGINE)
    if not engine or not env_id:
        return 0
    import subprocess
    try:
        found = subprocess.run(
            [engine, "ps", "-a", "-q", "--no-trunc", "--filter",
             f"label={CONTAINER_LABEL}={env_id}"], capture_output=True, text=True,
            timeout=60, stdin=subprocess.DEVNULL, check=False).stdout.split()
        if found:
            # (podman's --ignore: without it podman 4.3 removes none if one is already gone)
            force = ["--force", "--ignore", "--time", "0"] \
                if os.path.basename(engine) == "podman" else ["--force"]
            # (What went: the engine names each container it removed.)
            found = subprocess.run([engine, "rm", *force, *found], capture_output=True,
                                   text=True, timeout=120, stdin=subprocess.DEVNULL,
                                   check=False).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return 0
    return len(found)


def marked_pids(key: str, value: str) -> list[int]:
    """PIDs whose initial environment has ``key=value`` (only processes we may read)."""
    return marked_pids_of(key, {value}).get(value, [])


def marked_pids_of(key: str, values: set[str]) -> dict[str, list[int]]:
    """For each of ``values``, the PIDs whose initial environment has ``key=value``: one walk
    of /proc for many environments (only processes we may read)."""
    me = os.getpid()
    found: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        value = _marker(_environ(int(entry.name)), key)
        if value is not None and value in values:
            found.setdefault(value, []).append(int(entry.name))
    return found


def is_marked(pid: int, key: str, value: str) -> bool:
    """Whether ``pid``'s initial environment has ``key=value`` now (as :func:`marked_pids_of`
    reads it: the first definition of ``key``)."""
    return _marker(_environ(pid), key) == value


def _marker(environ: bytes, key: str) -> str | None:
    prefix = f"{key}=".encode()
    for var in environ.split(b"\0"):
        if var.startswith(prefix):  # (the first definition is the one getenv() sees)
            return var[len(prefix):].decode(errors="replace")
    return None


# Running out of descriptors must not read as "not ours": a kill would skip the process.
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)


def _environ(pid: int) -> bytes:
    """``pid``'s initial environment (empty if unreadable), through a live thread of it if its
    main thread has exited while others run on (the process then reads as a zombie, its own
    environ as empty or gone, and it would escape a kill)."""
    return read_live(pid, functools.partial(read_proc, name="environ")) or b""


TYPE_CHECKING = False  # (typing costs ~2 ms at each start of a unit's stop action)
if TYPE_CHECKING:
    from typing import TypeVar

    Read = TypeVar("Read", bytes, list[str])


def read_live(pid: int, read: Callable[[str], Read | None]) -> Read | None:
    """``read`` of /proc/PID, or, if that is empty (a kernel thread, a zombie, or a process
    whose main thread has exited while others run on), of a live thread's task dir. None
    (refused: its threads' would be too) is final."""
    got = read(f"/proc/{pid}")
    if got is None or got:
        return got
    for where in proc_dirs(pid)[1:]:
        return read(where)
    return got


def read_proc(where: str, name: str) -> bytes | None:
    """What ``where``/``name`` (/proc/PID or a task dir) holds; b"" if gone or empty, None if
    refused (EACCES)."""
    try:
        with open(f"{where}/{name}", "rb") as f:
            return f.read()
    except OSError as exc:
        if exc.errno in OUT_OF_FDS:
            raise
        return None if exc.errno == errno.EACCES else b""


def proc_dirs(pid: int) -> list[str]:
    """Where /proc shows ``pid``'s process: its own dir, and, if its main thread has exited
    while others run on, a live thread's (task/TID)."""
    own = f"/proc/{pid}"
    try:
        # (task/'s link count is 2 + its threads: one thread, and it cannot be that case)
        if os.stat(f"{own}/task").st_nlink <= 3 or _state(own) != b"Z":
            return [own]
        tasks = [t for t in os.listdir(f"{own}/task") if t != str(pid)]
    except OSError as exc:
        if exc.errno in OUT_OF_FDS:
            raise
        return [own]
    for task in tasks:  # (the first live one: a process may have thousands)
        if _state(f"{own}/task/{task}") not in (b"Z", b"X", None):
            return [own, f"{own}/task/{task}"]
    return [own]


def _state(where: str) -> bytes | None:
    """The state letter in ``where``/stat (None if unreadable: gone)."""
    try:
        with open(f"{where}/stat", "rb") as f:
            # The state follows the command name, which is in parentheses and may contain spaces.
            return f.read().rsplit(b")", 1)[1].split()[0]
    except OSError as exc:
        if exc.errno in OUT_OF_FDS:
            raise
        return None
    except IndexError:
        return None


def kill_checked(pid: int, still_ours: Callable[[int], bool], signum: int = signal.SIGKILL,
                 *, exiting: Exits | None = None) -> bool:
    """Send ``signum`` (SIGKILL) to ``pid`` if ``still_ours(pid)`` holds once a pidfd pins the
    process: whether it was sent.

    A PID read from /proc may have ended and been reused since (an environment's code ends its
    processes, and slows a scan, at will). Pinned first, then checked: if the pidfd's process
    ended before the check, a signal through it fails (ESRCH) whatever /proc shows; if it
    lives, /proc/PID is that process, unless this /proc is another PID namespace's, which the
    pidfd's own ``Pid:`` tells. Without pidfds (a kernel before 5.3, a seccomp filter that
    refuses them), checked then kill(2), as before them. EPERM from a process we may not
    signal propagates, as from kill(2), and so does running out of descriptors (EMFILE: a
    check that cannot look must not pass for "not ours"). With ``exiting``, the pidfd of a
    process it killed is kept there, to wait for its exit."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (OSError, AttributeError) as exc:
        if isinstance(exc, OSError) and exc.errno in OUT_OF_FDS:
            raise
        return still_ours(pid) and _kill(pid, signum)
    try:
        if not still_ours(pid) or pidfd_pid(handle) not in (pid, None):
            return False
        try:
            signal.pidfd_send_signal(handle, signum)
        except ProcessLookupError:
            return False
        except (OSError, AttributeError):  # (the call refused by a filter, or missing: kill(2),
            # which raises EPERM itself for a process we may not signal)
            if pidfd_pid(handle) not in (pid, None) or not _kill(pid, signum):
                return False
        if exiting is not None:
            kept, handle = handle, -1  # (never closed twice: kept's owner is Exits now)
            exiting.keep(kept)
        return True
    finally:
        if handle >= 0:
            os.close(handle)


def _kill(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


def pidfd_pid(handle: int) -> int | None:
    """The PID of a pidfd's process as this /proc numbers it (-1 once it has ended, 0 if it is
    not in this /proc's namespace); None if not said (an older kernel)."""
    try:
        with open(f"/proc/self/fdinfo/{handle}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# Seconds a kill waits, in all, for what it killed to have exited: a SIGKILLed process still
# holds its mounts, namespaces (a sandbox's: a DISK env's loop device goes with its last
# mount) and memory until it is through exit(), some milliseconds after the kill; one stuck
# in the kernel (D state) is not waited for longer.
EXIT_WAIT = 5.0
# Pidfds kept open for those waits, by all the threads of this process together, at most: 256,
# and a quarter of the fd limit (a fork bomb's thousands would take every fd, and a walk still
# opens each process's files to look at it). Past it, a kill makes room with those that have
# already exited, or waits for no more.
EXIT_WAIT_MAX = 256
_kept = 0
_kept_lock = threading.Lock()


def _budget() -> int:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return EXIT_WAIT_MAX if soft == resource.RLIM_INFINITY else min(EXIT_WAIT_MAX, soft // 4)


def _release(count: int) -> None:
    global _kept
    with _kept_lock:
        _kept -= count


def _close_kept(handles: list[int]) -> None:
    try:
        for handle in handles:
            os.close(handle)
    finally:
        _release(len(handles))


class Exits:
    """The pidfds of what one kill killed, kept to wait for their exit (:meth:`wait`), within
    one deadline and the budget the process's kills share; each closed once, by :meth:`wait`
    or :meth:`close`."""

    def __init__(self, timeout: float = EXIT_WAIT) -> None:
        self.deadline = time.monotonic() + timeout
        self.handles: list[int] = []

    def keep(self, handle: int) -> None:
        """Take ``handle`` (closed at once if it cannot be waited for). Never blocks: a walk
        goes on killing (what it killed may need another of them gone to exit); those that
        have already exited make room."""
        global _kept
        for attempt in range(2):
            with _kept_lock:
                if _kept < _budget() and time.monotonic() < self.deadline:
                    self.handles.append(handle)
                    _kept += 1
                    return
            if attempt == 0 and self.handles:
                self._reclaim()
        os.close(handle)

    def _reclaim(self) -> None:
        """Close the kept pidfds whose processes have already exited."""
        poller = select.poll()
        for handle in self.handles:
            poller.register(handle, select.POLLIN)
        done = {handle for handle, _ in poller.poll(0)}
        self.handles = [h for h in self.handles if h not in done]
        _close_kept(list(done))

    def wait(self) -> int:
        """Wait until each kept pidfd's process has exited (it polls ready then: its exit done,
        its namespaces and mounts released), until the deadline at most; close them. How many
        had not exited."""
        handles, self.handles = self.handles, []
        try:
            return wait_exited(handles, self.deadline - time.monotonic())
        finally:
            _release(len(handles))  # (once closed: the budget counts open descriptors)

    def close(self) -> None:
        handles, self.handles = self.handles, []
        _close_kept(handles)

    def __enter__(self) -> Exits:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def wait_exited(handles: list[int], timeout: float = EXIT_WAIT) -> int:
    """Wait until each pidfd's process has exited, ``timeout`` seconds at most; close them all.
    How many had not exited."""
    try:
        poller = select.poll()
        left = set(handles)
        for handle in left:
            poller.register(handle, select.POLLIN)
        deadline = time.monotonic() + timeout
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for handle, _ in poller.poll(remaining * 1000):
                poller.unregister(handle)
                left.discard(handle)
        return len(left)
    finally:
        for handle in handles:
            os.close(handle)


def kill_where(still_ours: Callable[[int], bool], *, exiting: Exits | None = None,
               skip_refused: bool = False) -> set[int]:
    """One walk of /proc: SIGKILL each process (but us) for which ``still_ours`` holds, each
    pinned before it is looked at (:func:`kill_checked`), so that the look and the kill are of
    the same process. The PIDs killed. Short of descriptors, it gives back the pidfds it
    keeps and tries again; still short, it goes on with the others and raises at the end.
    A process we may not signal raises (EPERM), or with ``skip_refused`` is passed over."""
    me = os.getpid()
    killed = set()
    short: OSError | None = None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        for attempt in range(2):
            try:
                if kill_checked(int(entry.name), still_ours, exiting=exiting):
                    killed.add(int(entry.name))
                break
            except PermissionError:
                if not skip_refused:
                    raise
                break
            except OSError as exc:
                if exc.errno not in OUT_OF_FDS:
                    raise
                if attempt == 0 and exiting is not None and exiting.handles:
                    exiting.wait()  # (our own pidfds back, then once more)
                    continue
                short = short or exc  # (the rest are still killed if they can be)
                break
    if short is not None:
        raise short
    return killed


def kill_marked(key: str, value: str, *, passes: int = 50) -> int:
    """SIGKILL every process marked ``key=value`` until none is left; return how many were hit.

    Several passes because a process may fork while we kill its parent; each pass waits for
    what it killed to have exited (:class:`Exits`, one deadline for all), so that the next
    sees only what is left, and so that, when this returns, they are gone for good.
    """
    killed: set[int] = set()
    seen: set[int] = set()  # (this pass's: killed, or gone as it was)

    def marked(pid: int) -> bool:
        if is_marked(pid, key, value) and not is_zombie(pid):
            seen.add(pid)
            return True
        return False

    with Exits() as exiting:
        for _ in range(passes):
            seen.clear()
            killed |= kill_where(marked, exiting=exiting)
            exiting.wait()
            if not seen:
                break
            time.sleep(0.001)
    return len(killed)


def is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie, or gone): not if its main thread has exited while
    others of it run on."""
    return all(_state(where) in (b"Z", b"X", None) for where in proc_dirs(pid))


def process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch, as psutil's ``create_time``: the
    boot time plus its start in clock ticks), None when it is gone or a zombie. With the PID,
    it names one process across PID reuse (a creator's ``owner_started``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):
            return None
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


# --- where deleting is allowed ---

def env_dir_name(stem: str, env_id: str) -> str:
    """The name of an environment's dir in its storage root: ``<unit stem>-<id[:8]>``, where
    the stem is the one its units run under (its name, or a pool unit's ``gvpool-<hex8>`` for
    an env that claimed one). The one rule: every other place asks this function."""
    return f"{stem}-{env_id[:8]}"


_STEM = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # a name (gestvenv.names) or a pool unit's stem
_ENV_DIR_RE = re.compile(_STEM + r"-[0-9a-f]{8}", re.ASCII)


def is_env_dir_name(name: str) -> bool:
    """Whether ``name`` is one :func:`env_dir_name` gives (for some stem and id): the only
    entries of a storage root a sweep may look at."""
    return _ENV_DIR_RE.fullmatch(name) is not None


def stem_of_env_dir(name: str, env_id: str) -> str | None:
    """The stem for which ``name`` is :func:`env_dir_name` (stem, ``env_id``); None when it is
    no such dir's name (another id, a short id, no valid stem)."""
    stem = name.removesuffix(env_dir_name("", env_id))
    if len(env_id) < 8 or stem == name or re.fullmatch(_STEM, stem, re.ASCII) is None:
        return None
    return stem


def names_env(state: object, env_id: str) -> bool:
    """Whether a state file's (or a pool file's) content still names the environment
    ``env_id``: a name is reused by the next environment, so the id in it says whose it is
    now. Every place that acts on an env through its file asks this (the holder keeps a copy
    of its own: it runs as a bare file, without this module, until it reaps)."""
    return bool(env_id) and isinstance(state, dict) and state.get("id") == env_id


POOL_DIR = "pool"  # <runtime dir>/pool/<stem>.json: the pool units' files (gestvenv.pool)
STATE_DIR = "envs"  # <runtime dir>/envs/<name>.json: the state files (gestvenv.registry)


def pool_claimed_state(pool_file: Path, env_id: str) -> Path | None:
    """The state file a pool unit's claim names, when ``pool_file`` is a pool file (in the
    runtime dir's ``pool/``) claimed for ``env_id``: only a file directly in the same runtime
    dir's ``envs/``, never anything outside gestvenv's own dirs. None otherwise."""
    if pool_file.parent.name != POOL_DIR:
        return None
    try:
        data = json.loads(pool_file.read_text())
        claim = data.get("claim") if isinstance(data, dict) else None
        if not names_env(data, env_id) or not isinstance(claim, dict):
            return None
        state = Path(str(claim["state_file"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    folder = Path(os.path.abspath(pool_file.parent.parent)) / STATE_DIR
    if Path(os.path.abspath(state)).parent != folder or not state.name.endswith(".json") \
            or state.name.startswith("."):
        return None
    return folder / state.name

def is_marked_root(path: Path) -> bool:
    """A storage root gestvenv made: it holds gestvenv's mark, a regular file of ours."""
    try:
        st = (path / ROOT_MARK).lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def _parent_is_a_root(path: Path, roots: list[Path]) -> None:
    """``path`` is a direct child of one of ``roots``; the parent is resolved (roots may sit
    behind symlinks like /var/run), the leaf never is."""
    if path.name in ("", ".", ".."):
        raise UnsafePathError(f"refusing to delete {path}: not an environment directory")
    parent = os.path.realpath(path.parent)
    if not any(parent == os.path.realpath(root) for root in roots):
        raise UnsafePathError(
            f"refusing to delete {path}: not directly inside gestvenv's storage roots "
            f"({', '.join(str(r) for r in roots)})"
        )


def check_inside_roots(path: Path, roots: list[Path]) -> Path:
    """Return ``path`` if it is a direct child of one of ``roots`` and not a symlink, else raise:
    a storage dir replaced by a link to elsewhere is refused instead of followed."""
    path = Path(os.path.abspath(path))
    _parent_is_a_root(path, roots)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return path
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(
            f"refusing to delete {path}: it is a symlink (to {os.readlink(path)})")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"refusing to delete {path}: not a directory")
    return path


# --- deleting ---

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\NNN; every other byte (UTF-8
    included) is given as is."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mountinfo() -> Iterator[tuple[str, str, str]]:
    """(device "MAJ:MIN", mount point, filesystem type) of each mount here, in order (the
    last one of a mount point is on top)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            yield fields[2], unescape_mountinfo(fields[4]), fields[fields.index("-") + 1]


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount ``path`` is on: the longest mount point
    that is ``path`` or one of its parents, after resolving links."""
    real, best, fstype = os.path.realpath(path), "", ""
    for _, mnt, kind in mountinfo():
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, kind
    return best, fstype


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` (a real path), deepest first."""
    prefix = path.rstrip("/") + "/"
    found = [mnt for _, mnt, _ in mountinfo() if mnt == path or mnt.startswith(prefix)]
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path, roots: list[Path]) -> bool:
    """Delete an environment directory safely; return False if it did not exist.

    Never follows a symlink (every directory is opened with O_NOFOLLOW relative to its parent's
    descriptor), never descends into a mount (mounts found in mountinfo are detached first or the
    deletion is refused; a directory on another device met on the way is refused too), and
    copes with read-only directories. A storage dir replaced by a symlink: the link itself goes
    (it is an entry of gestvenv's root), what it points to is left alone, and it is reported.
    """
    path = Path(os.path.abspath(path))
    if os.path.islink(path):
        _parent_is_a_root(path, roots)
        target = os.readlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # unlink() never follows the link
        raise UnsafePathError(
            f"refusing to delete through {path}: it was a symlink to {target}; the link was "
            "removed, its target left alone")
    path = check_inside_roots(path, roots)
    if not path.exists():
        return False
    # Mount points are listed by real path: look where the path really is.
    real = os.path.join(os.path.realpath(path.parent), path.name)
    _unmount_all(real, str(path))
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _remove_at(parent_fd, path.name, os.fstat(parent_fd).st_dev, str(path))
    except FileNotFoundError:
        pass
    finally:
        os.close(parent_fd)
    return True


def _unmount_all(real: str, shown: str) -> None:
    """Unmount everything at or below ``real``, deepest first. A mount hidden under another
    (code in the env mounted over its overlay's parent) cannot be reached by its path until
    what covers it is gone: the passes go on while they make progress. Refused when one
    resists, since nothing is ever deleted through a mount."""
    left = mounts_under(real)
    while left:
        for mnt in left:
            unmount(mnt)
        now = mounts_under(real)
        if len(now) >= len(left):
            raise UnsafePathError(f"refusing to delete {shown}: {now[0]} is mounted inside it")
        left = now


def _remove_at(parent_fd: int, name: str, dev: int, shown: str) -> None:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        # An unreadable dir (mode 0o000): give it back to its owner, after checking it is a
        # directory and not a link (chmod with dir_fd cannot refuse links itself).
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise
        os.chmod(name, stat.S_IMODE(st.st_mode) | stat.S_IRWXU, dir_fd=parent_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        st = os.fstat(fd)
        if st.st_dev != dev:
            raise UnsafePathError(f"refusing to delete {shown}: a filesystem is mounted there")
        if st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)  # a read-only dir
        with os.scandir(fd) as entries:
            # The env's claim last: a deletion cut short still says whose dir it was, so the
            # next sweep finishes it instead of leaving an unclaimed dir alone.
            children = sorted(((e.name, e.is_dir(follow_symlinks=False)) for e in entries),
                              key=lambda child: child[0] == CLAIM)
        for child, is_dir in children:
            if is_dir:
                _remove_at(fd, child, dev, f"{shown}/{child}")
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def unmount(mnt: str) -> bool:
    """Unmount ``mnt``; True when nothing is mounted there any more (detached if busy)."""
    import ctypes  # only when a mount is met: it costs a few ms at every reaper's start

    libc = ctypes.CDLL(None, use_errno=True)
    loop = _autoclear_loop_of(mnt)
    # A plain unmount first: done, the filesystem (an env's cap, and its loop device) is gone
    # at once (its loop device a moment later: waited for). Busy (a process outside the env
    # still has a file or its cwd there): detached
    # all the same, so that nothing is ever deleted through it; the filesystem, and a cap's
    # loop device and image blocks, then last until that process lets go (docs/storage.md).
    if libc.umount2(mnt.encode(), 0) == 0:
        if loop is not None:
            _wait_loop_cleared(*loop)
        return True
    if ctypes.get_errno() == errno.EBUSY and libc.umount2(mnt.encode(), _MNT_DETACH) == 0:
        print(f"gestvenv: {mnt} was still in use: detached; what is mounted there lasts until "
              "the processes using it exit", file=sys.stderr, flush=True)
        return True
    # Not mounted, or gone with its dir: another reaper of the same env (its holder, during a
    # destroy) was first. Done, if mountinfo agrees.
    return ctypes.get_errno() in (errno.EINVAL, errno.ENOENT) and mnt not in mounts_under(mnt)


# Seconds an unmount waits for the loop device of the filesystem it unmounted to be cleared:
# the kernel clears an autoclear loop device after the unmount has returned (measured: up to
# ~10 ms under load), and an env is not over while its loop device is still attached.
LOOP_CLEAR_WAIT = 2.0


def _autoclear_loop_of(mnt: str) -> tuple[str, str, str] | None:
    """(device number "MAJ:MIN", loop device name, its backing file) if what is mounted at
    ``mnt`` (the topmost mount there) is on an autoclear loop device (an env's DISK cap:
    gestvenv.diskcap); else None. Told by the device number, not by the mount's source."""
    try:
        device = ([dev for dev, point, _ in mountinfo() if point == mnt] or [""])[-1]
        sys_dir = os.path.realpath(f"/sys/dev/block/{device}")
        name = os.path.basename(sys_dir)
        if not device or not name.startswith("loop"):
            return None
        with open(f"{sys_dir}/loop/autoclear") as f:
            if f.read().strip() != "1":
                return None
        with open(f"{sys_dir}/loop/backing_file") as f:
            return device, name, f.read().rstrip("\n")
    except (OSError, ValueError, IndexError):
        return None


def _wait_loop_cleared(device: str, name: str, backing: str,
                       timeout: float = LOOP_CLEAR_WAIT) -> bool:
    """Wait until loop device ``name`` no longer has ``backing`` (cleared, or already bound
    to another file by someone else), ``timeout`` seconds at most; whether it was. Not waited
    for, and said, while the same filesystem is still mounted elsewhere here (a bind mount):
    the device lasts as long as that mount."""
    try:  # (looked at once: the unmount that just returned is already out of mountinfo)
        still = [point for dev, point, _ in mountinfo() if dev == device]
    except (OSError, ValueError, IndexError):
        still = []
    deadline = time.monotonic() + timeout
    while not still:
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                if f.read().rstrip("\n") != backing:
                    return True
        except OSError:  # (no backing_file: cleared)
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    print(f"gestvenv: {name} ({backing}) is still attached"
          + (f": its filesystem is also mounted on {still[0]}" if still else
             f" {timeout:g} s after its unmount") + "; the kernel frees it when its "
          "last mount goes", file=sys.stderr, flush=True)
    return False


# --- what the environment used, said at its end ---

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNIT_NAME_MAX = 255


def escape_slice_part(name: str) -> str:
    """``-`` means nesting in a slice name, so it is escaped the way systemd-escape does."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_.:") else f"\\x{ord(c):02x}"
                   for c in name)


def env_slice_name(env_name: str) -> str:
    """The env's slice unit (``plan.UnitNames`` takes it from here): ``-`` escaped, hashed
    when too long (a name of many '-', each escaped to 4 chars)."""
    name = f"gestvenv-{escape_slice_part(env_name)}.slice"
    if len(name) > _UNIT_NAME_MAX:
        import hashlib

        name = f"gestvenv-h{hashlib.sha256(env_name.encode()).hexdigest()[:16]}.slice"
    return name


def own_cgroup() -> str:
    """This process's cgroup (the unified hierarchy's, else systemd's named v1 one)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return ""
    for prefix in ("0::", "1:name=systemd:"):
        for line in lines:
            if line.startswith(prefix):
                return line[len(prefix):]
    return ""


def slice_cgroup(env_name: str, cgroup: str) -> str | None:
    """The env's slice cgroup when ``cgroup`` (ours) is its env unit's, which sits beside it
    in gestvenv.slice (the holder, and the unit's stop action): None elsewhere (the local
    runtime's watchdog)."""
    parent, _, unit = cgroup.rstrip("/").rpartition("/")
    if unit != f"gestvenv-{env_name}.service":
        return None
    return f"{parent}/{env_slice_name(env_name)}"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def cgroup_cpu_seconds(cgroup: str, root: Path | None = None) -> float | None:
    """CPU time used by everything in ``cgroup``: cpu.stat's usage_usec on the unified
    hierarchy (``root`` on pure v2, its ``unified/`` on a hybrid host), else v1's cpuacct.usage
    (None: neither). Also gestvenv.runtime.systemd.cgroups' reading."""
    root = root or CGROUP_ROOT
    rel = cgroup.lstrip("/")
    unified = root if (root / "cgroup.controllers").exists() else root / "unified"
    try:
        for line in (unified / rel / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
    except (OSError, ValueError):
        pass
    usage = _read_int(root / "cpuacct" / rel / "cpuacct.usage")
    return None if usage is None else usage / 1e9


def cgroup_memory(cgroup: str, v2_name: str, v1_name: str,
                  root: Path | None = None) -> int | None:
    """A memory counter of ``cgroup``: ``v2_name`` on pure v2, else ``v1_name`` on the v1
    memory hierarchy (a hybrid host's unified one has no memory controller)."""
    root = root or CGROUP_ROOT
    rel = cgroup.lstrip("/")
    if (root / "cgroup.controllers").exists():
        return _read_int(root / rel / v2_name)
    return _read_int(root / "memory" / rel / v1_name)


def cgroup_figures(cgroup: str) -> tuple[int | None, float | None]:
    """Peak memory (bytes) and CPU time (s) of everything that ran in ``cgroup``: the
    kernel's own counters, kept for its whole life (memory.peak or, on a hybrid host's v1,
    memory.max_usage_in_bytes; cpu.stat or cpuacct.usage)."""
    return (cgroup_memory(cgroup, "memory.peak", "memory.max_usage_in_bytes"),
            cgroup_cpu_seconds(cgroup))


def disk_used(path: Path, deadline: float | None = None) -> int | None:
    """Bytes the env's dir holds: its own filesystem's use when it has one (O(1)), else the
    blocks of its files (each inode once, links not followed, mounts inside it not entered: an
    overlay's lower layer is a snapshot's, its upper one is in the dir); None if it cannot be
    read, or if the walk is still going at ``deadline`` (time.monotonic())."""
    try:
        if os.path.ismount(path):
            st = os.statvfs(path)
            return (st.f_blocks - st.f_bfree) * st.f_frsize
        seen: set[tuple[int, int]] = set()
        total = 0
        dev = os.lstat(path).st_dev
        for dirpath, dirnames, filenames in os.walk(path):
            if deadline is not None and time.monotonic() > deadline:
                return None
            for name in (*dirnames, *filenames):
                try:
                    info = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                if info.st_dev != dev:
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
        return total if seen or path.is_dir() else None
    except OSError:
        return None


END_REPORT_WALK = 0.2  # seconds the end report may walk an uncapped env's files


def human_bytes(n: int) -> str:
    """``n`` bytes for people (also the CLI's)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def end_report(path: Path, env_id: str, cgroup: str | None = None) -> str | None:
    """One phrase for the journal: what the env used over its life, as far as it can be read
    (``cgroup``: the env's slice, default: found beside this process's own cgroup)."""
    name = stem_of_env_dir(path.name, env_id) or path.name  # its units' stem
    if cgroup is None:
        cgroup = slice_cgroup(name, own_cgroup())
    parts = []
    if cgroup is not None:
        peak, cpu = cgroup_figures(cgroup)
        parts.append(f"peak memory {human_bytes(peak) if peak is not None else 'not measured'}")
        parts.append(f"CPU time {f'{cpu:.2f} s' if cpu is not None else 'not measured'}")
    # (A walk of a big tree is cut short: the stop action's time is the env's end's.)
    disk = disk_used(path, time.monotonic() + END_REPORT_WALK) \
        if path.is_dir() and not path.is_symlink() else None
    if disk is not None:
        parts.append(f"disk {human_bytes(disk)}")
    return f"used {', '.join(parts)}" if parts else None


# --- the unit's stop action ---

def forget(state_file: Path, env_id: str, lock: Path) -> bool:
    """Remove the state file if it still names this environment (the name may be reused);
    under the registry's lock, as :func:`gestvenv.registry.remove` does."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return False  # no registry at all any more (its dir is gone)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = json.loads(state_file.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return False  # unreadable: the orphan sweep's to judge
        if not names_env(current, env_id):
            return False
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        return True
    finally:
        os.close(fd)


def reap(path: Path, env_id: str, state_file: Path, lock: Path,
         cgroup: str | None = None) -> list[str]:
    """Everything of one environment outside systemd's units: processes, files, state.
    Returns what it did, starting with what the env used (:func:`end_report`); raises
    :class:`UnsafePathError` for what it refused."""
    done = []
    # A pooled env's unit has its pool file on its command line: the claim in it names the
    # env's state file (read now, before the pool file goes).
    claimed = pool_claimed_state(state_file, env_id)
    # Its container first: it holds the env's dir (and its cap's mount) bound inside.
    if containers := remove_containers(env_id):
        done.append(f"removed {containers} container(s) of the environment")
    killed = kill_marked(ENV_MARKER, env_id)
    # Measured once nothing of it runs any more (its figures no longer move), before its
    # files go; a figure that cannot be read never stops a reap.
    with contextlib.suppress(Exception):
        report = end_report(path, env_id, cgroup)
        if report:
            done.append(report)
    if killed:
        done.append(f"killed {killed} leftover process(es) of the environment")
    if stem_of_env_dir(path.name, env_id) is None:
        raise UnsafePathError(f"refusing to delete {path}: not the directory of env {env_id}")
    root = Path(os.path.abspath(path)).parent
    if not is_marked_root(root):
        raise UnsafePathError(
            f"refusing to delete {path}: {root} is not a gestvenv storage root (no {ROOT_MARK})")
    try:
        if remove_tree(path, [root]):
            done.append(f"removed {path}")
    finally:
        if claimed is not None and forget(claimed, env_id, lock):
            done.append(f"removed {claimed}")
        if forget(state_file, env_id, lock):
            done.append(f"removed {state_file}")
    return done


def main(argv: list[str]) -> int:
    # (A fifth argument, the env's slice cgroup, is optional: units made before it was added
    # carry four, and without it the slice is found beside our own cgroup.)
    if len(argv) not in (4, 5):
        print("usage: reaper.py PATH ENV_ID STATE_FILE REGISTRY_LOCK [SLICE_CGROUP]",
              file=sys.stderr)
        return 2
    path, env_id, state_file, lock = argv[:4]
    cgroup = argv[4] if len(argv) == 5 and argv[4] else None
    started = time.monotonic()
    try:
        done = reap(Path(path), env_id, Path(state_file), Path(lock), cgroup)
    except (UnsafePathError, OSError) as exc:
        print(f"gestvenv reaper: {exc}", file=sys.stderr, flush=True)
        return 1
    took = time.monotonic() - started
    print(f"gestvenv reaper: {'; '.join(done) or 'nothing left to remove'} ({took:.3f} s)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
