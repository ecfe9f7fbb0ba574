"""gestvenv-api.socket under a real systemd: the packaged units (rendered as the packages ship
them, gestvenv's command the checkout's), activated by a real client's connection, serving the
whole flow, then the service exiting when idle while the socket keeps listening, and started
again by the next connection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gestvenv
from gestvenv import distfiles, registry
from tests.integration.support import systemctl_show

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="the system manager's units")]

UNITS = Path("/run/systemd/system")
SOCKET = "/run/gestvenv/api.sock"


def show(unit: str, *props: str) -> dict[str, str]:
    out = subprocess.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)],
                         capture_output=True, text=True, check=True).stdout
    return systemctl_show(out)


def wait_for(unit: str, state: str, timeout: float) -> float:
    started = time.monotonic()
    while show(unit, "ActiveState")["ActiveState"] != state:
        assert time.monotonic() - started < timeout, f"{unit} never became {state}"
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.fixture
def api_units() -> Iterator[None]:
    """The packaged socket and service in /run (gone with the test), the service with this
    test's gestvenv (the checkout, its variables) and a 2 s idle exit."""
    service = distfiles.render_api_service(f"{sys.executable} -m gestvenv", idle_exit=2)
    passed = {k: v for k, v in os.environ.items()
              if k.startswith(("GESTVENV_", "UV_")) or k == "XDG_CONFIG_HOME"}
    service += "".join(f'Environment="{k}={v}"\n' for k, v in sorted(passed.items()))
    service += f"WorkingDirectory={os.getcwd()}\nEnvironment=PYTHONPATH={os.getcwd()}\n"
    # As the packaged tmpfiles.d makes it at boot (here a test may have made it 0700 first).
    run_dir = Path(SOCKET).parent
    mode = run_dir.stat().st_mode & 0o777 if run_dir.exists() else None
    if mode is not None:
        run_dir.chmod(distfiles.root_dir_mode(run_dir))
    (UNITS / distfiles.API_SOCKET).write_text(distfiles.render_api_socket())
    (UNITS / distfiles.API_SERVICE).write_text(service)
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "start", distfiles.API_SOCKET], check=True)
    try:
        yield
    finally:
        subprocess.run(["systemctl", "stop", distfiles.API_SOCKET, distfiles.API_SERVICE])
        for name in (distfiles.API_SOCKET, distfiles.API_SERVICE):
            (UNITS / name).unlink(missing_ok=True)
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        subprocess.run(["systemctl", "reset-failed"], capture_output=True)
        if mode is not None:
            run_dir.chmod(mode)


async def _flow() -> str:
    async with gestvenv.connect(f"unix://{SOCKET}") as client:
        lines: list[str] = []
        async with client.ephemeral("sock-flow", packages=["six>=1.0"], ttl=300) as env:
            assert registry.load("sock-flow").runtime == "systemd"
            result = await env.execute(
                ["python", "-c", "import six; print('six', six.__version__)"],
                stream=lambda name, text: lines.append(text))
            assert result.ok and "".join(lines).startswith("six 1.")
            await env.upload("work/job.py", b"import os\n"
                                            b"open('result.txt', 'w').write(str(os.getuid()))\n")
            assert (await env.execute(["python", "work/job.py"])).ok
            uid = (await env.download("result.txt")).decode()
        assert await client.list_environments() == []
    return uid


@pytest.mark.usefixtures("api_units")
def test_the_socket_activates_the_service_which_serves_then_exits_when_idle() -> None:
    assert show(distfiles.API_SOCKET, "ActiveState")["ActiveState"] == "active"
    assert show(distfiles.API_SERVICE, "ActiveState")["ActiveState"] == "inactive"
    assert oct(os.stat(SOCKET).st_mode & 0o777) == "0o666"  # peer credentials decide
    uid = asyncio.run(_flow())  # the first connection starts the service
    assert uid == "0"
    service = show(distfiles.API_SERVICE, "ActiveState", "TriggeredBy", "MainPID")
    assert service["TriggeredBy"] == distfiles.API_SOCKET
    status = subprocess.run(["systemctl", "status", distfiles.API_SOCKET],
                            capture_output=True, text=True).stdout
    assert "Triggers:" in status and distfiles.API_SERVICE in status, status
    # Idle (no request, no connection) for 2 s: it exits, with success, and the socket stays.
    took = wait_for(distfiles.API_SERVICE, "inactive", 30)
    print(f"the service exited {took:.1f} s after the last request")
    assert show(distfiles.API_SERVICE, "Result")["Result"] == "success"
    assert show(distfiles.API_SOCKET, "ActiveState")["ActiveState"] == "active"
    # ... and the next connection starts it again.
    async def listed() -> list[dict[str, object]]:
        async with gestvenv.connect(f"unix://{SOCKET}") as client:
            return await client.list_environments()

    assert asyncio.run(listed()) == []
    assert show(distfiles.API_SERVICE, "ActiveState")["ActiveState"] == "active"
    wait_for(distfiles.API_SERVICE, "inactive", 30)
    journal = subprocess.run(["journalctl", "-u", distfiles.API_SERVICE, "--no-pager", "-o",
                              "cat"], capture_output=True, text=True).stdout
    assert "Traceback" not in journal, journal


@pytest.mark.usefixtures("api_units")
def test_a_user_through_the_system_socket_gets_its_memory_limit_enforced() -> None:
    """gvtest, whose own manager has no memory controller on this hybrid host, asks root's
    service through /run/gestvenv/api.sock: its env runs as gvtest in the system manager's
    slice, where a 2x allocation is killed by the kernel and reported as such."""
    from tests.integration.test_api_users import as_user, events

    gvtest = 4242
    try:
        created, ran, who, listed = as_user(
            gvtest, Path(SOCKET),
            ("POST", "/v1/envs", {"name": "capped", "ttl": 300,
                                  "resource_limits": {"max_memory": 64}}),
            ("POST", "/v1/envs/capped/exec", {"command": [
                "python", "-c", "b = bytearray(128 * 2**20); b[::4096] = b'x' * len(b[::4096])"]}),
            ("POST", "/v1/envs/capped/exec", {"command": [
                "python", "-c", "import os; print(*os.getresuid(), *os.getresgid())"]}),
            ("GET", "/v1/envs", None))
        assert created[0] == 201, created
        assert created[1]["enforcement"]["limits"]["max_memory"]["enforced"] is True
        assert events(ran[1])["exit"]["killed_by"] == "memory", ran
        assert events(who[1])["stdout"].split() == [str(gvtest)] * 6, who
        assert [e["name"] for e in listed[1]] == ["capped"]
        assert registry.load(f"u{gvtest}-capped").caller_uid == gvtest
    finally:
        with contextlib.suppress(gestvenv.EnvironmentNotFoundError):
            asyncio.run(gestvenv.destroy_environment(f"u{gvtest}-capped"))
