"""Helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import gestvenv
from gestvenv import storage
from gestvenv.runtime.processes import ENV_MARKER, marked_pids
from tests.harness.wheels import PACKAGES

CHECKOUT = Path(__file__).resolve().parents[2]
# The checkout's venv (absent in the v2 VM, which collects the test host's tests but runs none of
# those that need gvtest).
SITE = next((CHECKOUT / ".venv" / "lib").glob("python3*/site-packages"), CHECKOUT / ".venv")


def systemctl_show(output: str) -> dict[str, str]:
    """``systemctl show``'s output as a dict; a list (TimersMonotonic) comes as one line per
    item, joined here with newlines."""
    props: dict[str, str] = {}
    for line in output.splitlines():
        key, _, value = line.partition("=")
        props[key] = f"{props[key]}\n{value}" if key in props else value
    return props


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


# --- leftovers: everything of gestvenv still present for the test (test_guaranteed_cleanup) ---

LEFTOVER_KINDS = ("units", "dirs", "state files", "processes", "mounts")
# gestvenv's own infrastructure, not an environment's: the parent slice, the cleanup timer.
_SHARED_UNITS = ("gestvenv.slice", "gestvenv-cleanup.service", "gestvenv-cleanup.timer")
# The env unit's environment names its state file: its holder and reaper carry it.
_UNIT_STATE_FILE = "GESTVENV_UNIT_STATE_FILE"


def loaded_units(pattern: str = "gestvenv-*") -> list[tuple[str, str, str]]:
    """(unit, active state, sub state) of the loaded units matching ``pattern`` in this user's
    manager (the system manager for root), except gestvenv's shared ones; [] without systemd."""
    import subprocess

    from gestvenv.runtime.systemd import systemd_booted

    if not systemd_booted():
        return []
    scope = ["--user"] if os.geteuid() != 0 else []
    out = subprocess.run(["systemctl", *scope, "list-units", "--all", "--plain", "--no-legend",
                          pattern], capture_output=True, text=True, check=True).stdout
    units = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] not in _SHARED_UNITS:
            units.append((fields[0], fields[2], fields[3]))
    return units


def _claimed_by(path: Path, state_dir: Path) -> bool:
    """The env dir's claim names a state file of ``state_dir`` (this test's registry)."""
    import json

    try:
        claim = json.loads((path / storage.CLAIM).read_text())
        return Path(str(claim["state_file"])).parent == state_dir
    except (OSError, ValueError, KeyError, TypeError):
        return False


def leftovers() -> dict[str, list[str]]:
    """Everything of gestvenv still present for this test, by kind (see LEFTOVER_KINDS).

    - units: loaded ``gestvenv-*`` units (when systemd is PID 1), but the shared slice/timer;
    - dirs: env dirs in every storage root of the test's config (the root's mark aside); in a
      root shared with other users of the machine (/dev/shm) only those claimed by this test's
      registry;
    - state files: every entry of the test's state dir (temporary files included);
    - processes: processes carrying the env marker and the test's runtime dir, and those of an
      env unit of this registry (holder, reaper);
    - mounts: mount points below those storage dirs.
    """
    from gestvenv.reaper import unescape_mountinfo

    runtime = storage.runtime_dir()
    state = storage.state_dir()
    left: dict[str, list[str]] = {kind: [] for kind in LEFTOVER_KINDS}
    left["units"] = [f"{u} ({a}/{s})" for u, a, s in loaded_units()]
    mount_scopes: list[Path] = []
    for root in storage.all_roots(gestvenv.load_config()):
        shared = root.is_relative_to("/dev/shm")
        if not shared:
            mount_scopes.append(root)
        for entry in env_dirs(root):
            if not shared or _claimed_by(entry, state):
                left["dirs"].append(str(entry))
                mount_scopes.append(entry)
    if state.is_dir():
        left["state files"] = sorted(str(p) for p in state.iterdir())
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        env = environ_of(proc)
        ours = (ENV_MARKER in env and env.get("GESTVENV_RUNTIME_DIR") == str(runtime)) or \
            env.get(_UNIT_STATE_FILE, "").startswith(f"{state}/")
        if not ours:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env_name = env.get("GESTVENV_ENV_NAME") or env.get(_UNIT_STATE_FILE, "?")
            left["processes"].append(
                f"{proc.pid} {' '.join(proc.cmdline())[:160]} [env {env_name}]")
        except psutil.Error:
            continue
    with open("/proc/self/mountinfo") as f:
        points = [unescape_mountinfo(line.split()[4]) for line in f]
    for point in points:
        if any(point.startswith(f"{os.path.realpath(scope)}/") for scope in mount_scopes):
            left["mounts"].append(point)
    return left


def leftover_count(left: dict[str, list[str]]) -> int:
    return sum(len(items) for items in left.values())


def leftover_summary(left: dict[str, list[str]]) -> str:
    """``0 (units 0, dirs 0, state files 0, processes 0, mounts 0)``"""
    parts = ", ".join(f"{kind} {len(left[kind])}" for kind in LEFTOVER_KINDS)
    return f"{leftover_count(left)} ({parts})"


# --- the test host's user gvtest (a user manager) ---

def gvtest() -> pwd.struct_passwd:
    try:
        user = pwd.getpwnam("gvtest")
    except KeyError:
        pytest.skip("no gvtest user (created by the test host harness)")
    if not os.path.exists(f"/run/user/{user.pw_uid}/bus"):
        pytest.skip("gvtest's user manager is not running")
    return user


def run_as_gvtest(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A command as gvtest, in a login-like environment. The checkout's .venv python lives
    under root's 0700 home, so gvtest runs the system python3 with the checkout and the
    venv's site-packages on PYTHONPATH (which install carries into the unit)."""
    user = pwd.getpwnam("gvtest")
    runtime = f"/run/user/{user.pw_uid}"
    return subprocess.run(
        ["runuser", "-u", "gvtest", "--", "/usr/bin/env", "-i", f"HOME={user.pw_dir}",
         "PATH=/usr/bin:/bin", f"XDG_RUNTIME_DIR={runtime}",
         f"DBUS_SESSION_BUS_ADDRESS=unix:path={runtime}/bus", f"PYTHONPATH={CHECKOUT}:{SITE}",
         *argv], capture_output=True, text=True, timeout=timeout, cwd="/")
