"""The systemd runtime against a real systemd: limits enforced by the kernel, TTL by systemd.

Run inside the test host (``python -m tests.harness.systemd_host run -- ...``); each test
checks what it claims from outside gestvenv too (systemctl, /proc), not only from its results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import gestvenv
from gestvenv import ResourceLimits, registry
from gestvenv.cleanup import sweep
from gestvenv.context import environments

from ..support import env_pids, pid_dead, wait_until
from .conftest import gestvenv_units

SD = "systemd"


async def run(*argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                   check=check)


def units_of(name: str) -> list[str]:
    return [u for u in gestvenv_units()
            if u.startswith((f"gestvenv-{name}.", f"gestvenv-{name}@",
                             f"gestvenv-{name.replace('-', chr(92) + 'x2d')}."))]


async def test_commands_run_as_units_with_their_output_and_status() -> None:
    async with gestvenv.ephemeral("sd-basic", runtime=SD) as env:
        assert env.runtime == "systemd"
        result = await env.execute(
            ["sh", "-c", 'echo out; echo err >&2; echo "$GREETING" "$VIRTUAL_ENV"; exit 3'],
            env={"GREETING": "hello"})
        assert (result.returncode, result.killed_by) == (3, None)
        assert result.stdout == f"out\nhello {env.path}\n"
        assert result.stderr == "err\n"
        echoed = await env.execute(["python", "-c", "import sys; print(sys.stdin.read()[::-1])"],
                                   input="abc")
        assert echoed.stdout == "cba\n"
        where = await env.execute(["python", "-c", "import os, sys; print(os.getcwd(), "
                                   "sys.prefix)"], cwd="/usr")
        assert where.stdout.split() == ["/usr", str(env.path)]
        # Really a unit of its own, in the env's slice, under gestvenv.slice.
        cgroup = (await env.execute(["cat", "/proc/self/cgroup"])).stdout
        assert "/gestvenv.slice/gestvenv-sd\\x2dbasic.slice/gestvenv-sd-basic@" in cgroup
        killed = await env.execute(["sh", "-c", "kill -USR1 $$"])
        assert killed.returncode == -signal.SIGUSR1


async def test_a_commands_background_processes_end_with_its_unit() -> None:
    """Unlike the local runtime, a command is a unit: what it leaves running goes with it."""
    async with gestvenv.ephemeral("sd-background", runtime=SD) as env:
        started = await env.execute("sleep 300 >/dev/null 2>&1 & echo $!", shell=True)
        pid = int(started.stdout)
        await wait_until(lambda: pid_dead(pid), 2, "the background process ended")
        assert not env_pids(env.id)
        # A command in flight when the block fails ends with the environment.
        running = asyncio.ensure_future(env.execute(["sleep", "300"]))
        await wait_until(lambda: env_pids(env.id), 5, "the command started")
        [pid] = env_pids(env.id)
    assert pid_dead(pid)
    result = await running
    assert result.returncode < 0


@pytest.mark.v2
async def test_memory_limit_oom_kills_the_command_and_says_so() -> None:
    limits = ResourceLimits(max_memory=64)
    async with gestvenv.ephemeral("sd-oom", runtime=SD, resource_limits=limits) as env:
        assert env.enforcement.limits["max_memory"].enforced
        result = await env.execute(["python", "-c", "b = b'x' * (200 << 20); print('survived')"])
        assert (result.returncode, result.killed_by) == (-9, "memory")
        assert "survived" not in result.stdout
        assert "memory limit" in result.describe()
        after = await env.execute(["python", "-c", "print('still usable')"])
        assert after.ok and after.stdout == "still usable\n"


@pytest.mark.v2
async def test_memory_limit_holds_for_the_env_as_a_whole() -> None:
    """Two commands that each fit alone cannot exceed the limit together."""
    hold = "import time; b = b'x' * (60 << 20); time.sleep(2); print('done')"
    limits = ResourceLimits(max_memory=100)
    async with gestvenv.ephemeral("sd-oom-two", runtime=SD, resource_limits=limits) as env:
        alone = await env.execute(["python", "-c", hold])
        assert alone.ok and alone.stdout == "done\n"
        first, second = await asyncio.gather(env.execute(["python", "-c", hold]),
                                             env.execute(["python", "-c", hold]))
        assert -9 in (first.returncode, second.returncode), (first, second)
        killed = first if first.returncode == -9 else second
        if await asyncio.to_thread(os.path.exists, "/sys/fs/cgroup/cgroup.controllers"):
            assert killed.killed_by == "memory"  # cgroup v2: systemd's Result=oom-kill
        else:
            # v1: the OOM is seen on the env's slice only; with two commands running, which
            # one it hit is not known, and gestvenv does not guess.
            assert killed.killed_by in ("memory", None)


@pytest.mark.v2
async def test_cpu_quota_caps_a_busy_loop() -> None:
    busy = textwrap.dedent("""
        import time
        start = time.monotonic()
        while time.monotonic() - start < 3:
            pass
    """)
    limits = ResourceLimits(max_cpu_percent=20)
    async with gestvenv.ephemeral("sd-cpu", runtime=SD, resource_limits=limits) as env:
        before = (await env.usage()).cpu_seconds
        result = await env.execute(["python", "-c", busy])
        used = (await env.usage()).cpu_seconds - before
        # The kernel's own account of the env's CPU time (its slice's cgroup), over the wall
        # time of the command: what the quota limits.
        share = used / result.duration
        print(f"busy loop under CPUQuota=20%: {share:.1%} of one CPU "
              f"({used:.2f} s in {result.duration:.2f} s)")
        assert result.ok
        assert 0.05 < share <= 0.25


@pytest.mark.v2
async def test_forking_past_max_processes_fails_inside_the_env() -> None:
    forks = textwrap.dedent("""
        import os, time
        made, refused, kids = 0, 0, []
        for _ in range(20):
            try:
                pid = os.fork()
            except BlockingIOError:
                refused += 1
                continue
            if pid == 0:
                time.sleep(2)
                os._exit(0)
            kids.append(pid)
            made += 1
        for kid in kids:
            os.waitpid(kid, 0)
        print(made, refused)
    """)
    limits = ResourceLimits(max_processes=5)
    async with gestvenv.ephemeral("sd-pids", runtime=SD, resource_limits=limits) as env:
        made, refused = map(int, (await env.execute(["python", "-c", forks])).stdout.split())
        assert made <= 4 and refused >= 16, (made, refused)


@pytest.mark.v2
async def test_timeout_and_ttl_end_a_command_and_say_which() -> None:
    # TTLs count from the env unit's start, before the build: timings are taken against
    # expires_at, and the TTL leaves room for a creation that takes seconds (a loaded VM).
    async with gestvenv.ephemeral("sd-deadlines", runtime=SD, ttl=10) as env:
        assert env.expires_at is not None
        timed = await env.execute(["sleep", "30"], timeout=1)
        assert timed.killed_by == "timeout" and timed.duration < 2.5
        ttl = await env.execute(["sleep", "60"])
        late = time.time() - env.expires_at
        # systemd's timers may fire up to a second late (seen: timeout=1 ended at 2.05 s on
        # systemd 252), and the VM tier's emulated CPU adds its own delay: the same 1.5 s of
        # slack as the timeout above, on top of that second.
        assert ttl.killed_by == "ttl" and -0.5 < late < 2.5, (ttl, late)
        await wait_until(lambda: not units_of("sd-deadlines"), 2, "units gone")


async def test_idle_timeout_never_ends_a_running_command() -> None:
    """The env's unit ends once nothing has run in it for idle_timeout, never during a command."""
    async with gestvenv.ephemeral("sd-idle", runtime=SD, idle_timeout=2) as env:
        long = await env.execute(["sleep", "4"])
        assert long.ok and long.killed_by is None
        idle_from = time.monotonic()
        await wait_until(lambda: not units_of("sd-idle"), 5, "the idle env's units are gone")
        idle_for = time.monotonic() - idle_from
        print(f"idle env ended {idle_for:.2f}s after its last command")
        assert 1.5 <= idle_for <= 3.5
        # Its files and state went with its unit (the reaper, its stop action): no sweep.
        assert not env.path.exists()
        assert not registry.state_path("sd-idle").exists()
        with pytest.raises(gestvenv.EnvironmentClosedError, match="has ended"):
            await env.execute(["true"])


