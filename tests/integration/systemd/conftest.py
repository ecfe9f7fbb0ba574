"""The systemd tier: run inside a booted systemd (``python -m tests.harness.systemd_host run``).

Every test here talks to the real manager over the default bus, as on a real host; on a host
where systemd is not PID 1 the whole directory is skipped (the harness runs it elsewhere).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from gestvenv.runtime.systemd import systemd_booted


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if systemd_booted():
        return
    skip = pytest.mark.skip(reason="needs systemd as PID 1: run through tests/harness")
    for item in items:
        if "/systemd/" in str(item.fspath):
            item.add_marker(skip)


def gestvenv_units() -> list[str]:
    """gestvenv's units still loaded, except the parent slice (shared by all envs)."""
    scope = ["--user"] if os.geteuid() != 0 else []  # a user's envs are their manager's
    out = subprocess.run(
        ["systemctl", *scope, "list-units", "--all", "--plain", "--no-legend", "gestvenv-*"],
        capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def no_units_left() -> Iterator[None]:
    """Fail a test that leaves a unit of gestvenv behind (on top of the files and processes
    the integration conftest checks)."""
    if not systemd_booted():
        yield
        return
    before = set(gestvenv_units())
    yield
    left = sorted(set(gestvenv_units()) - before)
    scope = ["--user"] if os.geteuid() != 0 else []
    for unit in left:
        subprocess.run(["systemctl", *scope, "stop", unit], check=False)
    assert left == []
