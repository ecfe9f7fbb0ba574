"""Namespace isolation under the local runtime (bubblewrap), end to end (issue 11).

A hostile script runs inside the env and tries what THREATS in gestvenv/models.py lists: see host
processes, reach the host's loopback without network access, read homes and /etc/shadow, write
the host, see other environments, keep capabilities. Results (exit codes, signals, timeouts,
input, output) must be as without the sandbox. Everything here runs with runtime "local", also in
the systemd tier; where bwrap cannot create namespaces (no user namespaces), the tests skip with
the probe's reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import gestvenv
from gestvenv import IsolationLevel, ResourceLimits, ValidationError, registry
from gestvenv.runtime import bwrap, container
from gestvenv.runtime.processes import ENV_MARKER, marked_pids
from tests.harness.gv_env import gestvenv_environ

from .hostile_sdist import hostile_sdist, report_of

pytestmark = pytest.mark.local_runtime

CHECKOUT = Path(__file__).resolve().parents[2]
SITE = next((CHECKOUT / ".venv" / "lib").glob("python3*/site-packages"), CHECKOUT / ".venv")
NOBODY = 65534

REASON = bwrap.probe_for(os.geteuid(), namespaces=True)
needs_bwrap = pytest.mark.skipif(REASON is not None, reason=f"no bwrap sandbox here: {REASON}")

PROBE = textwrap.dedent("""
    import errno, json, os, socket, sys
    args = json.loads(sys.argv[1])
    out = {"pid": os.getpid(), "uid": os.getuid()}
    with open("/proc/1/cmdline", "rb") as f:
        out["init"] = f.read().split(b"\\0")[0].decode()
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    out["cap_eff"] = int(status["CapEff"].strip(), 16)
    out["cap_bnd"] = int(status["CapBnd"].strip(), 16)
    host = args.get("host_pid")
    if host:
        out["host_pid_in_proc"] = os.path.exists(f"/proc/{host}")
        try:
            os.kill(host, 0)
            out["kill"] = "ok"
        except OSError as exc:
            out["kill"] = errno.errorcode[exc.errno]
    def attempt(what, fn):
        try:
            fn()
            out[what] = "ok"
        except OSError as exc:
            out[what] = errno.errorcode.get(exc.errno, str(exc.errno))
    if args.get("port"):
        def connect():
            with socket.create_connection(("127.0.0.1", args["port"]), timeout=3):
                pass
        attempt("connect", connect)
    for path in args.get("read", []):
        attempt("read " + path, lambda p=path: open(p, "rb").close())
    for path in args.get("write", []):
        attempt("write " + path, lambda p=path: open(p, "w").close())
    for path in args.get("exists", []):
        out["exists " + path] = os.path.exists(path)
    print(json.dumps(out))
