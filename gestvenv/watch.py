"""When the local watchdog must run, and starting it (the process itself: :mod:`gestvenv.watchdog`).

The local runtime calls :func:`ensure_watchdog` around a new env's registration
(``LocalRuntime.watch_creators``); every CLI command calls :func:`ensure_for_command`. Kept apart
from the watchdog's loop, which sweeps with :mod:`gestvenv.cleanup`: creating an env (lifecycle)
must not import what destroys them (cleanup imports lifecycle).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

from . import registry, storage


def _lock_path() -> str:
    return str(storage.runtime_dir() / "watchdog.lock")


def try_lock() -> int | None:
    """The watchdog's lock (its fd), or None when a watchdog holds it."""
    fd = os.open(_lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def watchdog_running() -> bool:
    fd = try_lock()
    if fd is None:
        return True
    os.close(fd)
    return False


# When this process last started a watchdog, per runtime dir: a create asks before and after
# its reservation, and the one started a moment ago (not holding its lock yet) will see it.
_started: dict[str, float] = {}
_FRESH = 1.0  # well under LINGER: a watchdog this young has not given up yet


def ensure_watchdog() -> None:
    """Start the watchdog unless one runs. Call after the env's state file is written (a call
    before it too makes a creator killed in between noticed)."""
    runtime = str(storage.runtime_dir())
    started = _started.get(runtime)
    if (started is not None and time.monotonic() - started < _FRESH) or watchdog_running():
        return
    from .runtime.processes import spawn_detached

    spawn_detached([sys.executable, "-m", "gestvenv.watchdog"],
                             {"GESTVENV_RUNTIME_DIR": runtime})
    _started[runtime] = time.monotonic()


def _swept_path() -> str:
    return str(storage.runtime_dir() / "watchdog.swept")


def needed(*, systemd: bool, local_envs: bool, since_sweep: float | None,
           interval: float, sweeping: bool = False) -> bool:
    """Whether a gestvenv command must make sure the watchdog runs: local envs to watch, or,
    without systemd (and so without its timer), an orphan sweep not done for ``interval``
    seconds (``since_sweep``: None when never, in this runtime dir: after a reboot, /run is
    empty). A crash's leftovers are then swept by the first command after a reboot and at most
    ``interval`` later otherwise, without a watchdog started by every ``list``. A command that
    is ``sweeping`` itself (``cleanup``) does not start one to sweep alongside it (two sweeps
    at once would split what was removed between two reports)."""
    if local_envs:
        return True
    return not systemd and not sweeping and (since_sweep is None or since_sweep >= interval)


def _boot_time() -> float:
    """When this host booted (the kernel's ``btime``)."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def stamp_sweep() -> None:
    """Note that orphans were just swept (the file's time is the stamp: see :func:`needed`)."""
    os.close(os.open(_swept_path(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))


def since_last_sweep() -> float | None:
    """Seconds since orphans were last swept in this runtime dir, None when never in this boot
    (a stamp from before it does not count: a runtime dir that is not under /run)."""
    try:
        swept = os.stat(_swept_path()).st_mtime
        return None if swept < _boot_time() else max(0.0, time.time() - swept)
    except OSError:
        return None


def ensure_for_command(config_interval: float, systemd: bool, *, sweeping: bool = False) -> None:
    """What every command of the CLI does first: :func:`ensure_watchdog` when :func:`needed`."""
    # (Without systemd every env is local: the state files' names are enough to know.)
    local = registry.any_state_file() if not systemd else \
        any(r.runtime == "local" for r in registry.list_records())
    if needed(systemd=systemd, local_envs=local, since_sweep=since_last_sweep(),
              interval=config_interval, sweeping=sweeping):
        ensure_watchdog()
