"""Hostile tests: code inside an environment tries to get out (tests/integration/hostile_probe.py).

Run as root in the systemd tier (the system manager), as the user gvtest there (a user manager
on a cgroup v1/v2 hybrid with systemd 252), and as a non-root user in the cgroup v2 VM (systemd
257). Each attempt that escapes must be one that the environment's own report
(``env.enforcement.protections``) says is not held: the report is honest, and at namespace
isolation and above a root creator's environment holds everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gestvenv
from gestvenv import IsolationLevel, ResourceLimits, storage
from gestvenv.config import load_config
from gestvenv.models import NOT_HELD, THREATS

from ..support import gvtest, run_as_gvtest

PROBE = Path(__file__).resolve().parents[1] / "hostile_probe.py"

# Which threat (gestvenv.models.THREATS) each attempt of the probe tests.
THREAT_OF = {
    "capabilities": "privileges", "read /etc/shadow": "secrets", "list /root": "secrets",
    "read ": "secrets", "read other env": "other_envs", "list shared": "other_envs",
    "write /dev/shm": "host_writes", "write ": "host_writes", "remount": "host_writes",
    "mount(2)": "host_writes", "see the host's init": "processes",
    "see a host process": "processes", "signal a host process": "processes",
    "count processes": "processes", "start a unit": "units", "connect to the system bus": "units",
    "set the hostname": "ipc_uts", "write a sysctl": "kernel", "read the kernel log": "kernel",
    "write the host's /dev/shm": "host_writes", "connect to the host's loopback": "network",
    "ptrace": "processes",
}


def threat_of(attempt: str) -> str:
    for prefix in sorted(THREAT_OF, key=len, reverse=True):
        if attempt.startswith(prefix):
            return THREAT_OF[prefix]
    raise AssertionError(f"attempt {attempt!r} has no threat")


def escapes(report: dict[str, Any]) -> dict[str, str]:
    return {name: r["detail"] for name, r in report["results"].items()
            if r["escaped"] and not name.startswith("in-place edit")}


def unexplained(report: dict[str, Any], protections: dict[str, str]) -> dict[str, str]:
    """Escapes that the environment's report does not own up to."""
    assert set(protections) == set(THREATS), protections
    return {name: detail for name, detail in escapes(report).items()
            if not protections[threat_of(name)].startswith(NOT_HELD)}


@pytest.fixture
def home_secret() -> Iterator[Path]:
    """A private file in the creator's home (for root: /root)."""
    home = Path(os.path.expanduser("~"))
    path = home / f"gv-secret-{secrets.token_hex(4)}"
    path.write_text("ssh-key-material\n")
    path.chmod(0o600)
    yield path
    path.unlink()


@pytest.fixture
def host_shm() -> Iterator[Path]:
    path = Path(f"/dev/shm/gv-host-{secrets.token_hex(4)}")
    path.write_text("host\n")
    yield path
    path.unlink()


@pytest.fixture
def listener() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


def no_mark_outside(mark: str, cache: Path) -> list[str]:
    found = []
    for directory in ("/usr", "/usr/local", "/etc", "/var/lib", "/var/cache", "/run/lock",
                      "/run", "/dev/shm", "/tmp"):
        if os.path.exists(os.path.join(directory, mark)):
            found.append(os.path.join(directory, mark))
    done = subprocess.run(["grep", "-rl", mark, str(cache)], capture_output=True, text=True)
    found += done.stdout.split()
    templates = storage.templates_dir(load_config())
    if templates.exists():
        done = subprocess.run(["grep", "-rl", mark, str(templates)], capture_output=True,
                              text=True)
        found += done.stdout.split()
    units = subprocess.run(["systemctl", "list-units", "--all", "--plain", "--no-legend",
                            f"{mark}*"], capture_output=True, text=True).stdout
    found += units.split()
    return found


async def probe_in(env: gestvenv.Environment, args: dict[str, Any]) -> dict[str, Any]:
    """Run the probe inside ``env`` (copied into its dir: the host's paths are hidden)."""
    script = env.path / "probe.py"
    await asyncio.to_thread(shutil.copy, PROBE, script)
    result = await env.execute(["python", str(script), json.dumps(args)], cwd=str(env.path),
                               timeout=60)
    assert result.returncode == 0, result.stderr  # ordinary errors inside, no traceback
    assert result.killed_by is None
    return json.loads(result.stdout)


@pytest.mark.v2
@pytest.mark.parametrize(("level", "network"), [
    (IsolationLevel.CONTAINER, False), (IsolationLevel.NAMESPACE, True)])