def _run_script(tmp_path: Path, code: str, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "creator.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            text=True)


async def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    assert line.strip() == "ready"


CREATE_AND_RUN = """
    import asyncio, sys, gestvenv

    async def main():
        # The TTL counts from the unit's start, before the build: room for a slow VM.
        env = await gestvenv.create_environment(sys.argv[1], runtime="systemd", ttl=15)
        task = asyncio.ensure_future(env.execute(["sleep", "100"]))
        await asyncio.sleep(0.5)
        print("ready", flush=True)
        await task

    asyncio.run(main())
"""


@pytest.mark.v2
async def test_ttl_is_held_by_systemd_after_the_creator_is_sigkilled(tmp_path: Path) -> None:
    name = "sd-ttl-kill"
    creator = _run_script(tmp_path, CREATE_AND_RUN, name)
    await _wait_ready(creator)
    record = registry.load(name)
    assert record.expires_at is not None
    # Killed once its command runs (a slow VM may take more than the script's 0.5 s).
    await wait_until(lambda: env_pids(record.id), 10, "the command running in its unit")
    creator.kill()
    creator.wait()
    pids = env_pids(record.id)
    assert pids, "the command should be running in its unit"
    assert units_of(name)
    await wait_until(lambda: all(pid_dead(p) for p in pids), record.expires_at - time.time() + 5,
                     "the command killed")
    killed = time.time() - record.expires_at
    # Then the env unit's stop action (the reaper: a Python start, slow under qemu's TCG).
    await wait_until(lambda: not units_of(name), 5, "units gone")
    gone = time.time() - record.expires_at
    print(f"command killed {killed:.2f}s, units and files gone {gone:.2f}s after the TTL")
    assert killed <= 1.2
    # systemd ended it and its stop action took the files and the state: nothing to sweep.
    assert not await asyncio.to_thread(os.path.exists, record.path)
    assert not registry.state_path(name).exists()
    assert [e for e in gestvenv.list_environments() if e["name"] == name] == []
    report = await sweep(gestvenv.load_config())
    assert report.removed == {} and report.orphan_paths == []


OWNED = """
    import asyncio, sys, gestvenv

    async def main():
        async with gestvenv.ephemeral(sys.argv[1], runtime="systemd", ttl=120) as env:
            print("ready", flush=True)
            await env.execute(["sleep", "100"])

    asyncio.run(main())
"""


async def test_an_owned_env_ends_with_its_sigkilled_creator(tmp_path: Path) -> None:
    name = "sd-owner-kill"
    creator = _run_script(tmp_path, OWNED, name)
    await _wait_ready(creator)
    record = registry.load(name)
    await wait_until(lambda: env_pids(record.id), 5, "command running")
    pids = env_pids(record.id)
    creator.kill()
    creator.wait()
    took = await wait_until(lambda: not units_of(name), 5, "units gone")
    print(f"units gone {took:.2f}s after the creator's SIGKILL")
    assert all(pid_dead(p) for p in pids)
    assert not await asyncio.to_thread(os.path.exists, record.path)
    assert not registry.state_path(name).exists()
    report = await sweep(gestvenv.load_config())
    assert report.removed == {} and report.orphan_paths == []


@pytest.mark.v2
async def test_network_access_false_cuts_even_loopback() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    probe = ["python", "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), "
             "timeout=2); print('connected')"]
    try:
        async with gestvenv.ephemeral("sd-net-on", runtime=SD) as env:
            reached = await env.execute(probe)
            assert reached.ok and reached.stdout == "connected\n", reached
        limits = ResourceLimits(network_access=False)
        async with gestvenv.ephemeral("sd-net-off", runtime=SD, resource_limits=limits) as env:
            assert env.enforcement.limits["network_access"].enforced
            cut = await env.execute(probe)
            assert cut.returncode != 0 and "connected" not in cut.stdout, cut
            # One private network for the whole env: its own commands still reach each other.
            both = await env.execute(["python", "-c", textwrap.dedent("""
                import socket
                s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
                socket.create_connection(s.getsockname(), timeout=2); print("lo ok")
            """)])
            assert both.stdout == "lo ok\n"
    finally:
        listener.close()


@pytest.mark.v2
async def test_isolation_levels_are_applied_by_systemd(tmp_path: Path) -> None:
    marker = tmp_path / "host-file"
    marker.write_text("host")
    look = ["sh", "-c", f"cat {marker} 2>/dev/null || echo hidden; "
            "touch /tmp/mine && echo tmp-writable; touch /usr/x 2>/dev/null || echo usr-ro; "
            "touch \"$VIRTUAL_ENV/x\" && echo env-writable"]
    async with gestvenv.ephemeral("sd-ns", runtime=SD, isolation_level="namespace") as env:
        assert env.isolation.value == "namespace"
        seen = (await env.execute(look)).stdout.split()
        # A private /tmp: the host's files are not there, and what the env writes stays there.
        assert seen == ["hidden", "tmp-writable", "usr-ro", "env-writable"]
        again = await env.execute(["ls", "/tmp"])
        # The system manager gives the env's commands one /tmp; a user manager one each.
        assert ("mine" in again.stdout.split()) is (os.geteuid() == 0)
    assert not await asyncio.to_thread(os.path.exists, "/tmp/mine")
    async with gestvenv.ephemeral("sd-ct", runtime=SD, isolation_level="container") as env:
        # The creator's home is not visible: an empty tmpfs of the unit's own under systemd's
        # sandbox (ProtectHome=tmpfs), absent from a container's image. What a command writes
        # there stays there (checked below). (Only the interpreter, which under root's pyenv
        # lives in the home, is there, at its own path.)
        home = str(Path.home())
        writes = await env.execute(["python", "-c", (
            "import os, sys\nhome = sys.argv[1]\n"
            "print(*(sorted(os.listdir(home)) if os.path.isdir(home) else []), 'listed')\n"
            "try:\n    open(os.path.join(home, 'gv-x'), 'w').close()\nexcept OSError:\n    pass\n"
            "open(os.path.join(os.environ['VIRTUAL_ENV'], 'y'), 'w').close()\n"
            "print('env-writable')\n"), home])
        exposed = {Path(p).relative_to(home).parts[0]
                   for p in [*env.info()["sandbox_expose"], str(env.python.resolve())]
                   if p.startswith(home + "/")}  # the interpreter, under root's pyenv here
        listed = writes.stdout.split()
        assert listed[-2:] == ["listed", "env-writable"], (writes.stdout, writes.stderr)
        assert set(listed[:-2]) <= exposed | {"gv-x"}
    assert not await asyncio.to_thread(lambda: Path("~/gv-x").expanduser().exists())
    async with gestvenv.ephemeral("sd-chroot", runtime=SD, isolation_level="chroot") as env:
        assert env.isolation.value == "container"  # honest fallback, and said
        assert any("chroot" in note for note in env.info()["notes"])


@pytest.mark.parametrize("isolation", ["process", "namespace"])
async def test_an_env_stopped_with_systemctl_ends_its_commands(isolation: str) -> None:
    """Also with a private /tmp (namespace): the reaper runs in the env unit's namespaces,
    where the storage root of this test (under /tmp) is bound in."""
    async with gestvenv.ephemeral("sd-stopped", runtime=SD, isolation_level=isolation) as env:
        assert env.isolation.value == isolation
        running = asyncio.ensure_future(env.execute(["sleep", "300"]))
        await wait_until(lambda: env_pids(env.id), 5, "the command started")
        await run("systemctl", "stop", "gestvenv-sd-stopped.service", check=True)
        result = await asyncio.wait_for(running, 5)
        assert result.returncode < 0
        # Whoever stops the unit, the env's files and state go with it.
        assert not env.path.exists()
        assert [e for e in gestvenv.list_environments() if e["name"] == "sd-stopped"] == []
        with pytest.raises(gestvenv.EnvironmentClosedError, match="has ended"):
            await env.execute(["true"])


# (The handler writes with os.write: a SIGINT landing while print("ready") still flushes would
# make a print in the handler a reentrant call, seen once in the systemd tier.)
INTERRUPTIBLE = """
import os, signal, sys, time
def stop(*_):
    os.write(1, b"got SIGINT\\n")
    os._exit(3)
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(30)
"""


async def test_ctrl_c_at_gestvenv_run_reaches_the_command_in_its_unit() -> None:
    await run(sys.executable, "-m", "gestvenv", "ephemeral", "create", "sd-ctrlc", check=True)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gestvenv", "run", "--env", "sd-ctrlc", "--", "python", "-c",
            INTERRUPTIBLE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ready\n"
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C does to gestvenv
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"got SIGINT\n"
        assert await asyncio.wait_for(proc.wait(), 10) == 3  # the command's own exit status
    finally:
        await run(sys.executable, "-m", "gestvenv", "ephemeral", "cleanup", "sd-ctrlc")


async def test_systemctl_and_a_fresh_process_see_the_env() -> None:
    async with gestvenv.ephemeral("sd-visible", runtime=SD, ttl=300) as env:
        status = await run("systemctl", "status", "--no-pager", "gestvenv-sd-visible")
        assert "gestvenv environment sd-visible" in status.stdout
        assert "active (running)" in status.stdout
        listed = await run(sys.executable, "-m", "gestvenv", "ephemeral", "list", "--json",
                           check=True)
        [info] = [e for e in json.loads(listed.stdout) if e["name"] == "sd-visible"]
        assert info["runtime"] == "systemd" and info["state"] == "ready"
        assert info["unit"] == {"name": "gestvenv-sd-visible.service", "state": "active",
                                "slice": "gestvenv-sd\\x2dvisible.slice"}
        assert info["path"] == str(env.path)
        shown = await run(sys.executable, "-m", "gestvenv", "ephemeral", "show", "sd-visible",
                          check=True)
        assert "unit:        gestvenv-sd-visible.service (active)" in shown.stdout
        assert "systemctl status gestvenv-sd-visible.service" in shown.stdout


async def test_a_unit_whose_state_file_is_lost_is_listed_and_swept_foreign_ones_never() -> None:
    await run("systemd-run", "--quiet", "--unit", "gestvenv-sd-foreign", "sleep", "300",
              check=True)  # someone's own unit with a gestvenv-like name
    try:
        await run(sys.executable, "-m", "gestvenv", "ephemeral", "create", "sd-lost",
                  check=True)
        await asyncio.to_thread(registry.state_path("sd-lost").unlink)  # its state is lost
        listed = {e["name"]: e for e in gestvenv.list_environments()}
        assert listed["sd-lost"]["state"] == "unit-only"
        assert "sd-foreign" not in listed
        report = await sweep(gestvenv.load_config())
        assert report.removed.get("sd-lost") == "a gestvenv unit without a state file"
        assert "sd-foreign" not in report.removed
        assert units_of("sd-lost") == []
        foreign = await run("systemctl", "is-active", "gestvenv-sd-foreign.service")
        assert foreign.stdout.strip() == "active"
    finally:
        await run("systemctl", "stop", "gestvenv-sd-foreign.service")
        await sweep(gestvenv.load_config())  # the lost env's files (an orphan dir by now)


async def test_another_registry_cannot_take_a_live_envs_name(tmp_path: Path) -> None:
    other = {**os.environ, "GESTVENV_RUNTIME_DIR": str(tmp_path / "other-run")}
    async with gestvenv.ephemeral("sd-shared", runtime=SD) as env:
        taken = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gestvenv", "ephemeral", "create",
                             "sd-shared"], capture_output=True, text=True, env=other)
        assert taken.returncode != 0
        assert "in use on this systemd manager by another gestvenv registry" in taken.stderr
        assert (await env.execute(["true"])).ok  # the first one is untouched


