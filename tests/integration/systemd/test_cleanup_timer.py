"""gestvenv-cleanup.timer under a real systemd: installed over D-Bus, it sweeps by itself.

Run inside the test host. The service sees none of the test's variables: it sweeps the default
places (root: /run/gestvenv, /var/cache/gestvenv/envs; gvtest: /run/user/4242/gestvenv,
~gvtest/.cache/gestvenv/envs), so that is where the orphans are made. Nothing runs a command
between making an orphan and seeing it gone: only the timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gestvenv import StorageBackend, storage, timer
from gestvenv.config import Config

from ..support import CHECKOUT, SITE, gvtest, run_as_gvtest, systemctl_show

UNITS = (timer.SERVICE_UNIT, timer.TIMER_UNIT)
SLACK = 4.0  # seconds past the schedule: AccuracySec=1s, python's start-up, the sweep itself


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def plain_env() -> dict[str, str]:
    """An admin's shell: none of the test's GESTVENV_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("GESTVENV_", "UV_"))}


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=plain_env())
    if check:
        assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def gv(*args: str) -> Any:
    """The CLI as root would run it, with --json."""
    return json.loads(sh(sys.executable, "-m", "gestvenv", "ephemeral", "timer", *args, "--json"))


def show(unit: str, *props: str, user: bool = False) -> dict[str, str]:
    """systemctl show (only for loaded units: on others it would load a stub)."""
    argv = ["systemctl", *(["--user"] if user else []), "show", unit,
            *(f"--property={p}" for p in props)]
    return systemctl_show(as_gvtest(*argv) if user else sh(*argv))


def loaded(user: bool = False) -> list[str]:
    argv = ["systemctl", *(["--user"] if user else []), "list-units", "--all", "--plain",
            "--no-legend", "gestvenv-cleanup.*"]
    out = as_gvtest(*argv) if user else sh(*argv)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def unit_file_state(user: bool = False) -> str:
    """From the files on disk (list-unit-files loads nothing)."""
    argv = ["systemctl", *(["--user"] if user else []), "list-unit-files", "--no-legend",
            timer.TIMER_UNIT]
    out = as_gvtest(*argv, check=False) if user else sh(*argv, check=False)
    return out.split()[1] if out.split() else "none"


def has_run(user: bool = False) -> bool:
    """The service ran to its end at least once since it was loaded."""
    props = show(timer.SERVICE_UNIT, "ExecMainExitTimestampMonotonic", "ActiveState", user=user)
    return props["ExecMainExitTimestampMonotonic"] != "0" and props["ActiveState"] != "activating"


def journal(*matches: str) -> str:
    return sh("journalctl", "--no-pager", "-o", "cat", *matches, check=False)


def make_orphan(root: Path, state_dir: str) -> Path:
    """An env dir whose claim names a state file that does not exist: what a crash leaves."""
    env_id = secrets.token_hex(16)  # (a claim names the id its dir's name ends with)
    path = root / f"tmr-orphan-{env_id[:8]}"
    storage.claim_dir(path, Path(state_dir) / "tmr-orphan.json", env_id)
    (path / "lib").mkdir()
    (path / "lib" / "mod.py").write_text("x = 1\n")
    return path


# --- the system manager (root's environments) --------------------------------------------------

@pytest.fixture
def system_timer() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("the system manager's timer is root's")
    yield
    sh(sys.executable, "-m", "gestvenv", "ephemeral", "timer", "uninstall", "--system")
    wait_for(lambda: not loaded(), 5, "the timer and its service unloaded")


