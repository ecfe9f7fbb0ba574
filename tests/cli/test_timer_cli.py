"""``gestvenv ephemeral timer`` where systemd is not PID 1: one clear line, exit 1, nothing written.

(Under a real systemd the same commands are exercised by
tests/integration/systemd/test_cleanup_timer.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gestvenv import timer
from gestvenv.cli import cli


def files_under(*roots: Path) -> list[Path]:
    return sorted(p for root in roots if root.exists() for p in root.rglob("*"))


@pytest.mark.parametrize("args", [
    ["install"], ["install", "--system", "--interval", "5"], ["install", "--user", "--json"],
    ["status"], ["status", "--user", "--json"], ["uninstall", "--system"],
])
def test_without_systemd_every_timer_command_says_so_and_writes_nothing(
        args: list[str], gv_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # This host's PID 1 is not systemd; inside the test host it is, and the check is forced to
    # answer as it does here (the rest, manager and bus, is never reached).
    monkeypatch.setattr(timer, "systemd_booted", lambda: False)
    system_admin = tmp_path / "etc-systemd-system"
    monkeypatch.setattr(timer, "SYSTEM_ADMIN_DIR", system_admin)
    monkeypatch.setattr(timer, "PACKAGE_DIRS", {False: (tmp_path / "pkg",),
                                                True: (tmp_path / "pkg-user",)})
    real_etc = sorted(Path("/etc/systemd/system").glob("gestvenv-cleanup.*"))
    config = gv_home / "config"  # $XDG_CONFIG_HOME: the user manager's admin dir is below
    before = files_under(config)

    result = CliRunner().invoke(cli, ["ephemeral", "timer", *args])

    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gestvenv: error: systemd is not PID 1 on this host")
    assert "local runtime's watchdog does this job" in lines[0]
    assert "Traceback" not in result.output
    assert files_under(config) == before
    assert not system_admin.exists()
    assert sorted(Path("/etc/systemd/system").glob("gestvenv-cleanup.*")) == real_etc


def test_the_timer_group_sits_under_ephemeral() -> None:
    result = CliRunner().invoke(cli, ["ephemeral", "timer", "--help"])
    assert result.exit_code == 0
    assert {"install", "uninstall", "status"} <= set(result.output.split())
    result = CliRunner().invoke(cli, ["ephemeral", "timer", "install", "--interval", "0"])
    assert result.exit_code == 2 and "--interval" in result.output
