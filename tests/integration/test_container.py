"""Container isolation for real: a podman (or docker) container per environment.

Runs in both tiers: on this host the local runtime (the engine holds the limits), in the systemd
test host the systemd runtime (the container and its conmon are scopes in the env's slice).
Skipped, with the reason, where no engine answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gestvenv
from gestvenv import (
    CommandNotFoundError,
    IsolationLevel,
    ResourceLimits,
    ValidationError,
    storage,
)
from gestvenv.config import load_config
from gestvenv.container import engine as engines
from gestvenv.container import images
from gestvenv.models import NOT_HELD, THREATS
from gestvenv.runtime.systemd import systemd_booted

from . import dockerd
from .systemd.test_hostile import (  # (and two of its fixtures)
    PROBE,
    escapes,
    home_secret,  # noqa: F401 (a fixture)
    host_shm,  # noqa: F401 (a fixture)
    unexplained,
)

CONTAINER = IsolationLevel.CONTAINER
SYSTEMD = systemd_booted()


CONF_DIR = Path(tempfile.gettempdir())
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a filesystem needs root")


DOCKER_WHY: list[str] = []  # why the session has no docker daemon


@pytest.fixture(scope="session")
def docker_host() -> Iterator[str | None]:
    """A private dockerd for the session (root, docker.io installed), else None (the reason
    in DOCKER_WHY)."""
    if (why := dockerd.missing()) is not None:
        DOCKER_WHY.append(why)
        yield None
        return
    try:
        daemon = dockerd.daemon()
        host = daemon.__enter__()
    except RuntimeError as exc:
        DOCKER_WHY.append(str(exc).splitlines()[-1][-300:])
        yield None
        return
    try:
        before = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = host
        try:
            yield host
        finally:
            if before is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = before
    finally:
        daemon.__exit__(None, None, None)


@pytest.fixture(params=["podman", "docker"])
def engine(request: pytest.FixtureRequest, docker_host: str | None,
           monkeypatch: pytest.MonkeyPatch) -> engines.Engine:
    """Each engine the tests can reach, as config ``container_engine``."""
    name = str(request.param)
    if name == "docker" and docker_host is None:
        pytest.skip(f"no docker daemon: {'; '.join(DOCKER_WHY)}")
    found, why = engines.find(name, CONF_DIR)
    if found is None:
        pytest.skip(f"no {name}: {why}")
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CONTAINER_ENGINE", name)
    return found


@pytest.fixture
def listener() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


HOST_INIT = Path("/proc/1/cmdline").read_bytes()


async def test_the_products_sandbox_example_runs_as_written(engine: engines.Engine) -> None:
    cache = storage.uv_cache_dir(load_config())
    async with gestvenv.ephemeral("sandbox", isolation_level=IsolationLevel.CONTAINER) as env:
        assert env.isolation is CONTAINER
        assert env.enforcement.runtime == ("systemd" if SYSTEMD else "local")
        facts = env.container
        assert facts is not None and facts["engine"] == engine.name
        probe = ("import json, os; print(json.dumps({'init': open('/proc/1/cmdline', 'rb')"
                 ".read().decode(errors='replace'), 'pid': os.getpid(), 'exists': {p: "
                 "os.path.exists(p) for p in %r}, 'uid': os.getuid(), 'root': "
                 "sorted(os.listdir('/root')) if os.path.isdir('/root') else []}))")
        paths = ["/root/.bashrc", "/home", str(cache), "/etc/shadow", "/usr/bin/apt"]
        result = await env.execute(["python", "-c", probe % paths])
        assert result.ok, result.stderr
        seen = json.loads(result.stdout)
        # PID 1 is the container's init, not the host's.
        assert seen["init"].encode() != HOST_INIT
        assert f"{engine.name}-init" in seen["init"], seen["init"]
        assert seen["pid"] < 100
        assert not any(seen["exists"].values()), seen["exists"]
        # Of /root, only an interpreter that lives there (pyenv's), at its own path.
        assert seen["root"] in ([], [".pyenv"]), seen["root"]
        assert seen["root"] == [] or env.python.resolve().is_relative_to("/root/.pyenv")
        if os.geteuid() == 0:
            assert seen["uid"] != 0  # the env's own uid, not root
        # `podman ps` lists it, with its labels, for as long as the env lives.
        listed = engine.ours(env_id=env.id)
        assert [c["name"] for c in listed] == [facts["name"]]
        assert listed[0]["state"].lower().startswith(("running", "up"))
        assert listed[0][f"label:{engines.LABEL_ENV}"] == "sandbox"
        assert listed[0][f"label:{engines.LABEL_OWNER}"] == str(os.geteuid())
        env_id = env.id
    assert engine.ours(env_id=env_id) == []


async def test_memory_processes_cpu_and_network_hold_in_the_container(
        listener: int, engine: engines.Engine) -> None:
    limits = ResourceLimits(max_memory=64, max_processes=12, max_cpu_percent=25,
                            network_access=False)
    async with gestvenv.ephemeral("limits", isolation_level=CONTAINER,
                                  resource_limits=limits) as env:
        assert env.enforcement.unenforced == {}
        oom = await env.execute(["python", "-c", "b = bytearray(200 << 20); print('alive')"])
        assert oom.returncode == -9 and oom.killed_by == "memory" and oom.oom_killed, oom
        assert "alive" not in oom.stdout
        forks = await env.execute(["python", "-c", (
            "import os, time\nn = 0\ntry:\n    for _ in range(50):\n"
            "        if os.fork() == 0:\n            time.sleep(0.5); os._exit(0)\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e.errno)\n")])
        assert forks.ok, forks.stderr
        made, errno_ = map(int, forks.stdout.split())
        assert errno_ == 11 and made < 12, forks.stdout  # EAGAIN: the task limit
        await asyncio.sleep(0.6)  # (the forks end)
        busy = await env.execute(["python", "-c", (
            "import os, time\nt = time.monotonic()\nwhile time.monotonic() - t < 2: pass\n"
            "print(os.times().user + os.times().system)")])
        assert busy.ok, busy.stderr
        assert float(busy.stdout) < 2 * 0.25 * 1.6, busy.stdout  # 25 % of a CPU, not 100 %
        net = await env.execute(["python", "-c", (
            "import socket, sys\ntry:\n"
            "    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2)\n"
            "    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)\n"),
            str(listener)])
        assert net.stdout.startswith("refused"), net.stdout
        ifaces = await env.execute(["python", "-c", "import socket; print(sorted(n for _, n in "
                                    "socket.if_nameindex()))"])
        assert ifaces.stdout.strip() == "['lo']"


@root_only
async def test_max_disk_holds_in_the_container(engine: engines.Engine) -> None:
    async with gestvenv.ephemeral("capped", isolation_level=CONTAINER, storage_backend="tmpfs",
                                  resource_limits=ResourceLimits(max_disk=20)) as env:
        assert env.enforcement.limits["max_disk"].enforced
        for target in (str(env.path / "fill"), "/tmp/fill", "/var/tmp/fill", "/dev/shm/fill"):
            full = await env.execute(["python", "-c", (
                "import sys\nf = open(sys.argv[1], 'wb')\ntry:\n"
                "    for _ in range(64):\n        f.write(b'x' * (1 << 20))\n    f.flush()\n"
                "    print('wrote 64 MB')\nexcept OSError as e:\n    print('full', e.errno)\n"
                "f.close()\nimport os; os.unlink(sys.argv[1])"), target])
            assert full.stdout.strip() == "full 28", (target, full.stdout, full.stderr)


async def test_results_timeouts_and_errors_are_those_of_every_level(
        monkeypatch: pytest.MonkeyPatch, engine: engines.Engine) -> None:
    monkeypatch.setenv("GV_HOST_SECRET", "s3cr3t")
    async with gestvenv.ephemeral("results", isolation_level=CONTAINER) as env:
        assert (await env.execute(["python", "-c", "raise SystemExit(3)"])).returncode == 3
        term = await env.execute(["python", "-c", "import os, signal; os.kill(os.getpid(), "
                                  "signal.SIGTERM)"])
        assert term.returncode == -15 and term.killed_by is None
        shell = await env.execute("echo $((6 * 7)) >&2; exit 137", shell=True)
        # Its own 137, no signal: exact with podman (a status channel); docker has none, and
        # an exit status above 128 reads as a signal there (docs/containers.md).
        assert shell.returncode == (137 if engine.name == "podman" else -9)
        assert shell.stderr == "42\n"
        piped = await env.execute(["python", "-c", "import sys; print(sys.stdin.read()[::-1])"],
                                  input="abc")
        assert piped.stdout == "cba\n"
        started = time.monotonic()
        slow = await env.execute(["python", "-c", "import time; print('started', flush=True); "
                                  "time.sleep(60)"], timeout=1.5)
        assert slow.killed_by == "timeout" and slow.returncode == -9
        assert slow.stdout == "started\n" and time.monotonic() - started < 10
        # Nothing of it is left inside the container.
        procs = await env.execute(["python", "-c", (
            "import os\nprint(sum(1 for p in os.listdir('/proc') if p.isdigit() and "
            "'sleep(6' + '0)' in open(f'/proc/{p}/cmdline').read()))")])
        assert procs.stdout.strip() == "0", procs
        with pytest.raises(CommandNotFoundError, match="inside the container"):
            await env.execute(["/usr/bin/apt", "--version"])
        with pytest.raises(ValidationError, match="does not exist inside environment"):
            await env.execute(["python", "-V"], cwd="/")
        here = await env.execute(["python", "-c", "import os; print(os.getcwd())"],
                                 cwd=str(env.path))
        assert here.stdout.strip() == str(env.path.resolve())
        secret = await env.execute(["python", "-c", "import os; print(os.environ.get("
                                    "'GV_HOST_SECRET'), os.environ.get('MINE'))"],
                                   env={"MINE": "1"})
        assert secret.stdout.split() == ["None", "1"]  # the host's variables stay outside


@pytest.fixture
def readable_wheelhouse(wheelhouse: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The wheelhouse where the env's own uid can read it (pytest's temp dirs are root's
    alone), as config find_links: the container binds it read-only for the env's pip."""
    copy = Path(tempfile.mkdtemp(prefix="gv-wheels-", dir="/var/tmp"))
    copy.chmod(0o755)
    for wheel in wheelhouse.iterdir():
        shutil.copy(wheel, copy / wheel.name)
        (copy / wheel.name).chmod(0o644)
    monkeypatch.setenv("GESTVENV_EPHEMERAL_FIND_LINKS", str(copy))
    yield copy
    shutil.rmtree(copy)


