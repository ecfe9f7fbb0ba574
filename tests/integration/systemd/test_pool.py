"""The systemd runtime's pool (``pool_size``, ``pool_idle``) against a real systemd: pre-started
env units, claimed by ``ephemeral()`` with their limits set live, refilled, expired, swept,
and refills cut short (a killed creator's) drained.

Each test turns the pool on (the harness's default is off) and drains it at its end; what it
claims is read from outside gestvenv too (systemctl, /proc, the files).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import gestvenv
from gestvenv import QuotaExceededError, ResourceLimits, registry, storage
from gestvenv.reaper import env_slice_name
from gestvenv.runtime.systemd import SystemdRuntime
from gestvenv.runtime.systemd import pool as gvpool

from ..support import Spawn, leftover_summary, leftovers, wait_until

SD = "systemd"
SCOPE = ["--user"] if os.geteuid() != 0 else []


def pool_units() -> dict[str, str]:
    """The loaded pool units: unit -> its Description."""
    out = subprocess.run(["systemctl", *SCOPE, "list-units", "--all", "--plain", "--no-legend",
                          "gestvenv-gvpool-*.service"], capture_output=True, text=True,
                         check=True).stdout
    units = {}
    for line in out.splitlines():
        fields = line.split(None, 4)
        if len(fields) == 5 and fields[2] == "active":
            units[fields[0]] = fields[4]
    return units


def unclaimed() -> list[str]:
    return [u for u, d in pool_units().items() if "unclaimed" in d]


def show(unit: str, prop: str) -> str:
    return subprocess.run(["systemctl", *SCOPE, "show", "-P", prop, unit], capture_output=True,
                          text=True, check=True).stdout.strip()


def pool_files() -> list[Path]:
    return sorted(storage.pool_dir().glob("gvpool-*.json"))


def pool_dirs() -> list[Path]:
    root = storage.storage_root(gestvenv.StorageBackend.DISK, gestvenv.load_config()).path
    return sorted(root.glob("gvpool-*"))


def nothing_of_the_pool() -> bool:
    return not (pool_units() or pool_files() or pool_dirs())


@pytest.fixture
def pool_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_POOL_SIZE", "2")
    yield
    asyncio.run(gvpool.drain(SystemdRuntime()))
    deadline = time.monotonic() + 10
    while not nothing_of_the_pool():
        assert time.monotonic() < deadline, \
            f"left of the pool: {pool_units()} {pool_files()} {pool_dirs()}"
        time.sleep(0.05)


async def fill(size: int = 2) -> None:
    """A first env (it finds the pool empty and refills it), then the pool full."""
    async with gestvenv.ephemeral("pool-filler", runtime=SD, ttl=60):
        pass
    await wait_until(lambda: len(unclaimed()) >= size, 10, f"{size} pool units wait")


async def test_a_claimed_pool_unit_holds_the_env_with_its_limits_set_live(pool_on: None) -> None:
    await fill()
    waiting = set(unclaimed())
    async with gestvenv.ephemeral("pooled", runtime=SD, ttl=60,
                                  resource_limits=ResourceLimits(max_memory=64)) as env:
        record = registry.load("pooled")
        assert record.pooled, record
        unit = f"gestvenv-{record.stem}.service"
        assert unit in waiting  # one of the units that waited, not a new one
        assert Path(env.path).name == storage.env_dir_name(record.stem, env.id)
        slice_unit = env_slice_name(record.stem)
        assert show(unit, "BindsTo").strip('"').replace("\\\\", "\\") == slice_unit
        # The limit, set live on the pool unit's slice, as systemd reads it back.
        assert show(slice_unit, "MemoryMax") == str(64 << 20)
        assert show(slice_unit, "MemorySwapMax") == "0"
        where = await env.execute(["cat", "/proc/self/cgroup"], check=True)
        assert f"/{slice_unit}/" in where.stdout, where.stdout
        # And the kernel holds it: a command past it is OOM-killed.
        hog = await env.execute(["python", "-c", "b = bytearray(200 << 20); print('alive')"])
        assert hog.killed_by == "memory" and "alive" not in hog.stdout, hog
        assert any(n.startswith("pooled: ") and "backstop" in n for n in record.notes)
        listed = {e["name"]: e for e in gestvenv.list_environments()}
        assert listed["pooled"]["state"] == "ready"
    assert unit not in pool_units()
    assert not await asyncio.to_thread(Path(env.path).exists)
    assert not await asyncio.to_thread(registry.state_path("pooled").exists)


async def test_the_pool_refills_after_a_claim_and_units_show_as_pool_units(
        pool_on: None) -> None:
    await fill()
    before = set(unclaimed())
    for unit in before:  # systemctl shows them as pool units, waiting
        description = pool_units()[unit]
        assert description.startswith("gestvenv pool unit gvpool-"), description
        assert "unclaimed" in description
    async with gestvenv.ephemeral("refilled", runtime=SD, ttl=60) as env:
        unit = f"gestvenv-{registry.load('refilled').stem}.service"
        assert unit in before
        # Once claimed, systemctl names the env (and still ends with its id).
        description = pool_units()[unit]
        assert description.startswith("gestvenv environment refilled (pooled unit gvpool-"), \
            description
        assert description.endswith(f"; id {env.id})")
        # The pool is back to pool_size unclaimed units: the claimed one is not counted.
        await wait_until(lambda: len(unclaimed()) == 2 and unit not in unclaimed(), 10,
                         "the pool refilled")
        assert len(set(unclaimed()) - before) == 1


async def test_an_unclaimed_pool_unit_ends_after_pool_idle_and_leaves_nothing(
        pool_on: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_POOL_IDLE", "2")
    await fill()
    started = time.monotonic()
    assert pool_files() and pool_dirs()
    took = await wait_until(nothing_of_the_pool, 8, "the idle pool units ended")
    print(f"the idle pool ended {took:.2f}s after it was full (pool_idle 2 s)")
    assert time.monotonic() - started >= 0.5  # (ended by their holders, not at once)


async def test_the_sweep_removes_pool_files_units_and_dirs_left_alone(pool_on: None) -> None:
    await fill()
    first, second = sorted(unclaimed())[:2]
    # A pool unit whose pool file is gone: its holder, stopped, cannot notice it; the sweep does.
    holder = int(show(first, "MainPID"))
    os.kill(holder, signal.SIGSTOP)
    stem = first.removeprefix("gestvenv-").removesuffix(".service")
    gvpool.pool_file(stem).unlink()
    # A pool file (and its dir) whose unit is gone: as a refill cut short by its process's exit.
    stem2 = second.removeprefix("gestvenv-").removesuffix(".service")
    entry = gvpool.PoolEntry.from_file(gvpool.pool_file(stem2))
    assert entry is not None
    ghost = gvpool.new_entry(entry.key, Path(entry.path).parent, entry.description,
                             gestvenv.load_config(), time.time())
    ghost_file = gvpool.pool_file(ghost.stem)
    ghost_file.write_text(ghost.to_json())
    storage.claim_dir(Path(ghost.path), ghost_file, ghost.id)
    old = time.time() - 60
    os.utime(ghost_file, (old, old))
    swept = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gestvenv", "ephemeral", "cleanup", "--expired",
                         "--orphans", "--json"], capture_output=True, text=True)
    assert swept.returncode == 0, swept.stderr
    report = json.loads(swept.stdout)
    assert report["removed"].get(stem, "").endswith("(a pool unit without its pool file)"), report
    assert f"{ghost.stem} (pool)" in report["removed"], report
    assert ghost.path in report["orphan_paths"], report
    assert not await asyncio.to_thread(ghost_file.exists)
    assert not await asyncio.to_thread(Path(ghost.path).exists)
    await wait_until(lambda: first not in pool_units(), 5, "the unit without pool file stopped")
    assert second in pool_units()  # the one left alone still waits


async def test_pool_units_never_count_against_max_concurrent(
        pool_on: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_MAX_CONCURRENT", "1")
    async with gestvenv.ephemeral("only", runtime=SD, ttl=60):
        await wait_until(lambda: len(unclaimed()) == 2, 10, "the pool filled")
        with pytest.raises(QuotaExceededError, match="max_concurrent is 1"):
            async with gestvenv.ephemeral("second", runtime=SD, ttl=60):
                pass
        assert len(unclaimed()) == 2  # a refused create takes no pool unit
    async with gestvenv.ephemeral("after", runtime=SD, ttl=60):  # one env: the pool's own
        assert registry.load("after").pooled


CREATOR = """
    import asyncio, gestvenv

    async def main():
        async with gestvenv.ephemeral("killed-pooled", runtime="systemd", ttl=60) as env:
            print(env.id, flush=True)
            await asyncio.sleep(300)

    asyncio.run(main())
