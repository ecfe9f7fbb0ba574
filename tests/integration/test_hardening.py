"""Regressions for what a review of the whole change found: each test failed before its fix."""

from __future__ import annotations

import asyncio
import ctypes
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gestvenv
from gestvenv import EnvironmentClosedError, registry, storage
from gestvenv.builder import UvBuilder, make_builder
from gestvenv.config import load_config
from gestvenv.templates import TemplateCache
from tests.harness.wheels import build_wheel

from .support import env_dirs, env_pids, pid_dead, wait_until

# --- lifecycle ---


async def test_cleanup_during_create_is_not_undone_by_the_creator(
        monkeypatch: pytest.MonkeyPatch, gv_home: Path) -> None:
    real = UvBuilder.populate

    async def populate_then_someone_cleans_up(self: UvBuilder, env_path: Path, *a: object,
                                              **k: object) -> None:
        await real(self, env_path, *a, **k)  # type: ignore[arg-type]
        await gestvenv.destroy_environment("raced")  # `gestvenv ephemeral cleanup raced`

    monkeypatch.setattr(UvBuilder, "populate", populate_then_someone_cleans_up)
    with pytest.raises(EnvironmentClosedError, match="destroyed while it was being created"):
        await gestvenv.create_environment("raced", packages=["six"])
    assert gestvenv.list_environments() == []
    assert env_dirs(gv_home / "envs") == []