def test_the_system_timer_sweeps_an_orphan_on_its_own(system_timer: None) -> None:
    report = gv("install", "--system", "--interval", "2")
    etc = timer.SYSTEM_ADMIN_DIR
    assert report["mode"] == "units"
    assert report["written"] == [str(etc / timer.SERVICE_UNIT), str(etc / timer.TIMER_UNIT)]
    assert all(timer.is_ours(etc / name) for name in UNITS)
    status = report["status"]
    assert (status["enabled"], status["active"], status["interval"]) == ("enabled", "active", 2)

    # What systemd says, from outside gestvenv.
    props = show(timer.TIMER_UNIT, "UnitFileState", "ActiveState", "TimersMonotonic",
                 "AccuracyUSec")
    assert (props["UnitFileState"], props["ActiveState"], props["AccuracyUSec"]) == \
        ("enabled", "active", "1s")
    assert "OnUnitActiveUSec=2s" in props["TimersMonotonic"]
    assert f"OnBootUSec={timer.BOOT_DELAY}s" in props["TimersMonotonic"]
    assert timer.TIMER_UNIT in sh("systemctl", "list-timers", "--all", "--no-legend")
    assert (etc / "timers.target.wants" / timer.TIMER_UNIT).is_symlink()
    exec_start = show(timer.SERVICE_UNIT, "ExecStart")["ExecStart"]
    assert f"argv[]={sys.executable} -m gestvenv ephemeral cleanup --expired --idle --orphans " \
           "--quiet " in exec_start

    # Its first run: at install (OnBootSec already past) or BOOT_DELAY after this host booted.
    wait_for(has_run, timer.BOOT_DELAY + SLACK, "the first sweep")
    assert show(timer.SERVICE_UNIT, "Result")["Result"] == "success"
    root = storage.storage_root(StorageBackend.DISK, Config()).path
    assert root == Path("/var/cache/gestvenv/envs")
    orphan = make_orphan(root, "/run/gestvenv/envs")

    took = wait_for(lambda: not orphan.exists(), 2 + SLACK, f"{orphan} swept by the timer")
    print(f"\nsystem manager: orphan gone {took:.2f}s after it was made (interval 2s)")
    wait_for(lambda: f"removed orphan {orphan}" in journal("-u", timer.SERVICE_UNIT), 5,
             "the removal in the service's journal")
    assert (root / storage.ROOT_MARK).exists()  # the root itself stays

    report = gv("uninstall", "--system")
    assert report["removed"] == [str(etc / timer.SERVICE_UNIT), str(etc / timer.TIMER_UNIT)]
    assert not any((etc / name).exists() for name in UNITS)
    assert not (etc / "timers.target.wants" / timer.TIMER_UNIT).is_symlink()
    wait_for(lambda: not loaded(), 5, "the timer and its service unloaded")
    assert unit_file_state() == "none"
    assert gv("uninstall", "--system")["removed"] == []  # idempotent


def test_odd_arguments_reach_the_program_as_given(system_timer: None) -> None:
    """The unit file's quoting, checked by systemd itself: the script and its arguments hold
    quotes, backslashes, %, $, a lone ; and an empty argument."""
    odd = "sp ace 'q' \"dq\" \\back ; % %h $HOME ${X} é\ttab"
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        out = Path(scratch, "argv")
        script = f'printf "[%s]\\n" "$0" "$1" "$2" > {out}; shift 2; exec "$@"'
        argv = ["/bin/sh", "-c", script, odd, "", ";", sys.executable, "-m", "gestvenv"]
        asyncio.run(timer.install(user=False, interval=3600, exec_argv=argv))
        sh("systemctl", "start", timer.SERVICE_UNIT)  # waits for the oneshot to end
        assert out.read_text() == f"[{odd}]\n[]\n[;]\n"
        # ... and the rest of the command line ran the sweep.
        assert show(timer.SERVICE_UNIT, "Result")["Result"] == "success"
        assert asyncio.run(timer.uninstall(user=False)).removed == [
            str(timer.SYSTEM_ADMIN_DIR / name) for name in UNITS]


@pytest.fixture
def packaged(system_timer: None) -> Iterator[Path]:
    """The units as a distro package installs them (the checked-in files), and /usr/bin/gestvenv."""
    pkg = timer.PACKAGE_DIRS[False][0]
    if timer.packaged_timer(False) is not None:
        pytest.skip("a gestvenv package is installed on this host")
    made = [pkg / name for name in UNITS]
    for path, text in zip(made, timer.packaged_units().values(), strict=True):
        path.write_text(text)
    link = Path(timer.DISTRO_EXEC[0])
    if not link.exists():
        link.symlink_to(CHECKOUT / ".venv" / "bin" / "gestvenv")
        made.append(link)
    yield pkg
    sh(sys.executable, "-m", "gestvenv", "ephemeral", "timer", "uninstall", "--system")
    for path in made:
        path.unlink()
    sh("systemctl", "daemon-reload")


