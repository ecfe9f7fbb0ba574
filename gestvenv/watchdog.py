"""The local watchdog: what ends environments when no systemd does.

Without systemd nothing outlives a killed process by itself, so gestvenv starts one small
watchdog process per user and runtime dir (``python -m gestvenv.watchdog``, started by
:func:`gestvenv.watch.ensure_watchdog`). While environments exist it sweeps every half second
(TTL, idle timeout, dead creators) and every ``cleanup_interval`` seconds for orphans too; then
it exits. A ``flock`` makes it unique; the hand-over (a new env appearing while the watchdog is
about to exit) is safe because the watchdog drops the lock *before* its last look at the
registry and creators look at the lock *after* registering.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time

from . import registry
from .cleanup import sweep
from .config import load_config
from .watch import since_last_sweep, stamp_sweep, try_lock

PERIOD = 0.5
LINGER = 2.0


def _watched() -> bool:
    """Environments that need the watchdog: the local runtime's (systemd holds its own)."""
    return any(r.runtime == "local" for r in registry.list_records())


async def _watch() -> None:
    config = load_config()
    fd = try_lock()
    if fd is None:
        return
    idle_since = time.monotonic()
    # The orphan sweep keeps its pace across watchdogs: one started for each one-shot `run`
    # must not walk the container engine each time (`podman info` alone costs seconds of CPU).
    since = since_last_sweep()
    last_orphan_sweep = -math.inf if since is None else time.monotonic() - since
    try:
        while True:
            orphans = time.monotonic() - last_orphan_sweep >= config.cleanup_interval
            try:
                await sweep(config, expired=True, idle=True, orphans=orphans)
            except Exception as exc:  # (one failed round, say EMFILE, must not end the watch)
                print(f"gestvenv watchdog: a sweep failed: {exc}", file=sys.stderr, flush=True)
            if orphans:
                last_orphan_sweep = time.monotonic()
                stamp_sweep()
            if _watched():
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > LINGER:
                os.close(fd)
                fd = None
                if not _watched():
                    return
                fd = try_lock()  # someone registered meanwhile: keep watching, if still ours
                if fd is None:
                    return
                idle_since = time.monotonic()
            await asyncio.sleep(PERIOD)
    finally:
        if fd is not None:
            os.close(fd)


if __name__ == "__main__":
    asyncio.run(_watch())
