"""Users of root's service: each caller, known by its uid (SO_PEERCRED), gets environments that
run as that uid, in a sandbox, and sees and acts on those only; root's own and another user's
are beyond its reach, whatever it names. The callers are real processes of other uids speaking
HTTP over the socket (the standard library's client: any uid can run /usr/bin/python3)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")

import contextlib

import gestvenv
from gestvenv import registry
from gestvenv.runtime.systemd import systemd_booted

from .test_api import service  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="root's service, other uids")]

# Two users: the test host's gvtest where it exists (its manager and home are real), and
# uids with no account at all (a uid is all SO_PEERCRED and User= need).
ALICE, BOB = (4242 if systemd_booted() else 64001), 64002

_CALLER = r"""
import http.client, json, socket, sys

class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])

out = []
for method, path, body in json.loads(sys.argv[2]):
    c = Unix("gestvenv", timeout=300)
    data = body.encode() if isinstance(body, str) else (json.dumps(body).encode()
                                                         if body is not None else None)
    c.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    out.append([r.status, r.read().decode(errors="replace")])
    c.close()
print(json.dumps(out))
"""


def as_user(uid: int, sock: Path, *requests: tuple[str, str, Any]) -> list[tuple[int, Any]]:
    """Each request in turn, from a process of ``uid``: (status, JSON or the text)."""
    done = subprocess.run(["/usr/bin/python3", "-I", "-c", _CALLER, str(sock),
                           json.dumps(requests)], user=uid, group=uid, extra_groups=[],
                          capture_output=True, text=True, timeout=600, cwd="/")
    assert done.returncode == 0, done.stderr
    out = []
    for status, text in json.loads(done.stdout):
        out.append((status, _decoded(text)))
    return out


def _decoded(text: str) -> Any:
    """JSON, a stream of JSON lines, or a file's content."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
        return text


def events(body: Any) -> dict[str, Any]:
    """An exec's stream: its output joined, and its exit."""
    return {"stdout": "".join(e["data"] for e in body if e["event"] == "stdout"),
            "exit": next((e["result"] for e in body if e["event"] == "exit"), None),
            "error": next((e["problem"] for e in body if e["event"] == "error"), None)}


@pytest.fixture
def shared(service: Path) -> Path:  # noqa: F811
    """The socket reachable by every uid (as the system socket is: peer credentials decide)."""
    os.chmod(service, 0o666)
    return service


def test_a_user_s_env_runs_as_that_user_and_is_its_own(shared: Path) -> None:
    root_env = f"u{ALICE}-mine"  # root's own env, named as alice's would be: still root's
    asyncio_run(gestvenv.create_environment(root_env, ttl=300))
    try:
        (taken,) = as_user(ALICE, shared, ("POST", "/v1/envs", {"name": "mine", "ttl": 300}))
        assert taken[0] == 409, taken  # the name is root's env's: alice's is not made
        asyncio_run(gestvenv.destroy_environment(root_env))
        created, ran, listed, shown = as_user(
            ALICE, shared,
            ("POST", "/v1/envs", {"name": "mine", "ttl": 300}),
            ("POST", "/v1/envs/mine/exec", {"command": ["python", "-c",
                                                        "import os; print(os.getuid(), "
                                                        "os.getgid(), os.getgroups())"]}),
            ("GET", "/v1/envs", None),
            ("GET", "/v1/envs/mine", None))
        assert created[0] == 201, created
        assert created[1]["name"] == "mine"
        assert created[1]["enforcement"]["isolation_applied"] == "namespace"
        record = registry.load(f"u{ALICE}-mine")
        assert record.caller_uid == ALICE == record.sandbox_uid
        result = events(ran[1])
        assert result["exit"]["returncode"] == 0, ran
        assert result["stdout"].split()[:2] == [str(ALICE), str(ALICE)]
        assert [e["name"] for e in listed[1]] == ["mine"]
        assert shown[1]["name"] == "mine"
    finally:
        for name in (root_env, f"u{ALICE}-mine"):
            with contextlib.suppress(gestvenv.EnvironmentNotFoundError):
                asyncio_run(gestvenv.destroy_environment(name))


