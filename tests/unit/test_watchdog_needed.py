"""When a CLI command must make sure the per-user watchdog runs (watch.needed): pure."""

from __future__ import annotations

import pytest

from gestvenv.watch import needed


@pytest.mark.parametrize("systemd", [False, True])
def test_local_envs_always_need_it(systemd: bool) -> None:
    assert needed(systemd=systemd, local_envs=True, since_sweep=1.0, interval=60)


def test_without_systemd_a_sweep_never_done_is_due() -> None:
    """After a reboot (no stamp from this boot) the first command sweeps."""
    assert needed(systemd=False, local_envs=False, since_sweep=None, interval=60)


def test_without_systemd_a_recent_sweep_is_enough() -> None:
    assert not needed(systemd=False, local_envs=False, since_sweep=59.0, interval=60)
    assert needed(systemd=False, local_envs=False, since_sweep=60.0, interval=60)


def test_under_systemd_the_timer_sweeps() -> None:
    assert not needed(systemd=True, local_envs=False, since_sweep=None, interval=60)


def test_a_command_that_sweeps_itself_starts_none_to_sweep() -> None:
    assert not needed(systemd=False, local_envs=False, since_sweep=None, interval=60,
                      sweeping=True)
    assert needed(systemd=False, local_envs=True, since_sweep=None, interval=60, sweeping=True)
