"""Monitoring against a real systemd: ``top`` and ``env.usage()`` read while a command runs,
a command's own peak memory and CPU time in its result, and the env's end figures in the
journal. Figures are checked against what the command was made to do (its allocation, its
file, its CPU quota), not against gestvenv's own arithmetic.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import gestvenv
from gestvenv import ResourceLimits
from gestvenv.monitor import Sampler, live_records

from ..support import wait_until

SD = "systemd"
MB = 1 << 20
USER_MANAGER = os.geteuid() != 0


def gestvenv_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gestvenv", *args], capture_output=True,
                          text=True, timeout=timeout, check=True)


def first_refresh(name: str) -> str:
    """The first refresh of ``show NAME --watch --json`` (one JSON line), then Ctrl-C."""
    proc = subprocess.Popen([sys.executable, "-m", "gestvenv", "ephemeral", "show", name,
                             "--watch", "--json", "--interval", "1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        return proc.stdout.readline()
    finally:
        proc.send_signal(2)
        assert proc.wait(timeout=10) == 0  # Ctrl-C is how one leaves it


def journal(unit: str) -> str:
    return subprocess.run(["journalctl", "--no-pager", "-o", "cat",
                           "--user-unit" if USER_MANAGER else "--unit", unit],
                          capture_output=True, text=True).stdout


# Holds 200 MB, then spins until killed: under CPUQuota=50% that is half a CPU.
HOLD_AND_SPIN = textwrap.dedent("""
    block = bytearray(200 * 2**20)
    print("held", flush=True)
    while True:
        pass
