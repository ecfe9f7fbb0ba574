"""Container isolation under a systemd manager: the system's (root, the systemd tier) and a
user's with rootless podman (the cgroup v2 VM, as the unprivileged user ``tester``).

The container and its conmon are scopes in the env's slice: the slice's limits hold them,
``systemctl status`` shows them under the env, and the env's end ends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import gestvenv
from gestvenv import IsolationLevel, ResourceLimits
from gestvenv.builder import find_interpreter
from gestvenv.container import engine as engines
from gestvenv.container import images
from gestvenv.container import plan as cplan

CONTAINER = IsolationLevel.CONTAINER


def _engine() -> tuple[engines.Engine | None, str]:
    engine, why = engines.find("auto", Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp"))
    if engine is not None:
        why = cplan.unusable(engine.name, rootless=engine.rootless,
                             cgroup_version=engine.cgroup_version) or ""
        if why:
            engine = None
    return engine, why


ENGINE, WHY = _engine()
pytestmark = [pytest.mark.v2,
              pytest.mark.skipif(ENGINE is None, reason=f"no usable container engine: {WHY}")]


@pytest.fixture(scope="module", autouse=True)
def base_image() -> None:
    """The interpreter's base image, made before the tests' clocks start: under the VM's
    software emulation, generating it (and rootless podman's first storage set-up) takes
    longer than a test may."""
    if ENGINE is not None:
        images.ensure_base(ENGINE, find_interpreter(None).path)
        ENGINE.run("run", "--rm", "--pull", "never", "--network", "none",
                   images.base_ref(find_interpreter(None).path), "/bin/sh", "-c", ":",
                   timeout=600)


def systemctl(*args: str) -> str:
    scope = ["--user"] if os.geteuid() != 0 else []
    return subprocess.run(["systemctl", *scope, *args], capture_output=True, text=True).stdout


async def test_the_container_lives_in_the_envs_slice_and_ends_with_it() -> None:
    assert ENGINE is not None
    limits = ResourceLimits(max_memory=64, max_processes=30, network_access=False)
    async with gestvenv.ephemeral("boxed", runtime="systemd", isolation_level=CONTAINER,
                                  resource_limits=limits) as env:
        assert env.isolation is CONTAINER and env.enforcement.unenforced == {}
        facts = env.container or {}
        assert facts.get("rootless") is (os.geteuid() != 0)
        home = Path.home()
        marker = home / f"gv-home-marker-{os.getpid()}"
        marker.write_text("the creator's\n")
        try:
            seen = await env.execute(["python", "-c", (
                "import json, os, sys; print(json.dumps({'init': open('/proc/1/cmdline')"
                ".read(), 'marker': os.path.exists(sys.argv[1]), 'home': sorted(os.listdir("
                "sys.argv[2])) if os.path.isdir(sys.argv[2]) else [], 'uid': os.getuid()}))"),
                str(marker), str(home)])
        finally:
            marker.unlink()
        assert seen.ok, seen.stderr
        inside = json.loads(seen.stdout)
        assert "podman-init" in inside["init"] and not inside["marker"]
        # Of the creator's home, only the way to the env's own dir (bound at its own path, as
        # a user's disk-backed envs live in ~/.cache), to the interpreter (in the image at its
        # own path: root's pyenv) and to the tools bound read-only (uv, in the VM's venv), if
        # it is there at all.
        bound = [env.path, env.python.resolve(), *map(Path, facts.get("expose") or [])]
        on_the_way = {p.name for path in bound for p in path.parents if p.parent == home}
        assert set(inside["home"]) <= on_the_way, inside["home"]
        if os.geteuid() != 0:
            assert inside["uid"] == os.geteuid()  # rootless: keep-id, the creator's own uid
        # systemd shows the container (its scope) under the env's slice.
        status = systemctl("status", "--no-pager", "--lines=0", "gestvenv-boxed.slice")
        assert f"libpod-{facts['id']}.scope" in status, status
        listed = ENGINE.ours(env_id=env.id)
        assert [c["name"] for c in listed] == [facts["name"]]
        oom = await env.execute(["python", "-c", "b = bytearray(200 << 20); print('alive')"])
        assert oom.returncode == -9 and oom.killed_by == "memory", oom
        env_id = env.id
    assert ENGINE.ours(env_id=env_id) == []
    assert "libpod" not in systemctl("list-units", "--all", "--plain", "--no-legend",
                                     f"libpod-{facts['id']}*")


async def test_a_container_env_ends_at_its_ttl() -> None:
    assert ENGINE is not None
    # (A TTL counts from the start of the creation: 3 s was less than a rootless create in
    # the VM under load, and the env had ended before its container was looked for.)
    env = await gestvenv.create_environment("shortlived", runtime="systemd",
                                            isolation_level=CONTAINER, ttl=10)
    try:
        assert len(ENGINE.ours(env_id=env.id)) == 1
        for _ in range(250):
            if not ENGINE.ours(env_id=env.id) and not env.path.exists() \
                    and not _loaded("gestvenv-shortlived*"):
                break
            await asyncio.sleep(0.1)
        assert ENGINE.ours(env_id=env.id) == []
        assert not env.path.exists()
        assert _loaded("gestvenv-shortlived*") == ""
    finally:
        with contextlib.suppress(gestvenv.EnvironmentNotFoundError):
            await gestvenv.destroy_environment("shortlived")


async def test_an_idle_container_env_ends_but_never_while_a_command_runs() -> None:
    assert ENGINE is not None
    env = await gestvenv.create_environment("idler", runtime="systemd",
                                            isolation_level=CONTAINER, idle_timeout=2)
    try:
        # The container's own processes (its init, conmon) are no sign of use; a command is.
        long = await env.execute(["python", "-c", "import time; time.sleep(4); print('done')"])
        assert long.stdout == "done\n" and long.killed_by is None, long
        # Its container, its dir, and its units (their stop action is the last to finish).
        for _ in range(150):
            if not ENGINE.ours(env_id=env.id) and not env.path.exists() \
                    and not _loaded("gestvenv-idler*"):
                break
            await asyncio.sleep(0.1)
        assert ENGINE.ours(env_id=env.id) == [] and not env.path.exists()
        assert _loaded("gestvenv-idler*") == ""
    finally:
        with contextlib.suppress(gestvenv.EnvironmentNotFoundError):
            await gestvenv.destroy_environment("idler")


def _loaded(pattern: str) -> str:
    return systemctl("list-units", "--all", "--plain", "--no-legend", pattern).strip()
