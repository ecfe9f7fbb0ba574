"""Monitoring under the local runtime: figures from the env's marked processes (psutil, /proc),
read while a command runs; ``top`` and ``stats`` through the CLI."""

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
from gestvenv.config import load_config

pytestmark = pytest.mark.local_runtime
MB = 1 << 20

HOLD = textwrap.dedent("""
    import time
    block = bytearray(120 * 2**20)
    print("held", flush=True)
    time.sleep(30)
""")


def gestvenv_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gestvenv", *args], capture_output=True,
                          text=True, timeout=60, check=True)


async def test_usage_and_top_while_a_command_runs() -> None:
    limits = ResourceLimits(max_memory=1024, max_disk=64)
    async with gestvenv.ephemeral("mon-local", resource_limits=limits,
                                  allow_unenforced=True) as env:
        first = await env.usage()
        running = asyncio.ensure_future(env.execute(["python", "-c", HOLD], timeout=30))
        try:
            (env.path / "blob").write_bytes(os.urandom(10 * MB))
            deadline = time.monotonic() + 20
            while (usage := await env.usage()).memory_bytes < 120 * MB:
                assert time.monotonic() < deadline, "the command never held its 120 MB"
                await asyncio.sleep(0.2)
            out = await asyncio.to_thread(gestvenv_cli, "ephemeral", "top", "--json",
                                          "--interval", "0.5")
        finally:
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
    assert usage.processes >= 1
    assert usage.memory_peak_bytes is not None and usage.memory_peak_bytes >= 120 * MB
    assert usage.memory_peak_source in ("VmHWM", "sampled")
    assert usage.max_memory == 1024 * MB and usage.max_disk == 64 * MB
    assert usage.disk_bytes >= 10 * MB
    # A handle's samples follow each other: CPU % since its previous one, none for its first.
    assert first.cpu_percent is None and usage.cpu_percent is not None
    [row] = [r for r in json.loads(out.stdout) if r["name"] == "mon-local"]
    assert row["cpu_percent"] is not None and row["cpu_percent"] < 50  # it sleeps
    assert row["memory_bytes"] >= 120 * MB
    assert row["disk_bytes"] >= 10 * MB
    assert row["idle_seconds"] == 0.0


async def test_a_local_result_has_no_peak_or_cpu_figures() -> None:
    # (RUSAGE_CHILDREN would mix concurrent commands: the local runtime reports None.)
    async with gestvenv.ephemeral("mon-local-result") as env:
        result = await env.execute(["python", "-c", "b = bytearray(50 * 2**20)"])
    assert result.ok
    assert (result.peak_memory_bytes, result.cpu_seconds) == (None, None)


async def test_watch_gives_cpu_percent_from_the_second_sample() -> None:
    async with gestvenv.ephemeral("mon-local-watch") as env:
        samples = []
        async for sample in env.watch(interval=0.2):
            samples.append(sample)
            if len(samples) == 2:
                break
    assert samples[0].cpu_percent is None and samples[1].cpu_percent is not None


async def test_stats_compare_reservations_and_use_with_the_caps() -> None:
    limits = ResourceLimits(max_memory=300)
    async with gestvenv.ephemeral("mon-stats-a", resource_limits=limits), \
            gestvenv.ephemeral("mon-stats-b"):
        stats = await gestvenv.global_stats(load_config())
        out = await asyncio.to_thread(gestvenv_cli, "ephemeral", "stats", "--json")
    assert stats.environments == 2 and stats.reserving == 2
    assert stats.reserved_memory_bytes == 300 * MB
    assert stats.unlimited_memory == 1
    assert stats.max_total_memory_bytes == load_config().max_total_memory_mb * MB
    assert stats.disk_bytes > 0
    data = json.loads(out.stdout)
    assert data["reserved_memory_bytes"] == 300 * MB
    assert data["max_concurrent"] == load_config().max_concurrent
