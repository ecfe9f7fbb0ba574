"""Environment.keep(): an env released from its creator outlives its block and its creator's
death (SIGKILL), until its TTL, on both runtimes (local here, systemd in the test host)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import gestvenv
from gestvenv import EnvironmentClosedError, ValidationError

from .support import env_names

pytestmark = pytest.mark.slow


def names() -> set[str]:
    return env_names()


async def test_a_kept_env_outlives_its_block_until_a_cleanup() -> None:
    async with gestvenv.ephemeral("kept-block", ttl=120) as env:
        assert not env.kept
        await env.keep()
        await env.keep()  # idempotent
        assert env.kept
        path = env.path
    try:
        assert path.is_dir() and "kept-block" in names()
        again = gestvenv.attach("kept-block")
        assert (await again.execute(["python", "-c", "print('still here')"])).stdout == \
            "still here\n"
        assert again.info()["owner_pid"] is None
    finally:
        await gestvenv.destroy_environment("kept-block")
    assert not path.exists() and names() == set()


async def test_without_a_ttl_keep_is_refused_and_the_block_still_destroys() -> None:
    async with gestvenv.ephemeral("kept-forever", ttl=0) as env:
        path = env.path
        with pytest.raises(ValidationError, match="has no TTL and no idle timeout: kept, it"):
            await env.keep()
        assert not env.kept
    assert not path.exists() and names() == set()


async def test_keep_after_the_end_is_an_error() -> None:
    async with gestvenv.ephemeral("kept-late", ttl=60) as env:
        pass
    with pytest.raises(EnvironmentClosedError):
        await env.keep()


CREATOR = textwrap.dedent("""\
    import asyncio, sys, gestvenv

    async def main():
        async with gestvenv.ephemeral("kept-orphan", ttl=int(sys.argv[1])) as env:
            if sys.argv[2] == "keep":
                await env.keep()
            print(env.path, flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
""")


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "not-kept"])
def test_a_kept_env_survives_a_sigkilled_creator_until_its_ttl(keep: bool) -> None:
    ttl = 12
    proc = subprocess.Popen([sys.executable, "-c", CREATOR, str(ttl), "keep" if keep else "-"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        path = Path(proc.stdout.readline().strip())
        created = time.monotonic()
        assert path.is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if not keep:  # the control: a creator's death ends an owned env
        poll(lambda: not path.exists() and not names(), 10, "the owned env ends")
        return
    time.sleep(3)  # (the holder and the watchdog look twice a second)
    assert path.is_dir() and names() == {"kept-orphan"}, "kept: the creator's death is no end"
    poll(lambda: not path.exists() and not names(), ttl + 15, "the kept env ends at its TTL")
    assert time.monotonic() - created >= ttl - 1


async def test_only_the_blocks_own_handle_can_keep_its_env() -> None:
    """An attach() handle cannot take an env from the block that owns it (nor can the env's
    own commands, writing its state file at process isolation: the block decides by its
    handle); the block destroys it on exit."""
    async with gestvenv.ephemeral("kept-elsewhere", ttl=120) as env:
        other = gestvenv.attach("kept-elsewhere")
        with pytest.raises(ValidationError, match=r"belongs to the ephemeral\(\) block of "
                                                  r"process \d+: keep\(\) it through"):
            await other.keep()
        assert not env.kept and not other.kept
        path = env.path
    assert not path.exists() and names() == set()


async def test_an_idle_timeout_bounds_a_kept_env_too() -> None:
    async with gestvenv.ephemeral("kept-idle", ttl=0, idle_timeout=60) as env:
        await env.keep()
        assert env.kept
    try:
        assert names() == {"kept-idle"}
    finally:
        await gestvenv.destroy_environment("kept-idle")