async def test_install_and_pip_work_inside(readable_wheelhouse: Path,
                                           engine: engines.Engine) -> None:
    async with gestvenv.ephemeral("installs", isolation_level=CONTAINER,
                                  packages=["gvdemo"]) as env:
        await env.install(["gvtool"])
        ran = await env.execute(["gvtool"])
        assert ran.stdout == "gvtool ran\n", ran.stderr
        pip = await env.execute(["pip", "install", "--quiet", "six==1.16.0"])
        assert pip.ok, pip.stderr
        both = await env.execute(["python", "-c", "import gvdemo, six; print(gvdemo.VALUE, "
                                  "six.__file__.startswith(__import__('sys').prefix))"])
        assert both.stdout.split() == ["42", "True"], both.stderr


async def test_a_second_env_of_the_set_reuses_its_image_and_the_image_runs_elsewhere(
        tmp_path: Path, engine: engines.Engine) -> None:
    async with gestvenv.ephemeral("first", isolation_level=CONTAINER,
                                  packages=["gvdemo"]) as env:
        first = (env.container or {}).get("packages_image")
        assert first
    listed = {i.ref: i for i in images.list_images(engine)}
    made = listed[first]
    started = time.monotonic()
    async with gestvenv.ephemeral("second", isolation_level=CONTAINER,
                                  packages=["gvdemo"]) as env:
        assert (env.container or {}).get("packages_image") == first
    took = time.monotonic() - started
    again = {i.ref: i for i in images.list_images(engine)}[first]
    assert (again.id, again.created) == (made.id, made.created)  # reused, not rebuilt
    print(f"second env of the set: {took:.2f}s")
    # Saved, removed, loaded: a container of the loaded image imports the packages.
    archive = tmp_path / "set.tar"
    images.save(engine, first, archive)
    engine.run("rmi", first)
    assert first not in {i.ref for i in images.list_images(engine)}
    assert first in images.load(engine, archive)
    ran = engine.run("run", "--rm", "--network", "none", "--pull", "never", first,
                       "python", "-c", "import gvdemo, gvdep; print(gvdemo.VALUE)", check=False)
    assert ran.returncode == 0 and ran.stdout.decode() == "42\n", ran.stderr