""")


@pytest.mark.v2
async def test_top_shows_cpu_memory_and_disk_while_a_command_runs() -> None:
    limits = ResourceLimits(max_cpu_percent=50, max_memory=512, max_processes=30)
    async with gestvenv.ephemeral("mon-top", runtime=SD, resource_limits=limits,
                                  allow_unenforced=True) as env:
        running = asyncio.ensure_future(env.execute(["python", "-c", HOLD_AND_SPIN],
                                                    timeout=30))
        try:
            # 30 MB written into the env (from outside its cgroup: its page cache is not the
            # command's memory).
            (env.path / "blob").write_bytes(os.urandom(30 * MB))

            async def held() -> bool:
                return (await env.usage()).memory_bytes >= 200 * MB
            deadline = time.monotonic() + 20
            while not await held():
                assert time.monotonic() < deadline, "the command never held its 200 MB"
                await asyncio.sleep(0.2)
            out = await asyncio.to_thread(gestvenv_cli, "ephemeral", "top", "--once", "--json",
                                          "--interval", "2")
            [row] = [r for r in json.loads(out.stdout) if r["name"] == "mon-top"]
            watched = await asyncio.to_thread(first_refresh, "mon-top")
            assert not running.done(), "the command ended before it was measured"
        finally:
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
    print(f"top: cpu {row['cpu_percent']:.1f}% of max {row['max_cpu_percent']}, memory "
          f"{row['memory_bytes'] / MB:.1f} MB (peak {row['memory_peak_bytes'] / MB:.1f}), "
          f"disk {row['disk_bytes'] / MB:.1f} MB, {row['processes']} processes")
    assert 40 <= row["cpu_percent"] <= 60
    assert row["max_cpu_percent"] == 50
    assert abs(row["memory_bytes"] - 200 * MB) <= 20 * MB
    assert row["memory_peak_bytes"] >= row["memory_bytes"]
    assert row["max_memory"] == 512 * MB
    assert 30 * MB <= row["disk_bytes"] <= 40 * MB
    assert row["processes"] >= 1 and row["max_processes"] == 30
    assert 0 < row["ttl_left"] <= 3600
    assert row["idle_seconds"] == 0.0  # a running command is never idle
    [one] = json.loads(watched)
    assert one["name"] == "mon-top" and one["cpu_percent"] is not None


def systemd_version() -> int:
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout
    return int(out.split()[1])


@pytest.mark.v2
async def test_a_result_carries_the_commands_peak_memory_and_cpu_time() -> None:
    alloc = "import time; b = bytearray(150 * 2**20); time.sleep(0.5)"
    async with gestvenv.ephemeral("mon-peak", runtime=SD) as env:
        big = await env.execute(["python", "-c", alloc])
        quick = await env.execute("true")
        # Two at once in the same env: systemd 256 keeps each service's own figures; before,
        # they are measured on the env's slice, which both share: then none is given.
        both = await asyncio.gather(env.execute(["python", "-c", alloc]),
                                    env.execute(["python", "-c", "import time; "
                                                 "time.sleep(0.3)"]))
    print(f"150 MB command: peak {big.peak_memory_bytes / MB:.1f} MB, cpu "
          f"{big.cpu_seconds:.3f} s; 'true': peak {quick.peak_memory_bytes / MB:.1f} MB")
    assert big.ok and quick.ok and all(r.ok for r in both)
    assert big.peak_memory_bytes >= 150 * MB
    assert big.cpu_seconds is not None and big.cpu_seconds > 0
    assert quick.peak_memory_bytes is not None and quick.peak_memory_bytes < 60 * MB
    assert quick.cpu_seconds is not None and quick.cpu_seconds < big.cpu_seconds
    assert big.to_dict()["peak_memory_bytes"] == big.peak_memory_bytes
    if systemd_version() >= 256:
        assert both[0].peak_memory_bytes >= 150 * MB
        assert both[1].peak_memory_bytes is not None and both[1].peak_memory_bytes < 60 * MB
    else:
        assert [(r.peak_memory_bytes, r.cpu_seconds) for r in both] == [(None, None)] * 2


@pytest.mark.v2
async def test_env_watch_yields_samples_with_cpu_percent() -> None:
    async with gestvenv.ephemeral("mon-watch", runtime=SD) as env:
        samples = []
        async for sample in env.watch(interval=0.3):
            samples.append(sample)
            if len(samples) == 3:
                break
    assert samples[0].cpu_percent is None
    assert all(s.cpu_percent is not None for s in samples[1:])
    assert samples[1].sampled_at - samples[0].sampled_at >= 0.25
    assert all(s.name == "mon-watch" and s.runtime == SD for s in samples)


async def test_the_journal_says_what_the_env_used_at_its_end() -> None:
    async with gestvenv.ephemeral("mon-end", runtime=SD) as env:
        await env.execute(["python", "-c", "b = bytearray(100 * 2**20)"])
        (env.path / "blob").write_bytes(b"x" * (5 * MB))
    unit = "gestvenv-mon-end.service"

    def line() -> str:
        return next((t for t in journal(unit).splitlines()
                     if t.startswith("gestvenv reaper: used")), "")
    await wait_until(line, 10, "the reaper's line in the journal")
    text = line()
    print(text)
    peak = float(text.split("peak memory ")[1].split(" MiB")[0])
    assert peak >= 100
    assert "CPU time " in text and "not measured" not in text
    disk = float(text.split("disk ")[1].split(" MiB")[0])
    assert disk >= 5


async def test_top_samples_many_envs_within_its_interval() -> None:
    count = 10
    envs = await asyncio.gather(*(gestvenv.create_environment(f"mon-many-{i}", runtime=SD,
                                                              ttl=120) for i in range(count)))
    try:
        sampler = Sampler()
        records = [r for r in live_records() if r.name.startswith("mon-many-")]
        assert len(records) == count
        await sampler.sample(records)
        started = time.monotonic()
        samples = await sampler.sample(records)
        took = time.monotonic() - started
        print(f"one refresh of {count} envs: {took * 1000:.0f} ms")
        assert len(samples) == count and all(s.cpu_percent is not None for s in samples)
        assert took < 1.0
    finally:
        await asyncio.gather(*(e.aclose() for e in envs))