"""


async def test_a_creator_sigkilled_after_claiming_leaves_nothing(pool_on: None,
                                                                 spawn: Spawn) -> None:
    await fill()
    proc = spawn(CREATOR)
    assert proc.stdout is not None
    env_id = (await asyncio.to_thread(proc.stdout.readline)).strip()
    assert env_id, proc.communicate()
    record = registry.load("killed-pooled")
    assert record.pooled and record.id == env_id
    proc.kill()
    killed = time.monotonic()
    await asyncio.to_thread(proc.wait)

    def gone() -> bool:
        return not (registry.state_path("killed-pooled").exists() or Path(record.path).exists()
                    or f"gestvenv-{record.stem}.service" in pool_units()
                    or gvpool.pool_file(record.stem).exists())
    await wait_until(gone, 3, "the env of the killed creator gone")
    print(f"the pooled env of a SIGKILLed creator was gone {time.monotonic() - killed:.2f}s "
          "later")


async def test_a_pooled_env_ends_at_its_ttl(pool_on: None) -> None:
    await fill()
    async with gestvenv.ephemeral("ttl-pooled", runtime=SD, ttl=3) as env:
        record = registry.load("ttl-pooled")
        assert record.pooled and record.expires_at is not None
        result = await env.execute(["sleep", "30"])
        ended = time.time()
    assert result.killed_by == "ttl", result
    late = ended - record.expires_at
    print(f"the pooled env ended {late:+.2f}s from its TTL")
    assert -1.0 <= late <= 1.0
    left = leftovers()
    assert not left["state files"] and record.path not in left["dirs"], leftover_summary(left)


FREEZE_HOLDER = """
import os, signal, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        continue  # (this script's own command line names holder.py and the id too)
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if b"holder.py" in cmdline and sys.argv[1].encode() in cmdline:  # (its --env-id)
        os.kill(int(pid), signal.SIGSTOP)
        print("froze", pid)
