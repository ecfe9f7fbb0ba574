"""Helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil

import gestvenv
from gestvenv import storage
from gestvenv.runtime.processes import ENV_MARKER, marked_pids
from tests.harness.wheels import PACKAGES


def latest(name: str) -> str:
    """The newest version of ``name`` in the test wheelhouse."""
    versions = [v for n, v, _, _ in PACKAGES if n == name]
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def oldest(name: str) -> str:
    versions = [v for n, v, _, _ in PACKAGES if n == name]
    return min(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


async def wait_until(predicate: Callable[[], object], timeout: float, what: str,
                     interval: float = 0.02) -> float:
    """Poll ``predicate`` until it is true; return the seconds it took, or fail after timeout."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)


def env_dirs(root: Path) -> list[Path]:
    """The environment dirs in a storage root (not the root's own mark file)."""
    if not root.is_dir():
        return []
    mark = getattr(storage, "ROOT_MARK", ".gestvenv-root")
    return sorted(p for p in root.iterdir() if p.name != mark)


def env_pids(env_id: str) -> list[int]:
    return marked_pids(ENV_MARKER, env_id)


def pid_dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def is_destroyed(path: Path, env_id: str) -> bool:
    return (not path.exists() and not gestvenv.list_environments() and not env_pids(env_id))


def assert_destroyed(path: Path, env_id: str) -> None:
    """Files, state and processes of one environment are all gone."""
    assert not path.exists(), f"{path} still exists"
    assert gestvenv.list_environments() == []
    assert env_pids(env_id) == []


def environ_of(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


def processes_of(runtime_dir: Path, *, marked_only: bool, cmd: str = "") -> list[psutil.Process]:
    """Live processes started for the test whose runtime dir is ``runtime_dir``.

    Every command gestvenv runs inherits the test's ``GESTVENV_RUNTIME_DIR`` and carries the
    environment marker; with ``marked_only=False`` helper processes (the watchdog, subprocesses
    of the test) are included; ``cmd`` keeps those whose command line contains it.
    """
    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        env = environ_of(proc)
        if env.get("GESTVENV_RUNTIME_DIR") != str(runtime_dir):
            continue
        if marked_only and ENV_MARKER not in env:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or cmd not in " ".join(proc.cmdline()):
                continue
        except psutil.Error:
            continue
        found.append(proc)
    return found