async def test_a_ttl_kill_is_not_reported_as_a_timeout() -> None:
    stubborn = ["sh", "-c", "trap '' TERM; sleep 30 & wait; sleep 30"]
    async with gestvenv.ephemeral("sd-stubborn", runtime=SD, ttl=2) as env:
        result = await env.execute(stubborn)
    assert result.returncode < 0 and result.killed_by == "ttl", result


async def test_odd_input_is_handled_like_the_local_runtime(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    async with gestvenv.ephemeral("sd-odd", runtime=SD) as env:
        here = await asyncio.to_thread(os.getcwd)
        try:
            await asyncio.to_thread(os.chdir, tmp_path)
            where = await env.execute(["pwd"], cwd="sub")  # a relative cwd
        finally:
            await asyncio.to_thread(os.chdir, here)
        assert where.stdout == f"{tmp_path / 'sub'}\n"
        # A variable systemd cannot take (not UTF-8) is left out; the command still runs.
        odd = await env.execute(["sh", "-c", 'echo "${WEIRD-unset} $FINE"'],
                                env={"WEIRD": "\udcff", "FINE": "ok"})
        assert odd.stdout == "unset ok\n"
        with pytest.raises(gestvenv.ValidationError, match="not valid UTF-8"):
            await env.execute(["echo", "\udcff"])
        # The same holds for a build or install running outside the env's slice: the idle
        # clock does not run while a process carrying the env's marker lives.


async def test_the_idle_clock_stops_while_the_env_is_being_built_or_installed_into() -> None:
    async with gestvenv.ephemeral("sd-idle-busy", runtime=SD, idle_timeout=1) as env:
        builder = await asyncio.create_subprocess_exec(  # as the builder runs: env's marker
            "sleep", "2.5", env={**os.environ, "GESTVENV_ENV_ID": env.id})
        await builder.wait()
        assert (await env.execute(["true"])).ok  # not ended meanwhile


async def test_an_unusable_bus_address_falls_back_or_says_so() -> None:
    broken = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "disabled:"}
    refused = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gestvenv", "ephemeral", "create", "sd-nobus",
                         "--runtime", "systemd"], capture_output=True, text=True, env=broken)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "cannot connect to the system bus" in refused.stderr
    fallback = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gestvenv", "ephemeral", "create", "sd-nobus",
                         "--json"], capture_output=True, text=True, env=broken)
    assert fallback.returncode == 0, fallback.stderr
    info = json.loads(fallback.stdout[fallback.stdout.index("{"):])
    assert info["runtime"] == "local"
    assert any("systemd runtime not usable" in n for n in info["notes"])
    await run(sys.executable, "-m", "gestvenv", "ephemeral", "cleanup", "sd-nobus", check=True)