async def gv(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gestvenv",
                                                    "ephemeral", *args],
                                   capture_output=True, text=True)


async def test_the_cli_lists_and_saves_images(tmp_path: Path, engine: engines.Engine) -> None:
    async with gestvenv.ephemeral("cli", isolation_level=CONTAINER, packages=["six"]) as env:
        listed = await gv("images", "--json")
        assert listed.returncode == 0, listed.stderr
        refs = {i["ref"]: i["kind"] for i in json.loads(listed.stdout)}
        facts = env.container or {}
        assert refs[facts["image"]] == "base" and refs[facts["packages_image"]] == "packages"
        saved = await gv("images", "save", "--env", "cli", "-o", str(tmp_path / "cli.tar"))
        assert saved.returncode == 0, saved.stderr
        assert (tmp_path / "cli.tar").stat().st_size > 1 << 20
        shown = await gv("show", "cli", "--json")
        assert json.loads(shown.stdout)["container"]["name"] == facts["name"]
        human = await gv("show", "cli")
        assert f"container:   {facts['name']} ({engine.name}, image {facts['image']}" \
            in human.stdout, human.stdout


async def test_without_an_engine_the_strongest_sandbox_applies_and_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CONTAINER_ENGINE", "podman")
    monkeypatch.setattr(engines.shutil, "which", lambda name, *a, **k: None)  # none installed
    async with gestvenv.ephemeral("fallback", isolation_level=CONTAINER,
                                  allow_unenforced=True) as env:
        assert env.isolation is not CONTAINER and env.container is None
        assert any("no container engine" in n for n in env.enforcement.notes), \
            env.enforcement.notes


