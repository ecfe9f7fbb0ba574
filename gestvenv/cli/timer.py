"""``gestvenv ephemeral timer``: install, uninstall and show gestvenv-cleanup.timer."""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING

import click

from ..config import load_config
from ._common import echo_json, handle_errors, human_seconds

if TYPE_CHECKING:  # (what a command runs is imported when it runs: light start-up)
    from ..timer import TimerStatus

_SCOPE_HELP = "Your user manager, or the system manager (default: system for root, else user)."


def _user(user: bool | None) -> bool:
    return os.geteuid() != 0 if user is None else user


def _describe(status: TimerStatus) -> str:
    """One line: what systemd now says about the timer."""
    from .. import timer

    manager = f"{status.manager} manager"
    if status.enabled is None and status.active == "inactive":
        return f"{timer.TIMER_UNIT} ({manager}): not installed"
    every = f"every {human_seconds(status.interval)}" if status.interval else "no interval"
    if status.next_elapse_in is not None:
        next_run = f"next run in {human_seconds(status.next_elapse_in)}"
    else:
        next_run = "a run is on" if status.sub_state == "running" else "no next run"
    return (f"{timer.TIMER_UNIT} ({manager}): {status.enabled or 'no unit file'}, "
            f"{status.active}; {every}, {next_run}")


@click.group("timer")
def timer_group() -> None:
    """The systemd timer that runs `cleanup --expired --idle --orphans` (also at boot)."""
    from .remote import refuse

    refuse("ephemeral timer")


@timer_group.command("install")
@click.option("--user/--system", "user", default=None, help=_SCOPE_HELP)
@click.option("--interval", type=click.IntRange(min=1),
              help="Seconds between sweeps (default: the cleanup_interval setting).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def install(user: bool | None, interval: int | None, as_json: bool) -> None:
    """Install (or update) and enable the timer; it starts at once."""
    from .. import timer
    from ..sync import run_sync

    interval = interval or load_config().cleanup_interval
    report = run_sync(timer.install(user=_user(user), interval=interval))
    if as_json:
        echo_json(report.to_dict())
        return
    if report.mode == "package":
        click.echo(f"using the packaged units ({report.status.unit_file})")
    for path in report.written:
        click.echo(f"wrote {path}")
    for path in report.unchanged:
        click.echo(f"unchanged {path}")
    for path in report.removed:
        click.echo(f"removed {path}")
    click.echo(_describe(report.status))


@timer_group.command("uninstall")
@click.option("--user/--system", "user", default=None, help=_SCOPE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def uninstall(user: bool | None, as_json: bool) -> None:
    """Stop and disable the timer; remove the files `install` wrote (a package's stay)."""
    from .. import timer
    from ..sync import run_sync

    report = run_sync(timer.uninstall(user=_user(user)))
    if as_json:
        echo_json(report.to_dict())
        return
    for path in report.removed:
        click.echo(f"removed {path}")
    for path in report.kept:
        click.echo(f"kept {path} (not written by gestvenv)")
    click.echo(_describe(report.status))


@timer_group.command("status")
@click.option("--user/--system", "user", default=None, help=_SCOPE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def status(user: bool | None, as_json: bool) -> None:
    """Where the timer is installed, whether it runs, its interval and next run."""
    from .. import timer
    from ..sync import run_sync

    st = run_sync(timer.status(user=_user(user)))
    if as_json:
        echo_json(st.to_dict())
        return
    click.echo(_describe(st))
    if st.enabled is None and st.active == "inactive":
        return
    click.echo(f"  unit file: {st.unit_file or '-'} ({st.source})")
    for path in st.drop_ins:
        click.echo(f"  drop-in:   {path}")
    if st.last_trigger:
        when = datetime.datetime.fromtimestamp(st.last_trigger).isoformat(" ", "seconds")
        click.echo(f"  last run:  {when} ({st.last_result or 'running'})")