def test_over_packaged_units_only_a_drop_in_is_written(packaged: Path) -> None:
    etc = timer.SYSTEM_ADMIN_DIR
    drop_in = etc / f"{timer.TIMER_UNIT}.d" / timer.DROP_IN
    report = gv("install", "--system", "--interval", "30")
    assert (report["mode"], report["written"]) == ("package", [str(drop_in)])
    assert not any((etc / name).exists() for name in UNITS)  # the package's units are used
    props = show(timer.TIMER_UNIT, "FragmentPath", "DropInPaths", "TimersMonotonic",
                 "UnitFileState")
    assert Path(props["FragmentPath"]).resolve() == (packaged / timer.TIMER_UNIT).resolve()
    assert props["DropInPaths"] == str(drop_in)
    assert props["UnitFileState"] == "enabled"
    # The reset in the drop-in drops every monotonic timer: the boot one is set again.
    assert "OnUnitActiveUSec=30s" in props["TimersMonotonic"]
    assert f"OnBootUSec={timer.BOOT_DELAY}s" in props["TimersMonotonic"]
    wait_for(has_run, timer.BOOT_DELAY + SLACK, "a sweep by the packaged service")
    assert show(timer.SERVICE_UNIT, "Result")["Result"] == "success"

    report = gv("install", "--system", "--interval", "60")  # the packaged interval
    assert (report["written"], report["removed"]) == ([], [str(drop_in)])
    assert not drop_in.parent.exists()
    assert "OnUnitActiveUSec=1min" in show(timer.TIMER_UNIT, "TimersMonotonic")["TimersMonotonic"]

    report = gv("uninstall", "--system")
    assert report["removed"] == []
    assert {Path(p).resolve() for p in report["kept"]} == {
        (packaged / name).resolve() for name in UNITS}
    assert all((packaged / name).is_file() for name in UNITS)
    wait_for(lambda: not loaded(), 5, "the timer and its service unloaded")
    assert unit_file_state() == "disabled"


# --- a user manager (gvtest's environments) ----------------------------------------------------

def as_gvtest(*argv: str, check: bool = True) -> str:
    done = run_as_gvtest(*argv)
    if check:
        assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def gv_user(*args: str) -> Any:
    out = as_gvtest("/usr/bin/python3", "-m", "gestvenv", "ephemeral", "timer", *args, "--json")
    return json.loads(out)


MAKE_ORPHAN = textwrap.dedent("""
    import secrets, sys
    from pathlib import Path
    from gestvenv import Config, StorageBackend, storage
    root = storage.storage_root(StorageBackend.DISK, Config()).path
    env_id = secrets.token_hex(16)
    path = root / f"tmr-orphan-{env_id[:8]}"
    state = storage.runtime_dir() / "envs" / "tmr-orphan.json"
    storage.claim_dir(path, state, env_id)
    (path / "lib").mkdir()
    (path / "lib" / "mod.py").write_text("x = 1\\n")
    print(path)
""")


def make_user_orphan() -> Path:
    path = Path(as_gvtest("/usr/bin/python3", "-c", MAKE_ORPHAN).strip())
    assert path.parent == Path(gvtest().pw_dir) / ".cache" / "gestvenv" / "envs"
    assert path.is_dir()
    return path


def user_journal() -> str:
    return journal(f"_UID={gvtest().pw_uid}", f"_SYSTEMD_USER_UNIT={timer.SERVICE_UNIT}")


