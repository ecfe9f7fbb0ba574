"""Integration fixtures: run ``async def`` tests, and check that no test leaves anything behind.

pytest has no built-in support for coroutine tests and the project does not depend on a plugin,
so a ``pytest_pyfunc_call`` hook runs them with :func:`asyncio.run` (under an overall timeout, so
that a hang fails the test, or ends the run, instead of stalling it).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gestvenv import storage

from .support import (
    Spawn,
    container_leftovers,
    environ_of,
    labels_of,
    mount_points,
    podman_containers,
    processes_of,
)

# The file that marks a dir as a storage root (part of the root, not of an environment).
ROOT_MARK = getattr(storage, "ROOT_MARK", ".gestvenv-root")

ASYNC_TEST_TIMEOUT = 60.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    names = inspect.signature(func).parameters
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    # Last resort if even the timeout's cancellation cannot end the test (a shielded cleanup
    # that never finishes): dump every thread's stack and exit rather than hang the suite.
    faulthandler.dump_traceback_later(ASYNC_TEST_TIMEOUT + 30, exit=True)
    try:
        asyncio.run(asyncio.wait_for(func(**kwargs), ASYNC_TEST_TIMEOUT))
    finally:
        faulthandler.cancel_dump_traceback_later()
    return True


def leftovers(home: Path) -> list[str]:
    """Everything an environment could leave: state files, storage dirs, marked processes,
    and where podman is installed the test's containers (by their state-file label), orphaned
    conmon processes and mounts of containers that are gone (support.container_leftovers).

    The MEMORY root (/dev/shm/gestvenv) is shared with every other gestvenv user of the machine
    (other test runs included), so the tests that use it check their own environment's dir.
    """
    problems = []
    state = home / "run" / "envs"
    if state.is_dir():
        problems += [f"state file {p}" for p in state.iterdir()]
    for kind, root in (("disk", home / "envs"), ("tmpfs", home / "run" / "storage")):
        if root.is_dir():
            problems += [f"{kind} dir {p}" for p in root.iterdir() if p.name != ROOT_MARK]
    for proc in processes_of(home / "run", marked_only=True):
        with contextlib.suppress(psutil.Error):  # (gone, or a zombie, meanwhile)
            problems.append(f"process {proc.pid} {proc.cmdline()}")
    # An env's own filesystem (max_disk), in the test's roots. (Its loop device goes with it,
    # autoclear; loop devices are the kernel's, and a test host's may name the same paths, so
    # the tests of disk caps look at them themselves.)
    scope = os.path.realpath(home)
    problems += [f"mount {m}" for m in mount_points() if m.startswith(f"{scope}/")]
    for kind, items in container_leftovers(state, home / "run").items():
        problems += [f"{kind}: {item}" for item in items]
    return problems


def _remove_containers(home: Path) -> None:
    """Kill and remove the test's containers: those whose state-file label is in its state
    dir (never another's, nor one without gestvenv's labels); then orphaned conmon of ours."""
    from gestvenv.container.engine import LABEL_ID, LABEL_STATE

    podman = shutil.which("podman")
    if podman is None:
        return
    state = f"{home / 'run' / 'envs'}/"
    ours = [str(item.get("Id")) for item in podman_containers() or []
            if LABEL_ID in (labels := labels_of(item))
            and labels.get(LABEL_STATE, "").startswith(state)]
    if ours:
        # (--ignore: without it podman 4.3 removes none of them if one is already gone.)
        subprocess.run([podman, "rm", "--force", "--ignore", "--time", "0", *ours],
                       capture_output=True, timeout=120, check=False)
    for line in container_leftovers(home / "run" / "envs", home / "run")["conmon"]:
        with contextlib.suppress(psutil.Error, ValueError):
            psutil.Process(int(line.split()[0])).kill()


def _clean_up(home: Path) -> None:
    """Remove what a failing test left, so that the failure does not leak onto the machine."""
    from gestvenv import load_config, registry
    from gestvenv.lifecycle import destroy

    async def destroy_all() -> None:
        config = load_config()
        for record in registry.list_records():
            with contextlib.suppress(Exception):
                await destroy(record, config)

    asyncio.run(destroy_all())
    _remove_containers(home)
    for proc in processes_of(home / "run", marked_only=True):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    for state in (home / "run" / "envs").glob("*.json"):
        state.unlink()


@pytest.fixture(autouse=True)
def no_leftovers(gv_home: Path) -> Iterator[None]:
    """Fail a test that leaves a state file, a storage dir, an environment's process or (with
    podman) a container, an orphaned conmon or a container's mount behind."""
    yield
    problems = leftovers(gv_home)
    if problems:
        _clean_up(gv_home)
    assert problems == []


@pytest.fixture(scope="session", autouse=True)
def watchdogs_exit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test's watchdog must exit by itself once its environments are gone (no lingering)."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    deadline = time.monotonic() + 6.0  # WATCHDOG_LINGER (2 s) + a sweep period + start-up

    def remaining() -> list[psutil.Process]:
        out = []
        for proc in psutil.process_iter():
            env = environ_of(proc)
            try:
                alive = proc.status() != psutil.STATUS_ZOMBIE
                cmd = proc.cmdline()
            except psutil.Error:
                continue
            if alive and "gestvenv.watchdog" in cmd \
                    and env.get("GESTVENV_RUNTIME_DIR", "").startswith(base):
                out.append(proc)
        return out

    left = remaining()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = remaining()
    assert [p.pid for p in left] == [], "watchdog processes did not exit"


@pytest.fixture(scope="session", autouse=True)
def package_images_pruned(shared_cache: Path) -> Iterator[None]:
    """The package images the session's container envs made: removed at its end. Their
    snapshots are the session's own (beside its uv cache, gone with its temp dir), so no later
    sweep, whose config names other snapshots, would ever remove them. (Base images stay, as
    gestvenv's own sweeps leave them: one per interpreter, remade only when it changes.)"""
    yield
    if shutil.which("podman") is None and shutil.which("docker") is None:
        return
    from gestvenv.container import images
    from gestvenv.container.engine import EngineError, find

    engine, _ = find("auto", shared_cache.parent)
    if engine is not None:
        with contextlib.suppress(EngineError):
            images.prune(engine, set(), everything=True, bases=False,
                         snapshots=str(shared_cache.parent / "gestvenv-templates"))


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start a script (or, with ``argv``, any command) in a process group of its own; whatever
    still runs at the end of the test is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(code: str | None = None, *args: str,
              argv: list[str] | None = None) -> subprocess.Popen[str]:
        if argv is None:
            script = tmp_path / f"script-{len(started)}.py"
            script.write_text(textwrap.dedent(code or ""))
            argv = [sys.executable, str(script), *args]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path, process_group=0)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
