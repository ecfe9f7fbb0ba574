"""The systemd runtime's pool (``pool_size``, ``pool_idle``) against a real systemd: pre-started
env units, claimed by ``ephemeral()`` with their limits set live, refilled, expired, swept.

Each test turns the pool on (the harness's default is off) and drains it at its end; what it
claims is read from outside gestvenv too (systemctl, /proc, the files).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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