async def test_cancellation_during_a_snapshot_clone_is_a_clean_cancellation(
        monkeypatch: pytest.MonkeyPatch, gv_home: Path) -> None:
    async with gestvenv.ephemeral("seed", packages=["six"]):
        pass  # the snapshot of ["six"] now exists
    real = TemplateCache.clone

    def slow_clone(self: TemplateCache, template: Path, env_path: Path, **how: bool) -> None:
        time.sleep(0.4)  # a big package set: the thread is still writing when cancelled
        real(self, template, env_path, **how)

    monkeypatch.setattr(TemplateCache, "clone", slow_clone)
    task = asyncio.ensure_future(gestvenv.ephemeral("cc", packages=["six"]).__aenter__())
    await asyncio.sleep(0.15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gestvenv.list_environments() == []
    assert env_dirs(gv_home / "envs") == []


async def test_builder_processes_count_as_activity_for_the_idle_timeout() -> None:
    async with gestvenv.ephemeral("installing", idle_timeout=1) as env:
        registry.touch(env.name, env.id)
        # What install() runs carries the env's marker, so the watchdog sees a busy env.
        await make_builder(load_config(), env.id)._run(["sleep", "2.5"], "a long install")
        assert env.path.exists()
        assert [e["name"] for e in gestvenv.list_environments()] == ["installing"]


@pytest.mark.local_runtime
async def test_a_creator_killed_before_the_build_ends_leaves_nothing(tmp_path: Path,
                                                                     gv_home: Path) -> None:
    code = (
        "import asyncio, time, gestvenv\n"
        "from gestvenv.builder import UvBuilder\n"
        "async def stuck(self, *a, **k):\n"
        "    print('building', flush=True)\n"
        "    await asyncio.sleep(300)\n"
        "UvBuilder.populate = stuck\n"
        "asyncio.run(gestvenv.create_environment('k9', packages=['six']))\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code,
                                                stdout=subprocess.PIPE, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"building\n"
        assert [e["name"] for e in gestvenv.list_environments()] == ["k9"]
        proc.kill()
        await proc.wait()
        await wait_until(lambda: not gestvenv.list_environments(), 5,
                         "the watchdog removed the dead creator's half-built env")
        assert env_dirs(gv_home / "envs") == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.local_runtime
async def test_the_watchdog_sweeps_orphan_dirs_every_cleanup_interval(
        monkeypatch: pytest.MonkeyPatch, gv_home: Path) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CLEANUP_INTERVAL", "1")
    root = storage.storage_root(gestvenv.StorageBackend.DISK, load_config()).path
    orphan = root / "rebooted-0123abcd"  # as after a reboot: its state file is gone
    storage.claim_dir(orphan, gv_home / "run" / "envs" / "rebooted.json", "0123abcd" + "0" * 24)
    (orphan / "pyvenv.cfg").write_text("home = /usr/bin\n")
    old = time.time() - 60
    os.utime(orphan, (old, old))
    async with gestvenv.ephemeral("alive"):  # starts the watchdog
        await wait_until(lambda: not orphan.exists(), 4, "the watchdog swept the orphan")


@pytest.mark.local_runtime
async def test_a_new_watchdog_keeps_the_pace_of_the_last_orphan_sweep(
        monkeypatch: pytest.MonkeyPatch, gv_home: Path) -> None:
    """Each one-shot `ephemeral run` starts a watchdog; its orphan sweep (the container engine:
    `podman info` costs seconds of CPU) must wait for cleanup_interval since the last one."""
    from gestvenv import watch

    monkeypatch.setenv("GESTVENV_EPHEMERAL_CLEANUP_INTERVAL", "4")
    root = storage.storage_root(gestvenv.StorageBackend.DISK, load_config()).path
    orphan = root / "rebooted-0123abcd"
    storage.claim_dir(orphan, gv_home / "run" / "envs" / "rebooted.json", "0123abcd" + "0" * 24)
    old = time.time() - 60
    os.utime(orphan, (old, old))
    watch.stamp_sweep()  # a sweep just now (by the watchdog of a run that just ended)
    started = time.monotonic()
    async with gestvenv.ephemeral("alive"):  # starts a new watchdog
        await wait_until(lambda: not orphan.exists(), 8, "the watchdog swept the orphan when due")
        swept = time.monotonic() - started
    # (Timed from the stamp, not from a look after the env's creation: a creation slowed by
    # load made a look at a fixed delay fall after the due sweep.)
    assert swept >= 3.5, f"the new watchdog swept orphans {swept:.1f}s after the last sweep, " \
        "before cleanup_interval (4 s)"


# --- snapshots ---


async def test_a_local_wheel_is_never_served_from_a_snapshot(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    wheel = build_wheel(dist, "gvlocal", "0.1", [], "BUILD = 1\n")
    code = ["python", "-c", "import gvlocal; print(gvlocal.BUILD)"]
    async with gestvenv.ephemeral("l1", packages=[str(wheel)]) as env:
        first = await env.execute(code)
    wheel.unlink()
    build_wheel(dist, "gvlocal", "0.1", [], "BUILD = 2\n")  # rebuilt at the same path
    async with gestvenv.ephemeral("l2", packages=[str(wheel)]) as env:
        second = await env.execute(code)
    assert (first.stdout, second.stdout) == ("1\n", "2\n")


async def test_a_requirements_file_with_constraints_is_resolved_every_time(tmp_path: Path) -> None:
    (tmp_path / "constraints.txt").write_text("gvdep==1.0\n")
    req = tmp_path / "requirements.txt"
    req.write_text("-c constraints.txt\ngvdemo\n")
    code = ["python", "-c", "import gvdep; print(gvdep.__version__)"]
    async with gestvenv.ephemeral("c1", requirements=req) as env:
        first = await env.execute(code, cwd=tmp_path)
    (tmp_path / "constraints.txt").write_text("gvdep==2.0\n")
    async with gestvenv.ephemeral("c2", requirements=req) as env:
        second = await env.execute(code, cwd=tmp_path)
    assert (first.stdout, second.stdout) == ("1.0\n", "2.0\n")


async def test_scripts_run_under_a_path_too_long_for_a_shebang(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    deep = tmp_path / ("d" * 100) / ("e" * 60)
    monkeypatch.setenv("GESTVENV_EPHEMERAL_STORAGE_ROOT", str(deep))
    for name in ("long1", "long2"):  # installed by uv, then cloned from the snapshot
        async with gestvenv.ephemeral(name, packages=["gvtool"]) as env:
            assert len(str(env.python)) > 127
            assert (env.bin_dir / "gvtool").read_bytes().startswith(b"#!/bin/sh\n'''exec'")
            result = await env.execute(["gvtool"])
        assert result.stdout == "gvtool ran\n", result.stderr


async def test_prune_leaves_foreign_entries_alone(tmp_path: Path) -> None:
    foreign = tmp_path / "templates"
    (foreign / "my-project").mkdir(parents=True)
    assert TemplateCache(foreign, 1).prune() == []        # not marked as gestvenv's
    ours = TemplateCache(tmp_path / "ours", 1)
    assert ours._usable_root()
    (ours.root / "notes").mkdir()                           # not a name gestvenv gives
    stale = ours.root / ("a" * 32)
    stale.mkdir()
    assert ours.prune() == [str(stale)]
    assert (ours.root / "notes").is_dir()
    assert (foreign / "my-project").is_dir()


async def test_pip_in_the_env_uses_gestvenv_index_settings() -> None:
    async with gestvenv.ephemeral("pipenv") as env:
        result = await env.execute(["pip", "install", "six"])
        assert result.ok, result.stderr
        version = await env.execute(["python", "-c", "import six; print(six.__version__)"])
    assert version.stdout == "1.16.0\n"  # the wheelhouse's, offline; PyPI has newer


# --- commands ---


async def test_timeout_returns_even_when_a_descendant_scrubbed_its_environment() -> None:
    async with gestvenv.ephemeral("escape") as env:
        started = time.monotonic()
        result = await env.execute(
            ["sh", "-c", "env -i /bin/sleep 30 & echo started; exec sleep 60"], timeout=1)
        took = time.monotonic() - started
    assert result.killed_by == "timeout"
    assert result.stdout == "started\n"
    assert took < 3


def _fork_child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    with gestvenv.ephemeral_sync("forked") as env:
        queue.put(env.execute(["python", "-c", "print('child ok')"]).stdout)


def test_sync_api_works_in_a_forked_child() -> None:
    with gestvenv.ephemeral_sync("parent") as env:
        assert env.execute(["true"]).ok
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_fork_child, args=(queue,))
    child.start()
    child.join(30)
    alive = child.is_alive()
    if alive:
        child.kill()
        child.join()
    assert not alive
    assert child.exitcode == 0
    assert queue.get(timeout=1) == "child ok\n"


def test_sync_api_cleans_up_before_ctrl_c_reaches_the_caller(tmp_path: Path) -> None:
    code = (
        "import gestvenv, os, sys\n"
        "try:\n"
        "    with gestvenv.ephemeral_sync('kbi', packages=['six']) as env:\n"
        "        path = env.path\n"
        "        print('ready', flush=True)\n"
        "        env.execute(['sleep', '30'])\n"
        "except KeyboardInterrupt:\n"
        "    print(os.path.exists(path), len(gestvenv.list_environments()), flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert out == "False 0\n", err
    assert "Traceback" not in err


# --- CLI ---


def gv(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gestvenv", *args], capture_output=True,
                          text=True, timeout=60, **kw)  # type: ignore[call-overload]


def test_cli_commands_can_be_interrupted_and_keep_their_options(tmp_path: Path) -> None:
    assert gv("ephemeral", "create", "cli").returncode == 0
    try:
        handler = gv("run", "--env", "cli", "python", "-c",
                     "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
        assert handler.stdout == "False\n"              # Ctrl-C still reaches the command
        argv = gv("run", "--env", "cli", "python", "-c", "import sys; print(sys.argv[1:])",
                  "--cwd", "/tmp", "--help")
        assert argv.stdout == "['--cwd', '/tmp', '--help']\n"
        bad = tmp_path / "bad-shebang"
        bad.write_text("#!/nonexistent/interpreter\n")
        bad.chmod(0o755)
        missing = gv("run", "--env", "cli", str(bad))
        assert missing.returncode == 127
        assert missing.stderr.count("\n") == 1
        assert "Traceback" not in missing.stderr
        plain = tmp_path / "not-executable"
        plain.write_text("#!/bin/sh\n")
        denied = gv("ephemeral", "exec", "cli", "--", str(plain))
        assert denied.returncode == 126  # not executable: as a shell, "Permission denied"
        assert "is not executable" in denied.stderr
    finally:
        gv("ephemeral", "cleanup", "cli")


def _tgkill(pid: int, tid: int, signum: int) -> None:
    """Send a signal to one thread of another process (what the kernel may do by itself)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, signum) != 0:  # SYS_tgkill on x86_64
        raise OSError(ctypes.get_errno(), "tgkill")


def test_a_signal_handed_to_a_helper_thread_still_ends_gestvenv_run() -> None:
    """The kernel may deliver SIGTERM to any thread; the main thread's wait must not miss it."""
    assert gv("ephemeral", "create", "thread-sig").returncode == 0
    try:
        proc = subprocess.Popen([sys.executable, "-m", "gestvenv", "run", "--env", "thread-sig",
                                 "--", "sh", "-c", "echo $$; exec sleep 30"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        helpers = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        assert helpers  # the portal's event loop runs in a thread of its own
        _tgkill(proc.pid, helpers[0], signal.SIGTERM)
        proc.wait(10)
        assert proc.returncode == 143
        assert pid_dead(child)
    finally:
        gv("ephemeral", "cleanup", "thread-sig")


def test_sigterm_to_gestvenv_run_ends_the_command_too(tmp_path: Path) -> None:
    assert gv("ephemeral", "create", "term").returncode == 0
    try:
        proc = subprocess.Popen([sys.executable, "-m", "gestvenv", "run", "--env", "term", "--",
                                 "sh", "-c", "echo $$; exec sleep 30"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert proc.returncode == 143
        assert pid_dead(child)  # gestvenv waited for the kill before exiting
    finally:
        gv("ephemeral", "cleanup", "term")


def test_cleanup_goes_on_past_an_unknown_name(gv_home: Path) -> None:
    assert gv("ephemeral", "create", "j1").returncode == 0
    result = gv("ephemeral", "cleanup", "j1", "nope", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["removed"] == {"j1": "requested"}
    assert "nope" in report["errors"]


def test_a_record_of_an_unknown_runtime_does_not_break_listing(gv_home: Path) -> None:
    assert gv("ephemeral", "create", "future").returncode == 0
    state = gv_home / "run" / "envs" / "future.json"
    data = json.loads(state.read_text())
    data["runtime"] = "from-a-newer-version"
    (state.parent / "future.edit").write_text(json.dumps(data))
    os.replace(state.parent / "future.edit", state)  # in one step: a sweep may be reading it
    listed = gv("ephemeral", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert "not available" in entry["guarantees"][0]
    # cleanup reports what it cannot do; the test then removes the env itself
    state.write_text(json.dumps({**data, "runtime": "local"}))
    assert gv("ephemeral", "cleanup", "future").returncode == 0
    assert env_pids(data["id"]) == []