""")


async def probe(env: gestvenv.Environment, **args: object) -> dict[str, object]:
    script = env.path / "probe.py"
    script.write_text(PROBE)
    script.chmod(0o644)
    result = await env.execute([str(env.python), str(script), json.dumps(args)],
                               cwd=env.path, timeout=60)
    assert result.ok, result
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def exists(path: str) -> bool:
    return os.path.lexists(path)


def host_init() -> str:
    with open("/proc/1/cmdline", "rb") as f:
        return f.read().split(b"\0")[0].decode()


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP socket listening on the host's 127.0.0.1 (connects succeed without accept)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@needs_bwrap
async def test_namespace_is_applied_and_reported() -> None:
    async with gestvenv.ephemeral("ns", isolation_level="namespace") as env:
        assert env.runtime == "local"
        assert env.isolation is IsolationLevel.NAMESPACE
        held = env.enforcement.protections
        assert set(held) == set(gestvenv.models.THREATS)
        for threat in ("processes", "host_writes", "other_envs", "ipc_uts", "units"):
            assert not held[threat].startswith(gestvenv.models.NOT_HELD), (threat, held)
        assert "command of the env" in held["builds"]
        assert held["network"].startswith(gestvenv.models.NOT_HELD)  # network allowed
        info = env.info()
        assert info["enforcement"]["isolation_applied"] == "namespace"
    # Without a container engine, container isolation falls back to bubblewrap's namespace,
    # and says so (with one: tests/integration/test_container.py).
    async def no_engine(requested: str) -> tuple[None, str]:
        return None, "no container engine (podman or docker) is installed"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(container, "choose", no_engine)
        async with gestvenv.ephemeral("ctr", isolation_level="container") as env:
            assert env.isolation is IsolationLevel.NAMESPACE
            assert any("container requested" in n for n in env.enforcement.notes)


@needs_bwrap
async def test_pid_namespace_hides_host_processes() -> None:
    async with gestvenv.ephemeral("pidns", isolation_level="namespace") as env:
        seen = await probe(env, host_pid=os.getpid())
    assert isinstance(seen["pid"], int) and seen["pid"] < 10
    assert seen["init"] != host_init()
    assert "bwrap" in str(seen["init"])
    assert seen["host_pid_in_proc"] is False
    assert seen["kill"] == "ESRCH"


@needs_bwrap
async def test_no_network_cannot_reach_host_loopback(listener: int) -> None:
    limits = ResourceLimits(network_access=False)
    async with gestvenv.ephemeral("nonet", isolation_level="namespace",
                                  resource_limits=limits) as env:
        status = env.enforcement.limits["network_access"]
        assert status.enforced, status
        assert "network namespace" in status.mechanism
        assert not env.enforcement.protections["network"].startswith("not held")
        seen = await probe(env, port=listener)
    assert seen["connect"] in ("ECONNREFUSED", "ENETUNREACH"), seen
    async with gestvenv.ephemeral("net", isolation_level="namespace") as env:
        assert (await probe(env, port=listener))["connect"] == "ok"


@needs_bwrap
async def test_no_network_at_process_isolation_is_enforced_too(listener: int) -> None:
    limits = ResourceLimits(network_access=False)
    async with gestvenv.ephemeral("nonet-p", resource_limits=limits) as env:
        assert env.isolation is IsolationLevel.PROCESS
        assert env.enforcement.limits["network_access"].enforced
        seen = await probe(env, port=listener)
    assert seen["connect"] in ("ECONNREFUSED", "ENETUNREACH"), seen


@needs_bwrap
async def test_homes_hidden_and_secrets() -> None:
    home = Path("/root") if os.geteuid() == 0 else Path.home()
    secret_dir = Path(tempfile.mkdtemp(dir=home, prefix="gv-secret-"))
    try:
        secret = secret_dir / "secret.txt"
        secret.write_text("hunter2")
        secret.chmod(0o644)
        async with gestvenv.ephemeral("homes", isolation_level="namespace") as env:
            record = registry.load(env.name)
            seen = await probe(env, read=[str(secret), "/etc/shadow"],
                               exists=[str(secret_dir)])
    finally:
        shutil.rmtree(secret_dir)
    assert seen[f"read {secret}"] == "ENOENT"
    assert seen[f"exists {secret_dir}"] is False
    if os.geteuid() != 0 or record.sandbox_uid is not None:
        assert seen["read /etc/shadow"] in ("EACCES", "EPERM"), seen
        if os.geteuid() == 0:
            assert seen["uid"] == record.sandbox_uid
    else:
        # A root creator without a uid of the env's own runs as uid 0: the plan says so.
        assert env.enforcement.protections["secrets"].startswith("not held")


@needs_bwrap
async def test_host_read_only_env_writable_other_envs_invisible() -> None:
    async with gestvenv.ephemeral("other", isolation_level="namespace") as other, \
            gestvenv.ephemeral("rw", isolation_level="namespace") as env:
        writes = ["/usr/gv-probe", "/etc/gv-probe", "/var/lib/gv-probe",
                  str(other.path / "gv-probe"), str(env.path / "mine")]
        seen = await probe(env, write=writes, exists=[str(other.path), str(env.path)])
        assert (env.path / "mine").exists()
        assert not (other.path / "gv-probe").exists()
    for path in ("/usr/gv-probe", "/etc/gv-probe", "/var/lib/gv-probe"):
        assert seen[f"write {path}"] in ("EROFS", "EACCES", "EPERM"), (path, seen)
        assert not exists(path)
    assert seen[f"write {env.path / 'mine'}"] == "ok"
    assert seen[f"exists {other.path}"] is False
    assert seen[f"write {other.path / 'gv-probe'}"] in ("ENOENT", "EROFS", "EACCES")
    assert seen[f"exists {env.path}"] is True


@needs_bwrap
async def test_no_capabilities() -> None:
    async with gestvenv.ephemeral("caps", isolation_level="namespace") as env:
        seen = await probe(env)
    assert seen["cap_eff"] == 0
    assert seen["cap_bnd"] == 0


@needs_bwrap
async def test_results_unchanged() -> None:
    async with gestvenv.ephemeral("res", isolation_level="namespace") as env:
        done = await env.execute(["python", "-c",
                                  "import sys; print(sys.stdin.read().upper()); "
                                  "print('err', file=sys.stderr); sys.exit(7)"],
                                 input="hello", cwd=env.path)
        assert (done.returncode, done.stdout, done.stderr) == (7, "HELLO\n", "err\n")
        assert done.killed_by is None
        # 128+N from bwrap would look like exit(128+N): the sandbox's init tells them apart.
        done = await env.execute(["python", "-c", "import os; os.kill(os.getpid(), 15)"],
                                 cwd=env.path)
        assert done.returncode == -signal.SIGTERM
        done = await env.execute(["python", "-c", "import sys; sys.exit(143)"], cwd=env.path)
        assert done.returncode == 143
        streamed: list[tuple[str, str]] = []
        done = await env.execute(["python", "-c", "print('a'); print('b')"], cwd=env.path,
                                 stream=lambda name, text: streamed.append((name, text)))
        assert "".join(t for n, t in streamed if n == "stdout") == "a\nb\n" == done.stdout
        with pytest.raises(gestvenv.CommandNotFoundError):
            await env.execute([str(env.path / "missing")], cwd=env.path)


@needs_bwrap
async def test_timeout_kills_everything_in_the_sandbox() -> None:
    tag = f"{time.time_ns() % 10**6 + 1000}.25"  # a sleep only this test starts
    async with gestvenv.ephemeral("tmo", isolation_level="namespace") as env:
        started = time.monotonic()
        # The child leaves the process group and scrubs its environment (no marker).
        done = await env.execute(
            ["sh", "-c", f"setsid env -i sleep {tag} & sleep {tag}"],
            cwd=env.path, timeout=1)
        assert done.killed_by == "timeout"
        assert done.returncode == -signal.SIGKILL
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            left = [p.pid for p in psutil.process_iter(["cmdline"])
                    if p.info["cmdline"] and tag in p.info["cmdline"]]
            if not left:
                break
            await asyncio.sleep(0.05)
        assert not left
        assert marked_pids(ENV_MARKER, env.id) == []


@needs_bwrap
async def test_memory_limit_applies_in_the_sandbox() -> None:
    limits = ResourceLimits(max_memory=200)
    async with gestvenv.ephemeral("mem", isolation_level="namespace",
                                  resource_limits=limits, allow_unenforced=True) as env:
        done = await env.execute(
            ["python", "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0]);"
             "b = bytearray(400 << 20)"], cwd=env.path)
    assert done.stdout.split()[0] == str(200 << 20)
    assert "MemoryError" in done.stderr


@needs_bwrap
async def test_hidden_cwd_is_refused(tmp_path: Path) -> None:
    async with gestvenv.ephemeral("cwd", isolation_level="namespace") as env:
        with pytest.raises(ValidationError, match="hidden"):
            await env.execute(["true"], cwd=tmp_path)  # under /tmp: private inside
        assert (await env.execute(["true"], cwd="/")).ok


NON_ROOT = textwrap.dedent("""
    import asyncio, json, os, sys
    import gestvenv
    from gestvenv import ResourceLimits

    async def main():
        port = int(sys.argv[1])
        async with gestvenv.ephemeral("nobody", isolation_level="namespace",
                                      resource_limits=ResourceLimits(network_access=False)) as env:
            out = {"applied": env.isolation.value, "notes": list(env.enforcement.notes),
                   "uid": os.getuid()}
            if env.isolation.value == "namespace":
                code = ("import json, os, socket\\n"
                        "r = {'pid': os.getpid(), 'init': open('/proc/1/cmdline', 'rb').read()"
                        ".split(b'\\\\0')[0].decode()}\\n"
                        "try:\\n"
                        "    socket.create_connection(('127.0.0.1', %d), timeout=3).close()\\n"
                        "    r['connect'] = 'ok'\\n"
                        "except OSError as e:\\n"
                        "    r['connect'] = type(e).__name__\\n"
                        "print(json.dumps(r))\\n") % port
                done = await env.execute(["python", "-c", code], cwd=env.path)
                out["inside"] = json.loads(done.stdout) if done.ok else done.stderr
                # A link planted where the creator used to write after an install (a hostile
                # review found it: the creator sees its home, the sandbox does not).
                victim = os.path.join(os.environ["HOME"], "victim")
                with open(victim, "w") as f:
                    f.write("untouched\\n")
                plant = f"import os; os.symlink({victim!r}, 'bin/.gvtool.gestvenv')"
                await env.execute(["python", "-c", plant], cwd=env.path)
                try:
                    await env.install(["gvtool"])
                    out["install"] = (await env.execute(["gvtool"])).stdout
                except gestvenv.GestvenvError as exc:
                    out["install"] = str(exc)
                with open(victim) as f:
                    out["victim"] = f.read()
        print(json.dumps(out))
    asyncio.run(main())
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to nobody: needs root")
def test_non_root_user_gets_pid_namespace_and_no_network(listener: int,
                                                         wheelhouse: Path) -> None:
    if not (os.access("/usr/bin/python3", os.X_OK) and shutil.which("setpriv")):
        pytest.skip("needs /usr/bin/python3 and setpriv")
    reason = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/python3", "-I", "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); from gestvenv.runtime import bwrap; "
         "print(bwrap.probe_for(1, True) or '')", str(CHECKOUT)],
        capture_output=True, text=True, cwd="/").stdout.strip()
    if reason:
        pytest.skip(f"no bwrap sandbox for an unprivileged user here: {reason}")
    # Not under /tmp/pytest-of-root (0700): a dir of nobody's own.
    base = Path(tempfile.mkdtemp(prefix="gv-nobody-"))
    try:
        shutil.copytree(wheelhouse, base / "wheels")
        for path in (base, *base.rglob("*")):
            os.chown(path, NOBODY, NOBODY)
        env = {
            "HOME": str(base), "PATH": f"{CHECKOUT / '.venv' / 'bin'}:/usr/bin:/bin",
            "PYTHONPATH": f"{CHECKOUT}:{SITE}",
            **gestvenv_environ(base, cache=base / "cache", wheelhouse=base / "wheels"),
            "GESTVENV_EPHEMERAL_RUNTIME": "local",
        }
        done = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "/usr/bin/python3", "-c", NON_ROOT, str(listener)],
            env=env, capture_output=True, text=True, cwd=str(base), timeout=120)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.splitlines()[-1])
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
    assert out["uid"] == NOBODY
    assert out["applied"] == "namespace", out["notes"]
    inside = out["inside"]
    assert isinstance(inside, dict), inside
    assert inside["pid"] < 10
    assert inside["init"] != host_init()
    assert inside["connect"] in ("ConnectionRefusedError", "OSError"), inside
    assert out["victim"] == "untouched\n"
    assert out["install"] == "gvtool ran\n", out["install"]