def test_no_user_reaches_root_s_or_another_user_s_env(shared: Path, tmp_path: Path) -> None:
    asyncio_run(gestvenv.create_environment("roots", ttl=300))
    try:
        (made,) = as_user(ALICE, shared, ("POST", "/v1/envs", {"name": "alices", "ttl": 300}))
        assert made[0] == 201, made
        for uid, other in ((BOB, "alices"), (BOB, f"u{ALICE}-alices"), (ALICE, "roots"),
                           (BOB, "roots")):
            answers = as_user(
                uid, shared,
                ("GET", f"/v1/envs/{other}", None),
                ("GET", f"/v1/envs/{other}/usage", None),
                ("POST", f"/v1/envs/{other}/exec", {"command": ["true"]}),
                ("PUT", f"/v1/envs/{other}/files/planted.py", "print('x')"),
                ("GET", f"/v1/envs/{other}/files/planted.py", None),
                ("POST", f"/v1/envs/{other}/install", {"packages": ["six"]}),
                ("POST", f"/v1/envs/{other}/ttl", {"extend": 60}),
                ("POST", f"/v1/envs/{other}/execs/0123456789abcdef/signal",
                 {"signal": "TERM"}),
                ("DELETE", f"/v1/envs/{other}", None))
            assert [a[0] for a in answers] == [404] * 9, (uid, other, answers)
            assert all(a[1]["type"] == "urn:gestvenv:problem:no-such-environment"
                       for a in answers)
            listed, stats = as_user(uid, shared, ("GET", "/v1/envs", None),
                                    ("GET", "/v1/stats", None))
            assert [e["name"] for e in listed[1]] == (["alices"] if uid == ALICE else [])
            assert stats[0] == 403
        assert registry.load("roots") and registry.load(f"u{ALICE}-alices")
        assert registry.load("roots").ttl == 300  # (not extended by another user)
        assert not (Path(registry.load("roots").path) / "planted.py").exists()
    finally:
        for name in ("roots", f"u{ALICE}-alices"):
            with contextlib.suppress(gestvenv.EnvironmentNotFoundError):
                asyncio_run(gestvenv.destroy_environment(name))


def test_a_user_s_files_are_written_and_read_as_that_user(shared: Path,
                                                          tmp_path: Path) -> None:
    secret = tmp_path / "root-only"
    secret.write_text("root's")
    secret.chmod(0o600)
    try:
        answers = as_user(
            ALICE, shared,
            ("POST", "/v1/envs", {"name": "files", "ttl": 300}),
            ("PUT", "/v1/envs/files/files/job/run.py",
             "import os; print(os.stat('job/run.py').st_uid)"),
            ("POST", "/v1/envs/files/exec", {"command": ["python", "job/run.py"]}),
            ("POST", "/v1/envs/files/exec", {"command": ["ln", "-s", str(secret), "link"]}),
            ("GET", "/v1/envs/files/files/link", None),
            ("PUT", "/v1/envs/files/files/link", "overwritten"),
            ("GET", "/v1/envs/files/files/job/run.py", None))
        created, put, ran, linked, read_link, write_link, got = answers
        assert created[0] == 201 and put[0] == 201, put
        assert events(ran[1])["stdout"].strip() == str(ALICE)  # the file is the caller's
        assert events(linked[1])["exit"]["returncode"] == 0
        assert read_link[0] == 403 and write_link[0] == 403, answers
        assert secret.read_text() == "root's"
        assert got == (200, "import os; print(os.stat('job/run.py').st_uid)")
    finally:
        with contextlib.suppress(gestvenv.EnvironmentNotFoundError):
            asyncio_run(gestvenv.destroy_environment(f"u{ALICE}-files"))


@pytest.mark.skipif(not systemd_booted(), reason="a memory limit killed by the kernel: cgroups "
                                                 "(the systemd runtime)")
def test_a_user_s_memory_limit_is_enforced_by_the_system_manager(shared: Path) -> None:
    """On the hybrid host a user's own manager has no memory controller; root's service puts
    the user's env in the system manager's slice, where the limit holds."""
    try:
        created, ran, whoami = as_user(
            ALICE, shared,
            ("POST", "/v1/envs", {"name": "capped", "ttl": 300,
                                  "resource_limits": {"max_memory": 64}}),
            ("POST", "/v1/envs/capped/exec", {"command": [
                "python", "-c", "b = bytearray(128 * 2**20); b[::4096] = b'x' * len(b[::4096])"]}),
            ("POST", "/v1/envs/capped/exec", {"command": [
                "python", "-c", "import os; print(*os.getresuid(), *os.getresgid())"]}))
        assert created[0] == 201, created
        assert created[1]["enforcement"]["limits"]["max_memory"]["enforced"] is True
        result = events(ran[1])
        assert result["exit"]["killed_by"] == "memory", ran
        assert result["exit"]["oom_killed"] is True
        record = registry.load(f"u{ALICE}-capped")
        assert record.runtime == "systemd" and record.sandbox_uid == ALICE
        # Its units are the system manager's (the user's own has no memory controller here).
        unit = subprocess.run(["systemctl", "show", f"gestvenv-{record.stem}.service",
                               "-p", "ActiveState"], capture_output=True, text=True).stdout
        assert unit.strip() == "ActiveState=active", unit
        assert events(whoami[1])["stdout"].split() == [str(ALICE)] * 6, whoami
    finally:
        with contextlib.suppress(gestvenv.EnvironmentNotFoundError):
            asyncio_run(gestvenv.destroy_environment(f"u{ALICE}-capped"))


def asyncio_run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)
