"""Sweeping: expired, idle and orphaned environments, and the local runtime's watchdog.

Without systemd nothing outlives a killed process by itself, so the local runtime starts one small
watchdog process per user (``python -m gestvenv.cleanup``) that sweeps every half second while
environments exist and then exits. A ``flock`` makes it unique; the hand-over (a new env appearing
while the watchdog is about to exit) is safe because the watchdog drops the lock *before* its last
look at the registry and creators look at the lock *after* registering.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import registry, storage
from .config import Config, load_config
from .lifecycle import destroy
from .registry import EnvRecord
from .runtime import processes
from .templates import TemplateCache

_ENV_DIR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}-[0-9a-f]{8}", re.ASCII)
WATCHDOG_PERIOD = 0.5
WATCHDOG_LINGER = 2.0


@dataclass
class SweepReport:
    removed: dict[str, str] = field(default_factory=dict)   # name -> reason
    errors: dict[str, str] = field(default_factory=dict)    # name or path -> error
    orphan_paths: list[str] = field(default_factory=list)   # storage dirs without an env


def reason_to_remove(record: EnvRecord, now: float, *, expired: bool, idle: bool) -> str | None:
    state = record.state(now)
    if state == "orphaned":
        return "its creating process died"
    if expired and state == "expired":
        return "TTL reached"
    if idle and record.idle_timeout and state == "ready" \
            and now - record.last_activity >= record.idle_timeout:
        # Idle means no command running either: a long command is never killed for idleness.
        if processes.marked_pids(processes.ENV_MARKER, record.id):
            registry.touch(record.name, record.id)
            return None
        return f"idle for {record.idle_timeout}s"
    return None


async def sweep(config: Config, *, expired: bool = True, idle: bool = True,
                orphans: bool = True) -> SweepReport:
    report = SweepReport()
    now = time.time()
    doomed = []
    for record in await asyncio.to_thread(registry.list_records):
        reason = reason_to_remove(record, now, expired=expired, idle=idle)
        if reason:
            doomed.append((record, reason))
    results = await asyncio.gather(*(destroy(r, config) for r, _ in doomed),
                                   return_exceptions=True)
    for (record, reason), result in zip(doomed, results, strict=True):
        if isinstance(result, BaseException):
            report.errors[record.name] = str(result)
        else:
            report.removed[record.name] = reason
    if orphans:
        await asyncio.to_thread(_sweep_orphans, config, report)
    return report


def _sweep_orphans(config: Config, report: SweepReport) -> None:
    """Storage dirs that no state file claims, and state files nobody can read."""
    for path in registry.unreadable_state_files():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            report.removed[path.name] = "unreadable state file"
    roots = storage.all_roots(config)
    for root in roots:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            if not _ENV_DIR_RE.fullmatch(entry.name):
                continue  # only names gestvenv gives its dirs: "<name>-<8 hex>"
            try:
                # Whichever registry owns it (another runtime dir too) must still know it.
                claimed = storage.is_claimed(root / entry.name)
                if claimed:
                    continue
                # No claim yet: a dir being created right now. Give it a few seconds.
                young = time.time() - entry.stat(follow_symlinks=False).st_mtime < 5
                if claimed is None and young:
                    continue
                storage.remove_tree(root / entry.name, roots)
                report.orphan_paths.append(str(root / entry.name))
            except Exception as exc:  # report and go on: one bad entry must not stop the sweep
                report.errors[str(root / entry.name)] = str(exc)
    templates = TemplateCache(storage.templates_dir(config), config.template_ttl)
    report.orphan_paths.extend(templates.prune())


# --- the watchdog ---

def _lock_path() -> str:
    return str(storage.runtime_dir() / "watchdog.lock")


def _try_lock() -> int | None:
    fd = os.open(_lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def watchdog_running() -> bool:
    fd = _try_lock()
    if fd is None:
        return True
    os.close(fd)
    return False


def ensure_reaper() -> None:
    """Start the watchdog unless one runs. Call after the env's state file is written."""
    if watchdog_running():
        return
    env = {k: v for k, v in os.environ.items()
           if k not in (processes.ENV_MARKER, processes.EXEC_MARKER)}
    env["GESTVENV_RUNTIME_DIR"] = str(storage.runtime_dir())
    # Through sh's "&" so the watchdog is not our child (no zombie, survives our death).
    subprocess.run(
        ["/bin/sh", "-c", 'exec "$@" </dev/null >/dev/null 2>&1 &', "sh",
         sys.executable, "-m", "gestvenv.cleanup"],
        env=env, check=True, start_new_session=True,
    )


async def _watchdog() -> None:
    config = load_config()
    fd = _try_lock()
    if fd is None:
        return
    idle_since = time.monotonic()
    try:
        while True:
            await sweep(config, expired=True, idle=True, orphans=False)
            if registry.list_records():
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > WATCHDOG_LINGER:
                os.close(fd)
                fd = None
                if not registry.list_records():
                    return
                fd = _try_lock()  # someone registered meanwhile: keep watching, if still ours
                if fd is None:
                    return
                idle_since = time.monotonic()
            await asyncio.sleep(WATCHDOG_PERIOD)
    finally:
        if fd is not None:
            os.close(fd)


if __name__ == "__main__":
    asyncio.run(_watchdog())