@pytest.fixture
def user_timer() -> Iterator[Path]:
    """gvtest's admin dir; the timer uninstalled (and gone from its manager) afterwards."""
    user = gvtest()
    yield Path(user.pw_dir) / ".config" / "systemd" / "user"
    with contextlib.suppress(AssertionError):  # the manager may be restarting: wait for it
        wait_for(lambda: os.path.exists(f"/run/user/{user.pw_uid}/bus"), 10, "gvtest's bus")
    as_gvtest("/usr/bin/python3", "-m", "gestvenv", "ephemeral", "timer", "uninstall")
    assert loaded(user=True) == []
    for leftover in (Path(user.pw_dir) / ".cache" / "gestvenv" / "envs").glob("tmr-orphan-*"):
        shutil.rmtree(leftover)


def test_a_user_manager_timer_sweeps_its_users_orphans(user_timer: Path) -> None:
    report = gv_user("install", "--interval", "2")  # non-root: the user manager by default
    assert report["written"] == [str(user_timer / name) for name in UNITS]
    service = (user_timer / timer.SERVICE_UNIT).read_text()
    # The CLI ran with PYTHONPATH; so does the unit's command, else gestvenv is not found.
    assert f"ExecStart=/usr/bin/env PYTHONPATH={CHECKOUT}:{SITE} /usr/bin/python3 -m gestvenv " \
           "ephemeral cleanup" in service
    props = show(timer.TIMER_UNIT, "UnitFileState", "ActiveState", "TimersMonotonic", user=True)
    assert (props["UnitFileState"], props["ActiveState"]) == ("enabled", "active")
    assert "OnUnitActiveUSec=2s" in props["TimersMonotonic"]
    assert timer.TIMER_UNIT in as_gvtest("systemctl", "--user", "list-timers", "--no-legend")

    wait_for(lambda: has_run(user=True), timer.BOOT_DELAY + SLACK, "the first sweep")
    assert show(timer.SERVICE_UNIT, "Result", user=True)["Result"] == "success"
    orphan = make_user_orphan()
    took = wait_for(lambda: not orphan.exists(), 2 + SLACK, f"{orphan} swept by the timer")
    print(f"\nuser manager: orphan gone {took:.2f}s after it was made (interval 2s)")
    wait_for(lambda: f"removed orphan {orphan}" in user_journal(), 5,
             "the removal in the user service's journal")
    status = gv_user("status")
    assert (status["manager"], status["source"], status["last_result"]) == \
        ("user", "gestvenv", "success")

    report = gv_user("uninstall")
    assert report["removed"] == [str(user_timer / name) for name in UNITS]
    assert not any((user_timer / name).exists() for name in UNITS)
    assert loaded(user=True) == []


def test_a_starting_user_manager_sweeps_without_waiting_for_the_interval(
        user_timer: Path) -> None:
    """At login (here: a restart of gvtest's manager) the enabled timer starts with the manager
    and its OnBootSec= sweeps: orphans do not wait for the next interval (an hour here)."""
    user = gvtest()
    gv_user("install", "--interval", "3600")
    wait_for(lambda: has_run(user=True), timer.BOOT_DELAY + SLACK, "the sweep at install")
    orphan = make_user_orphan()
    time.sleep(1)
    assert orphan.exists()  # nothing else sweeps it

    sh("systemctl", "restart", f"user@{user.pw_uid}.service")
    took = wait_for(lambda: not orphan.exists(), timer.BOOT_DELAY + SLACK,
                    f"{orphan} swept after the manager started")
    print(f"\nuser manager restarted: orphan gone {took:.2f}s later (OnBootSec="
          f"{timer.BOOT_DELAY}s counts from the manager's start in a container)")
    assert f"removed orphan {orphan}" in user_journal()


def test_a_user_asking_for_the_system_timer_gets_one_line_and_nothing_changes() -> None:
    gvtest()
    done = run_as_gvtest("/usr/bin/python3", "-m", "gestvenv", "ephemeral", "timer", "install",
                         "--system")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"gestvenv: error: cannot write {timer.SYSTEM_ADMIN_DIR / timer.SERVICE_UNIT}: "
        "Permission denied (the system manager's units are root's; --user installs your own)"]
    assert not any((timer.SYSTEM_ADMIN_DIR / name).exists() for name in UNITS)
    assert loaded() == []
