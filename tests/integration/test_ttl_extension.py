"""Extending a TTL (Environment.extend_ttl, ``ephemeral extend``), against the real runtime: the
local one here, systemd in the test host (the env's unit, its holder, RuntimeMaxSec), pooled
and not. An extended env outlives its first TTL, its running command too, and ends at the new
one, with nothing left; what cannot be extended says why."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gestvenv
from gestvenv import EnvironmentClosedError, ValidationError, registry
from gestvenv.runtime.systemd.booted import systemd_booted

from .support import env_pids, wait_until

SYSTEMD = systemd_booted()


@pytest.fixture
def extendable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Envs made now may live 60 s with their TTL extended (a pooled one:
    systemd/test_ttl_pooled.py)."""
    monkeypatch.setenv("GESTVENV_EPHEMERAL_MAX_TTL", "60")
    monkeypatch.setenv("GESTVENV_EPHEMERAL_POOL_SIZE", "0")


def runtime_max_sec(stem: str) -> str:
    return subprocess.run(["systemctl", "show", "-P", "RuntimeMaxUSec",
                           f"gestvenv-{stem}.service"], capture_output=True, text=True,
                          check=True).stdout.strip()


async def test_an_extended_env_outlives_its_first_ttl_and_ends_at_the_new_one(
        extendable: None) -> None:
    await outlives_its_first_ttl()


async def outlives_its_first_ttl(*, pooled: bool = False) -> None:
    async with gestvenv.ephemeral("ttl-extended", ttl=3) as env:
        record = registry.load("ttl-extended")
        assert record.max_ttl == 60 and record.pooled == pooled
        if SYSTEMD and not record.pooled:
            assert runtime_max_sec(record.stem) == "1min"  # systemd's backstop: max_ttl
        first_end = env.expires_at
        assert first_end is not None
        running = asyncio.ensure_future(env.execute(["sleep", "5"]))
        await asyncio.sleep(1)
        new_end = await env.extend_ttl(4)
        assert new_end == pytest.approx(first_end + 4)
        assert registry.load("ttl-extended").expires_at == pytest.approx(new_end)
        slept = await running                               # across the first end
        assert slept.ok, slept
        assert time.time() > first_end
        late = await env.execute(["sleep", "30"])           # ended by the new one
        ended = time.time()
    assert late.killed_by == "ttl", late
    print(f"ended {ended - new_end:+.2f}s from the extended TTL (pooled: {record.pooled})")
    assert -0.5 <= ended - new_end <= 1.5
    await wait_until(lambda: not Path(record.path).exists() and env_pids(record.id) == [],
                     10, "the extended env's files and processes gone")


async def test_what_cannot_be_extended_is_refused_and_changes_nothing(
        extendable: None, monkeypatch: pytest.MonkeyPatch) -> None:
    async with gestvenv.ephemeral("ttl-capped", ttl=30) as env:
        end = env.expires_at
        with pytest.raises(ValidationError, match="extended by 30 s more, not 31"):
            await env.extend_ttl(31)
        for bad in (0, -1, float("nan")):
            with pytest.raises(ValidationError):
                await env.extend_ttl(bad)
        assert registry.load("ttl-capped").expires_at == end
        assert await env.extend_ttl(30) == pytest.approx(end + 30)  # up to max_ttl exactly
    monkeypatch.setenv("GESTVENV_EPHEMERAL_MAX_TTL", "0")
    async with gestvenv.ephemeral("ttl-fixed", ttl=30) as env:
        with pytest.raises(ValidationError, match="fixed TTL"):
            await env.extend_ttl(5)
        record = registry.load("ttl-fixed")
        assert record.max_ttl is None
        if SYSTEMD and not record.pooled:
            assert runtime_max_sec(record.stem) == "30s"  # exact, systemd's
    with pytest.raises(EnvironmentClosedError):
        await env.extend_ttl(5)


def test_the_cli_extends_a_kept_env(extendable: None) -> None:
    gv = [sys.executable, "-m", "gestvenv"]
    subprocess.run([*gv, "ephemeral", "create", "ttl-cli", "--ttl", "20"], check=True,
                   capture_output=True, timeout=120)
    try:
        before = registry.load("ttl-cli").expires_at
        assert before is not None
        done = subprocess.run([*gv, "ephemeral", "extend", "ttl-cli", "25"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "extended ttl-cli: it ends in" in done.stdout, done
        assert registry.load("ttl-cli").expires_at == pytest.approx(before + 25)
        refused = subprocess.run([*gv, "ephemeral", "extend", "ttl-cli", "100"],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "max_ttl" in refused.stderr, refused
    finally:
        subprocess.run([*gv, "ephemeral", "cleanup", "ttl-cli"], capture_output=True,
                       timeout=120)
