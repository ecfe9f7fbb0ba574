"""The quota count at reservation: one look at each owner, not one per env."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil
import pytest

from gestvenv import registry
from gestvenv.exceptions import QuotaExceededError
from gestvenv.registry import EnvRecord, owners_alive, quota_holders

NOW = 1_800_000_000.0


def record(name: str, *, owner: int | None = 4242, started: float | None = 1.0,
           status: str = "ready", ttl: int | None = None) -> EnvRecord:
    return EnvRecord(name=name, id=name * 4, path=f"/x/{name}", backend="disk",
                     runtime="systemd", interpreter="/usr/bin/python3", python_version="3.11",
                     created_at=NOW - 100, ttl=ttl, idle_timeout=None, limits={},
                     enforcement={}, owner_pid=owner, owner_started=started, status=status)


def test_quota_holders_are_those_a_sweep_would_not_remove() -> None:
    records = [record("alive"), record("dead", owner=7), record("expired", ttl=10),
               record("kept", owner=None, started=None), record("building", status="creating"),
               record("dying", owner=7, status="destroying")]
    alive = {(4242, 1.0): True, (7, 1.0): False, (None, None): True}
    held = quota_holders(records, NOW, alive)
    assert [r.name for r in held] == ["alive", "kept", "building"]


def test_each_owner_is_looked_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    looked: list[Any] = []

    def owner_alive(self: EnvRecord) -> bool:
        looked.append((self.owner_pid, self.owner_started))
        return self.owner_pid != 7
    monkeypatch.setattr(EnvRecord, "owner_alive", owner_alive)
    records = [record(f"e{i}") for i in range(50)] + [record("d", owner=7)]
    assert owners_alive(records) == {(4242, 1.0): True, (7, 1.0): False}
    assert looked == [(4242, 1.0), (7, 1.0)]


def test_reserve_still_counts_live_envs_and_refuses_past_the_cap() -> None:
    me = psutil.Process(os.getpid())
    pid, started = os.getpid(), me.create_time()
    for i in range(3):
        registry.reserve(record(f"q{i}", owner=pid, started=started), max_concurrent=3,
                         max_total_memory_mb=100)
    with pytest.raises(QuotaExceededError, match="max_concurrent is 3"):
        registry.reserve(record("q3", owner=pid, started=started), max_concurrent=3,
                         max_total_memory_mb=100)
    registry.save(record("q0", owner=2**22 + 12345, started=time.time()))  # its owner is gone
    registry.reserve(record("q3", owner=pid, started=started), max_concurrent=3,
                     max_total_memory_mb=100)