"""


async def test_a_command_that_freezes_its_holder_still_ends_at_the_ttl(pool_on: None) -> None:
    """Hostile: the env's own code SIGSTOPs the pool unit's holder, which holds a pooled env's
    TTL. Its commands still end at the TTL: each carries the TTL left as its RuntimeMaxSec,
    which systemd holds."""
    await fill()
    async with gestvenv.ephemeral("frozen-holder", runtime=SD, ttl=4) as env:
        record = registry.load("frozen-holder")
        assert record.pooled and record.expires_at is not None
        froze = await env.execute(["python", "-c", FREEZE_HOLDER, record.id])
        assert "froze" in froze.stdout, (froze.stdout, froze.stderr)
        result = await env.execute(["sleep", "30"])
        ended = time.time()
        assert result.killed_by == "ttl", result
        late = ended - record.expires_at
        print(f"with its holder frozen, a pooled env's command ended {late:+.2f}s from the TTL")
        assert -1.0 <= late <= 1.5
    # Left as it was: the teardown stops the unit (SIGTERM to a stopped process is delivered
    # when systemd sends SIGCONT with it), and nothing is left.
    left = leftovers()
    assert not left["state files"] and record.path not in left["dirs"], leftover_summary(left)


# --- a refill cut short at each of its steps ---------------------------------------------------

REFILL = """
    import asyncio, os, signal, sys, threading, time
    from gestvenv import load_config
    from gestvenv.registry import EnvRecord
    from gestvenv.runtime.systemd import SystemdRuntime, pool
    from gestvenv.runtime.systemd.bus import SystemdBus

    # A refill alone, cut short where argv says. how: kill (SIGKILL before its n-th write to
    # the filesystem), opened (that write is an open: done, then SIGKILL: a kill between the
    # open and the write), stop (SIGSTOP instead), cancel (its task cancelled there, and this
    # process drains the pool at once, as a test's teardown does once its loop is closed),
    # queued (SIGKILL once systemd has queued a pool unit's start), started (once one has
    # started). It prints where it is cut, before.
    how, n, template = sys.argv[1], int(sys.argv[2]), EnvRecord.from_json(sys.argv[3])
    WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
    EVENTS = ("open", "os.mkdir", "os.rename", "os.link", "os.remove", "os.rmdir")
    seen = 0
    busy = False
    task = loop = None

    def at(what, sig=signal.SIGKILL):
        print(what, flush=True)
        # (To this very thread: a SIGSTOP sent to the process may stop it only once this
        # thread has gone on with its write.)
        signal.pthread_kill(threading.get_ident(), sig)

    def hook(event, args):
        global seen, busy
        if busy or event not in EVENTS or isinstance(args[0], int) or \\
                (event == "open" and not args[2] & WRITES):
            return  # (an int: os.fdopen of a file already open)
        seen += 1
        if seen != n or how not in ("kill", "opened", "stop", "cancel"):
            return
        busy = True
        if how == "cancel":
            print(f"{event} {args!r}", flush=True)
            loop.call_soon_threadsafe(task.cancel)
            time.sleep(1)  # (the drain runs meanwhile)
            busy = False
            return
        if how == "opened" and event != "open":
            os._exit(3)
        if how == "opened" and args[2] & os.O_TMPFILE != os.O_TMPFILE:  # (else: unnamed)
            if not os.path.isabs(args[0]):
                os._exit(3)
            os.close(os.open(args[0], args[2], 0o600))
        at(f"{event} {args!r}", signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        busy = False

    real_start = SystemdBus.start_transient_unit

    async def start_transient_unit(self, name, *args, **kwargs):
        if how == "queued" and name.startswith("gestvenv-gvpool-"):
            await real_start(self, name, *args, **{**kwargs, "wait": False})
            at(f"queued {name}")
        result = await real_start(self, name, *args, **kwargs)
        if how == "started" and name.startswith("gestvenv-gvpool-"):
            at(f"started {name}")
        return result
    SystemdBus.start_transient_unit = start_transient_unit

    async def main():
        global task, loop
        runtime = SystemdRuntime()
        await runtime.prepare()
        key = runtime.pool_key(template)
        loop = asyncio.get_running_loop()
        sys.addaudithook(hook)
        task = asyncio.ensure_future(pool.refill(runtime, load_config(), template, key))
        try:
            started = await task
        except asyncio.CancelledError:
            print(f"cancelled, then drained: {await pool.drain(runtime)}", flush=True)
            return
        print(f"done after {seen} writes: {started}", flush=True)

    asyncio.run(main())
"""


def pool_temp_files() -> list[Path]:
    """Anything in the pool dir but pool files and the refill's lock (a write never finished)."""
    return sorted(p for p in storage.pool_dir().iterdir()
                  if p.name != gvpool.REFILL_LOCK and not p.name.endswith(".json"))


def left_of_the_pool() -> list[str]:
    return [*pool_units(), *map(str, pool_files()), *map(str, pool_dirs()),
            *map(str, pool_temp_files())]


def clear_the_pool() -> None:
    """What a refill cut short left, removed (so that the next one starts from nothing)."""
    for unit in pool_units():
        subprocess.run(["systemctl", *SCOPE, "stop", unit], check=False)
    for path in [*pool_files(), *pool_temp_files()]:
        path.unlink(missing_ok=True)
    for path in pool_dirs():
        shutil.rmtree(path, ignore_errors=True)


async def pool_template(monkeypatch: pytest.MonkeyPatch) -> str:
    """An env's record of the pool's key (the refills' template), made with the pool off."""
    monkeypatch.setenv("GESTVENV_EPHEMERAL_POOL_SIZE", "0")
    async with gestvenv.ephemeral("pool-template", runtime=SD, ttl=60):
        template = registry.load("pool-template")
    monkeypatch.setenv("GESTVENV_EPHEMERAL_POOL_SIZE", "2")
    return template.to_json()


async def cut_short(spawn: Spawn, template: str, how: str, n: int = 0) -> tuple[int, str]:
    """A refill cut short (REFILL), then drained: its exit status and where it was cut."""
    proc = spawn(REFILL, how, str(n), template)
    out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL, 3), (how, n, proc.returncode, err)
    await gvpool.drain(SystemdRuntime())
    return proc.returncode, out.strip()