async def test_a_hostile_command_gets_nothing_out(
        level: IsolationLevel, network: bool, home_secret: Path, listener: int,
        shared_cache: Path, host_shm: Path) -> None:
    root = os.geteuid() == 0
    async with gestvenv.ephemeral("victim", runtime="systemd", isolation_level=level) as victim:
        victim_secret = victim.path / "victim-secret.txt"
        victim_secret.write_text("the victim's data\n")
        limits = ResourceLimits(network_access=network)
        async with gestvenv.ephemeral("hostile", packages=["six"], runtime="systemd",
                                      isolation_level=level, resource_limits=limits) as env:
            assert env.isolation is level
            six_py = next(env.path.glob("lib/python*/site-packages/six/__init__.py"))
            args = {
                "secrets": [str(home_secret)], "other_env_files": [str(victim_secret)],
                "shared_dirs": [str(env.path.parent)], "own_names": [env.path.name],
                "host_pid": os.getpid(), "ptrace_pid": os.getpid(),
                "edit_files": [str(six_py)], "host_shm_probe": str(host_shm),
                # The interpreter's prefix, bound back read-only where it lives under /root.
                "root_exposed": [Path(p).relative_to("/root").parts[0]
                                 for p in env.info()["sandbox_expose"]
                                 if p.startswith("/root/")],
            }
            if not network:
                args["tcp_port"] = listener
            report = await probe_in(env, args)
            protections = env.enforcement.protections
            print(json.dumps({"protections": protections, "report": report}, indent=1))
            assert unexplained(report, protections) == {}
            if root:  # the system manager: every threat held, nothing escapes
                assert [v for v in protections.values() if v.startswith(NOT_HELD)] == [] \
                    if not network else \
                    [k for k, v in protections.items() if v.startswith(NOT_HELD)] == ["network"]
                assert escapes(report) == {}
                assert report["uid"] != 0
            edited = report["results"][f"in-place edit {six_py}"]
            mark = report["mark"]
            if root:  # a hardlink of the cache's, root's and read-only to the env's uid
                assert not edited["escaped"] and edited["errno"] == "EACCES", edited
            else:  # the env's own copy: the edit reaches only it
                assert edited["escaped"] and mark in six_py.read_text()
        async with gestvenv.ephemeral("fresh", packages=["six"], runtime="systemd") as fresh:
            out = await fresh.execute(["python", "-c", "import six; print(hasattr(six, "
                                       "'GESTVENV_POISON'))"])
            assert out.stdout == "False\n", out.stderr
        assert no_mark_outside(mark, shared_cache) == []
        assert victim_secret.read_text() == "the victim's data\n"


async def test_the_report_lists_every_threat_with_its_mechanism() -> None:
    async with gestvenv.ephemeral("report", runtime="systemd",
                                  isolation_level=IsolationLevel.NAMESPACE) as env:
        protections = env.enforcement.protections
        assert list(protections) == list(THREATS)
        if os.geteuid() == 0:
            assert "setpriv" in protections["privileges"]
            assert "ProtectHome=tmpfs" in protections["secrets"]
        shown = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gestvenv", "ephemeral", "show", "report"],
            capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        for threat in THREATS:
            assert threat in shown.stdout


# --- a user manager on the hybrid host (gvtest) -------------------------------------------------

USER_SCRIPT = """
import asyncio, json, os, shutil, sys
import gestvenv
from gestvenv import IsolationLevel, ResourceLimits
probe, home = sys.argv[1], os.path.expanduser("~")
secret = os.path.join(home, "gv-user-secret")
with open(secret, "w") as f:
    f.write("key\\n")
os.chmod(secret, 0o600)
shm = f"/dev/shm/gv-user-host-{os.getpid()}"
open(shm, "w").close()

async def main():
    async with gestvenv.ephemeral("uhostile", runtime="systemd",
                                  isolation_level=IsolationLevel.CONTAINER,
                                  resource_limits=ResourceLimits(network_access=False)) as env:
        script = env.path / "probe.py"
        shutil.copy(probe, script)
        args = {"secrets": [secret], "host_pid": os.getppid(), "shared_dirs": [],
                "ptrace_pid": os.getppid(), "host_shm_probe": shm}
        result = await env.execute(["python", str(script), json.dumps(args)],
                                   cwd=str(env.path), timeout=60)
        print(json.dumps({"rc": result.returncode, "stderr": result.stderr,
                          "report": json.loads(result.stdout or "{}"),
                          "protections": env.enforcement.protections,
                          "applied": env.isolation.value}))
try:
    asyncio.run(main())
finally:
    os.unlink(secret)
    os.unlink(shm)
"""


def test_a_hostile_command_of_a_user_manager_env_gets_out_only_where_the_report_says() -> None:
    gvtest()
    done = run_as_gvtest("/usr/bin/python3", "-c", USER_SCRIPT, str(PROBE), timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    print(json.dumps(out, indent=1))
    if out["applied"] == "process":
        pytest.skip("this user manager cannot sandbox (no user namespaces): reported as such")
    assert out["rc"] == 0, out["stderr"]
    assert unexplained(out["report"], out["protections"]) == {}
    for threat in ("privileges", "secrets", "host_writes", "units", "ipc_uts", "kernel",
                   "network"):
        assert not out["protections"][threat].startswith(NOT_HELD), threat