@pytest.mark.skipif(os.geteuid() != 0, reason="the root creator's probe (the user manager's "
                    "is in the systemd tier and the VM)")
async def test_the_hostile_probe_gets_nothing_out_of_a_container(
        listener: int, shared_cache: Path, engine: engines.Engine,
        home_secret: Path, host_shm: Path) -> None:  # noqa: F811 (the hostile test's fixtures)
    secret, shm = home_secret, host_shm
    async with gestvenv.ephemeral("victim", isolation_level=CONTAINER) as victim:
        victim_secret = victim.path / "victim-secret.txt"
        victim_secret.write_text("the victim's data\n")
        async with gestvenv.ephemeral(
                "hostile", packages=["six"], isolation_level=CONTAINER,
                resource_limits=ResourceLimits(network_access=False)) as env:
            six_py = next(env.path.glob("lib/python*/site-packages/six/__init__.py"))
            script = env.path / "probe.py"
            await asyncio.to_thread(shutil.copy, PROBE, script)
            args = {"secrets": [str(secret)], "other_env_files": [str(victim_secret)],
                    "shared_dirs": [str(env.path.parent), str(shared_cache)],
                    "own_names": [env.path.name], "host_pid": os.getpid(),
                    "ptrace_pid": os.getpid(), "edit_files": [str(six_py)],
                    "host_shm_probe": str(shm), "tcp_port": listener,
                    # The image holds the interpreter at its own path, pyenv's under /root.
                    "root_exposed": [Path(p).relative_to("/root").parts[0] for p in
                                     [str(env.python.resolve())] if p.startswith("/root/")]}
            result = await env.execute(["python", str(script), json.dumps(args)],
                                       cwd=str(env.path), timeout=60)
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            protections = env.enforcement.protections
            print(json.dumps({"protections": protections, "report": report}, indent=1))
            assert list(protections) == list(THREATS)
            assert [k for k, v in protections.items() if v.startswith(NOT_HELD)] == []
            assert unexplained(report, protections) == {}
            assert escapes(report) == {}
            assert report["uid"] != 0
            edited = report["results"][f"in-place edit {six_py}"]
            assert not edited["escaped"], edited
        assert victim_secret.read_text() == "the victim's data\n"