def test_probe_is_cached() -> None:
    first = bwrap.probe_for(os.geteuid(), namespaces=True)
    started = time.monotonic()
    assert bwrap.probe_for(os.geteuid(), namespaces=True) == first
    assert time.monotonic() - started < 0.01
    assert sys.modules["gestvenv.runtime.bwrap"] is bwrap


@needs_bwrap
async def test_a_hostile_build_is_held_by_the_local_sandbox(tmp_path: Path) -> None:
    """The sdist's backend runs inside bubblewrap, as the env's uid for a root creator: no
    marker on /, no home, no host loopback; under RLIMIT_AS its allocation fails."""
    with hostile_sdist(tmp_path / "src", alloc_mb=600) as (sdist, tag, listener):
        limits = ResourceLimits(network_access=False, max_memory=256)
        async with gestvenv.ephemeral("lbuild", isolation_level="namespace",
                                      resource_limits=limits) as env:
            with pytest.raises(gestvenv.BuildError, match="failed inside environment") as caught:
                await env.install([str(sdist)])
            report = report_of(str(caught.value))
            assert report["uid"] != 0  # a root creator's build runs as the env's own uid
            for key in ("root_marker", "read_home", "network"):
                assert report[key].startswith("held "), (key, report[key])
            assert "MemoryError" in str(caught.value)  # RLIMIT_AS: the allocation failed
            assert not os.path.lexists("/" + tag)  # noqa: ASYNC240 - one stat
            with pytest.raises(BlockingIOError):
                listener.accept()
            assert (await env.execute(["python", "-c", "print('usable')"])).stdout == "usable\n"