async def first_dir_write(spawn: Spawn, template: str) -> int:
    """The write at which a refill makes its first pool unit's dir (its pool file written)."""
    for n in range(1, 100):
        _, said = await cut_short(spawn, template, "kill", n)
        clear_the_pool()
        if said.startswith("os.mkdir") and "gvpool-" in said:
            return n
    raise AssertionError("no refill made a dir")


async def test_a_refill_cut_short_at_any_step_leaves_nothing_once_drained(
        pool_on: None, spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refill is its creator's background task: a creator killed while it runs cuts it short
    anywhere (seen in CI: a pool dir made, its claim not yet written, outlived the drain). Here
    a process runs a refill alone and SIGKILLs itself before each of its writes to the
    filesystem in turn, between the open and the write of each file it creates, and once
    systemd has queued, then started, a pool unit; after each, a drain leaves nothing."""
    template = await pool_template(monkeypatch)
    failures = []

    async def cut(how: str, n: int = 0) -> tuple[int, str]:
        status, said = await cut_short(spawn, template, how, n)
        try:
            await wait_until(lambda: not left_of_the_pool(), 5, "nothing of the pool")
        except AssertionError:
            failures.append(f"{how} {n} at {said}: left {left_of_the_pool()}")
            clear_the_pool()
        return status, said

    points = 0
    for n in range(1, 100):
        status, said = await cut("kill", n)
        if status == 0:
            break
        points += 1
        if said.startswith("open "):
            await cut("opened", n)
    assert 6 <= points < 99, (points, said)  # (two pool files, dirs and claims at least)
    for how in ("queued", "started"):
        status, said = await cut(how)
        assert status == -signal.SIGKILL, said
    assert not failures, "\n".join(failures)


async def test_a_drain_while_a_refill_makes_its_files_drains_them_all(
        pool_on: None, spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refill in another process, held (SIGSTOP) as it makes its first pool unit's dir, its
    pool file written: a drain meanwhile waits for it to have made all its files, and drains
    them all (the units it starts afterwards find their pool files gone and end at once)."""
    template = await pool_template(monkeypatch)
    n = await first_dir_write(spawn, template)
    proc = spawn(REFILL, "stop", str(n), template)
    assert proc.stdout is not None
    said = await asyncio.to_thread(proc.stdout.readline)
    assert said.startswith("os.mkdir"), said
    await wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED, 5,
                     "the refill stopped")
    assert len(pool_files()) == 1 and not pool_dirs(), (said, pool_files(), pool_dirs())
    draining = asyncio.ensure_future(gvpool.drain(SystemdRuntime()))
    await asyncio.sleep(0.5)
    os.kill(proc.pid, signal.SIGCONT)
    drained = await draining
    out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, (out, err)
    assert len(drained) == 2, (drained, out)
    await wait_until(lambda: not left_of_the_pool(), 5, "nothing of the pool")


async def test_a_drain_after_a_refill_was_cancelled_drains_what_its_thread_still_makes(
        pool_on: None, spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refill task cancelled (its loop closed, as at a test's end) as it makes its first
    pool unit's dir: the thread making it goes on, and a drain right after, in the same
    process, waits for it and drains both pool units it made."""
    template = await pool_template(monkeypatch)
    n = await first_dir_write(spawn, template)
    status, said = await cut_short(spawn, template, "cancel", n)
    assert status == 0 and "cancelled, then drained: ['gvpool-" in said, said
    assert said.count("gvpool-") == 3, said  # (the dir it was making, then the two drained)
    await wait_until(lambda: not left_of_the_pool(), 5, "nothing of the pool")