FORGE = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(os.getppid())
fd = libc.syscall(438, pidfd, 3, 0)  # pidfd_getfd: the status reporter's fd 3
if fd >= 0:
    os.write(fd, b"S0")
    print("forged")
else:
    print("refused", errno.errorcode.get(ctypes.get_errno()))
sys.exit(3)
"""


async def test_what_a_command_is_given_stays_its_own(
        engine: engines.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://alice:PROXYPASS@proxy.invalid:3128")
    limits = ResourceLimits(max_memory=64)
    async with gestvenv.ephemeral("given", isolation_level=CONTAINER,
                                  resource_limits=limits) as env:
        # A secret given to a command is never on a command line (every user reads those).
        secret = f"s3cr3t-{os.getpid()}"
        running = asyncio.ensure_future(env.execute(
            ["python", "-c", "import os, time; print(os.environ['GV_TOKEN'][:6]); "
             "time.sleep(2)"], env={"GV_TOKEN": secret}))
        await asyncio.sleep(1.0)
        seen = await asyncio.to_thread(_cmdlines_with, secret)
        result = await running
        assert result.stdout == "s3cr3t\n", result.stderr
        assert seen == [], seen
        # Nor the creator's proxy credentials, in the container.
        proxy = await env.execute(["python", "-c", "import os; print(sorted(k for k in "
                                   "os.environ if 'proxy' in k.lower()))"])
        assert proxy.stdout.strip() == "[]", proxy.stdout
        # A command cannot forge its own status through its reporter (not dumpable).
        forged = await env.execute(["python", "-c", FORGE])
        if engine.name == "podman":
            assert forged.stdout.startswith("refused"), forged.stdout
        assert forged.returncode == 3, forged
        # /tmp is the env's memory (a tmpfs of max_memory): filling it ends in ENOSPC, or in
        # an OOM kill said as such (the writer's own pages count too), never in a silent 137.
        full = await env.execute(["python", "-c", (
            "f = open('/tmp/fill', 'wb')\ntry:\n    for _ in range(128):\n"
            "        f.write(b'x' * (1 << 20)); f.flush()\n    print('wrote')\n"
            "except OSError as e:\n    print('full', e.errno)\n")])
        assert full.stdout.strip() == "full 28" or \
            (full.killed_by == "memory" and full.returncode == -9), full
        # (What /tmp holds stays in the env's memory: a /tmp filled to max_memory leaves no
        # room for a command; docs/containers.md says so.)


def _cmdlines_with(text: str) -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = Path(entry.path, "cmdline").read_bytes()
                if text.encode() in cmdline:
                    found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


async def test_an_archive_cannot_replace_a_base_image(engine: engines.Engine,
                                                      tmp_path: Path) -> None:
    async with gestvenv.ephemeral("based", isolation_level=CONTAINER) as env:
        base = (env.container or {})["image"]
    archive = tmp_path / "base.tar"
    await asyncio.to_thread(images.save, engine, base, archive)
    with pytest.raises(engines.EngineError, match="would replace gestvenv's base image"):
        await asyncio.to_thread(images.load, engine, archive)
