"""When a sweep removes a local env for idleness (gestvenv.cleanup.reason_to_remove)."""

from __future__ import annotations

import pytest

from gestvenv import cleanup
from gestvenv.registry import EnvRecord


def record(last_activity: float, idle_timeout: int = 10) -> EnvRecord:
    return EnvRecord(name="idle", id="idle-id-0123456789", path="/envs/idle-abcdef01",
                     backend="disk", runtime="local", interpreter="/usr/bin/python3",
                     python_version="3.11", created_at=900.0, ttl=0, idle_timeout=idle_timeout,
                     limits={}, enforcement={}, last_activity=last_activity, status="ready")


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[object]]:
    """What the rule looked at: marked processes (as ``running`` says), and the touches."""
    calls: dict[str, list[object]] = {"running": [], "touched": []}
    monkeypatch.setattr(cleanup.processes, "marked_pids",
                        lambda marker, env_id: [4242] if calls["running"] else [])
    monkeypatch.setattr(cleanup.registry, "touch",
                        lambda name, env_id: calls["touched"].append(name))
    return calls


def test_a_running_command_restarts_the_clock_from_half_the_timeout(seen: dict) -> None:
    seen["running"].append(True)
    assert cleanup.reason_to_remove(record(994.0), 1000.0, expired=True, idle=True) is None
    assert seen["touched"] == ["idle"]  # 6 s quiet of 10: seen busy, touched already
    seen["touched"].clear()
    assert cleanup.reason_to_remove(record(996.0), 1000.0, expired=True, idle=True) is None
    assert seen["touched"] == []  # 4 s: not looked at yet


def test_quiet_past_the_timeout_with_nothing_running_is_idle(seen: dict) -> None:
    assert cleanup.reason_to_remove(record(994.0), 1000.0, expired=True, idle=True) is None
    assert cleanup.reason_to_remove(record(989.0), 1000.0, expired=True, idle=True) == \
        "idle for 10s"
    assert cleanup.reason_to_remove(record(989.0), 1000.0, expired=True, idle=False) is None
