"""Package code runs inside the environment: a hostile sdist's build backend is held.

The sdist is made here, offline: an in-tree PEP 517 backend (no build requirements) whose
``build_wheel`` writes a marker to ``/``, reads a private file of the creator's home, connects to
a listener of the test on the host's loopback, reports all that on stderr, then allocates past
the env's ``max_memory``. Installed with container isolation, no network and 256 MB, every
attempt must fail inside the build, and the build must die of the memory limit, said plainly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import gestvenv
from gestvenv import BuildError, IsolationLevel, ResourceLimits

from ..hostile_sdist import hostile_sdist, make_sdist, report_of


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[Path, str, socket.socket]]:
    with hostile_sdist(tmp_path / "src", alloc_mb=600) as made:
        yield made


def assert_held(report: dict[str, str], tag: str, listener: socket.socket) -> None:
    assert report["uid"] != 0
    for key in ("root_marker", "read_home", "network"):
        assert report[key].startswith("held "), (key, report[key])
    assert not os.path.exists("/" + tag)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing reached the host's loopback


def test_a_hostile_build_is_held_and_killed_by_the_memory_limit(
        hostile: tuple[Path, str, socket.socket], tmp_path: Path) -> None:
    sdist, tag, listener = hostile
    done = subprocess.run(
        [sys.executable, "-m", "gestvenv", "ephemeral", "create", "evil", "-p", str(sdist),
         "--isolation", "container", "--no-network", "--memory", "256", "--runtime", "systemd"],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    print(done.stdout, done.stderr)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    first = done.stderr.splitlines()[0]
    assert "killed by the environment's memory limit" in first and "256" in first, first
    assert_held(report_of(done.stderr), tag, listener)
    assert gestvenv.list_environments() == []


async def test_a_build_inside_succeeds_and_is_installed(tmp_path: Path) -> None:
    sdist = make_sdist(tmp_path / "src", tag="gvevil-ok", secret="/nonexistent", port=9,
                       alloc_mb=0)
    limits = ResourceLimits(network_access=False, max_memory=256)
    async with gestvenv.ephemeral("builds", runtime="systemd", resource_limits=limits,
                                  isolation_level=IsolationLevel.CONTAINER) as env:
        await env.install([str(sdist)])
        out = await env.execute(["python", "-c", "import gvevil; print(gvevil.BUILT)"])
        assert out.stdout == "True\n", out.stderr
        # Built by the env's own uid, in its own cache: nothing of it in the shared cache.
        files = [p for p in env.path.rglob("gvevil/__init__.py")]
        assert files and all(p.stat().st_uid == env.info()["sandbox_uid"] for p in files)


async def test_env_install_of_a_hostile_sdist_says_what_killed_it(
        hostile: tuple[Path, str, socket.socket]) -> None:
    sdist, tag, listener = hostile
    limits = ResourceLimits(network_access=False, max_memory=256)
    async with gestvenv.ephemeral("evil-install", runtime="systemd", resource_limits=limits,
                                  isolation_level=IsolationLevel.NAMESPACE) as env:
        with pytest.raises(BuildError, match="memory limit") as caught:
            await env.install([str(sdist)])
        assert_held(report_of(str(caught.value)), tag, listener)
        ok = await env.execute(["python", "-c", "print('still usable')"])
        assert ok.stdout == "still usable\n"
