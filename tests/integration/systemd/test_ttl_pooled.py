"""An extendable TTL on a pooled env: its pool unit's holder holds it from the state file (the
unit's RuntimeMaxSec, default_ttl + pool_idle, is the backstop), and a max_ttl past that
backstop is not pooled."""

from __future__ import annotations

import pytest

import gestvenv
from gestvenv import registry

from ..test_ttl_extension import outlives_its_first_ttl
from .test_pool import fill, pool_on  # noqa: F401  (the pool's fixture: drained after)


async def test_a_pooled_env_s_ttl_is_extended_too(pool_on: None,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_MAX_TTL", "60")
    await fill()
    await outlives_its_first_ttl(pooled=True)


async def test_a_max_ttl_past_the_pool_s_backstop_is_not_pooled(
        pool_on: None, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("GESTVENV_EPHEMERAL_DEFAULT_TTL", "30")
    monkeypatch.setenv("GESTVENV_EPHEMERAL_POOL_IDLE", "30")
    monkeypatch.setenv("GESTVENV_EPHEMERAL_MAX_TTL", "600")  # > 30 + 30: the backstop
    await fill()
    async with gestvenv.ephemeral("ttl-long", ttl=10):
        record = registry.load("ttl-long")
        assert not record.pooled and record.max_ttl == 600
