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
        seen = await env.execute(["python", "-c", (
            "import json, os; print(json.dumps({'init': open('/proc/1/cmdline').read(), "
            "'home': os.path.exists('/home'), 'uid': os.getuid()}))")])
        assert seen.ok, seen.stderr
        inside = json.loads(seen.stdout)
        assert "podman-init" in inside["init"] and not inside["home"]
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
    env = await gestvenv.create_environment("shortlived", runtime="systemd",
                                            isolation_level=CONTAINER, ttl=3)
    try:
        assert len(ENGINE.ours(env_id=env.id)) == 1
        for _ in range(100):
            if not ENGINE.ours(env_id=env.id) and not env.path.exists():
                break
            await asyncio.sleep(0.1)
        assert ENGINE.ours(env_id=env.id) == []
        assert not env.path.exists()
    finally:
        with contextlib.suppress(gestvenv.EnvironmentNotFoundError):
            await gestvenv.destroy_environment("shortlived")