USER_SCRIPT = """
    import asyncio, json, gestvenv
    from gestvenv import ResourceLimits, UnenforceableLimitError

    async def main():
        out = {}
        try:
            async with gestvenv.ephemeral("u-mem", runtime="systemd",
                                          resource_limits=ResourceLimits(max_memory=64)):
                out["refused"] = None
        except UnenforceableLimitError as exc:
            out["refused"] = str(exc)
        async with gestvenv.ephemeral("u-plain", runtime="systemd", ttl=60) as env:
            result = await env.execute(["python", "-c", "import os; print(os.getuid())"])
            out["uid"] = result.stdout.strip()
            out["cgroup"] = (await env.execute(["cat", "/proc/self/cgroup"])).stdout
            out["runtime"] = env.runtime
        async with gestvenv.ephemeral("u-allow", runtime="systemd", allow_unenforced=True,
                                      resource_limits=ResourceLimits(max_memory=64)) as env:
            out["applied"] = env.enforcement.to_dict()["limits"]
        print(json.dumps(out))

    asyncio.run(main())
"""


def test_a_user_manager_runs_envs_and_refuses_limits_it_cannot_enforce() -> None:
    try:
        user = pwd.getpwnam("gvtest")
    except KeyError:
        pytest.skip("no gvtest user (created by the test host harness)")
    runtime_dir = f"/run/user/{user.pw_uid}"
    if not os.path.exists(f"{runtime_dir}/bus"):
        pytest.skip("gvtest's user manager is not running")
    checkout = Path(__file__).resolve().parents[3]
    site = next((checkout / ".venv" / "lib").glob("python3*/site-packages"))
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        os.chmod(scratch, 0o755)
        script = Path(scratch, "user_env.py")
        script.write_text(textwrap.dedent(USER_SCRIPT))
        os.chmod(script, 0o644)
        done = subprocess.run(
            ["runuser", "-u", "gvtest", "--", "/usr/bin/env", "-i", f"HOME={user.pw_dir}",
             "PATH=/usr/bin:/bin", f"XDG_RUNTIME_DIR={runtime_dir}",
             f"DBUS_SESSION_BUS_ADDRESS=unix:path={runtime_dir}/bus",
             f"PYTHONPATH={checkout}:{site}", "/usr/bin/python3", str(script)],
            capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    # Hybrid cgroups: the user's manager has no controller, and says which one is missing.
    assert out["refused"] and "memory controller" in out["refused"], out
    assert out["uid"] == str(user.pw_uid)
    assert f"user@{user.pw_uid}.service/gestvenv.slice/" in out["cgroup"]
    assert out["runtime"] == "systemd"
    assert out["applied"]["max_memory"]["enforced"] is False


def _bus_sockets() -> int:
    """Our sockets connected to the system bus (unix sockets in /proc/self/fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
    return count


def test_one_connection_per_loop_and_none_left_by_closed_loops() -> None:
    async def cycle() -> None:
        async with gestvenv.ephemeral("sd-loops", runtime=SD) as env:
            assert (await env.execute(["true"])).ok

    asyncio.run(cycle())
    baseline = _bus_sockets()
    for _ in range(10):
        asyncio.run(cycle())
    assert _bus_sockets() <= baseline


def _main_pid(unit: str) -> int:
    scope = ["--user"] if os.geteuid() != 0 else []
    out = subprocess.run(["systemctl", *scope, "show", "-P", "MainPID", unit],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip() or 0)


@pytest.mark.v2
async def test_envs_survive_a_daemon_reexec_and_are_listed_and_cleaned_as_before() -> None:
    """systemd re-executes itself (an upgrade does): its transient units, our envs, carry on,
    a command in flight finishes and is read, TTLs still hold and cleanup still works."""
    scope = ["--user"] if os.geteuid() != 0 else []
    kept = await gestvenv.create_environment("sd-reexec-ttl", runtime=SD, ttl=20)
    async with gestvenv.ephemeral("sd-reexec", runtime=SD) as env:
        holder = _main_pid("gestvenv-sd-reexec.service")
        running = asyncio.ensure_future(env.execute(
            ["python", "-c", "import time; time.sleep(3); print('finished')"]))
        await wait_until(lambda: env_pids(env.id), 5, "the command started")
        await run("systemctl", *scope, "daemon-reexec", check=True)
        result = await asyncio.wait_for(running, 15)
        assert (result.returncode, result.stdout) == (0, "finished\n"), result
        assert _main_pid("gestvenv-sd-reexec.service") == holder  # the same env, not a new one
        listed = {e["name"]: e for e in await environments()}
        for name in ("sd-reexec", "sd-reexec-ttl"):
            assert listed[name]["state"] == "ready"
            assert listed[name]["unit"]["state"] == "active"
        again = await env.execute(["python", "-c", "print('after')"])
        assert again.stdout == "after\n"
        path = env.path
    assert not path.exists() and not units_of("sd-reexec")
    # The TTL set before the re-exec still ends the other one, files included.
    assert kept.expires_at is not None
    await wait_until(lambda: not kept.path.exists() and not units_of("sd-reexec-ttl"),
                     kept.expires_at - time.time() + 3, "the kept env ended at its TTL")
    late = time.time() - kept.expires_at
    print(f"env created before the re-exec ended {late:.2f}s after its TTL")
    assert late < 2.5
    assert not registry.state_path("sd-reexec-ttl").exists()
