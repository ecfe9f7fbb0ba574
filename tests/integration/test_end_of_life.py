"""How environments end: the idle timeout, and deletion that cannot be turned against the user.

Runtime "auto": these run under the local runtime on a host without systemd, and under the
systemd runtime inside the test host (where the env unit's reaper does the deleting).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gestvenv
from gestvenv import registry, storage
from gestvenv.runtime.systemd import systemd_booted

from .support import env_pids, kill_watchdogs, wait_until


def gv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gestvenv", *args], capture_output=True,
                          text=True, timeout=60)


def precious(tmp_path: Path) -> Path:
    """A directory of the user's, outside every storage root."""
    keep = tmp_path / "precious"
    (keep / "sub").mkdir(parents=True)
    (keep / "data.txt").write_text("keep me")
    (keep / "sub" / "more.txt").write_text("and me")
    return keep


def assert_intact(keep: Path) -> None:
    assert (keep / "data.txt").read_text() == "keep me"
    assert (keep / "sub" / "more.txt").read_text() == "and me"


def rewrite(state: Path, data: dict[str, object]) -> None:
    """Edit a state file as a tamperer would who does not want to be caught half-way."""
    tmp = state.with_name(state.name + ".edit")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, state)


def create(name: str) -> dict[str, object]:
    made = gv("ephemeral", "create", name, "--ttl", "120", "--json")
    assert made.returncode == 0, made.stderr
    info: dict[str, object] = json.loads(made.stdout)
    return info


async def test_a_running_command_is_never_idle_and_idleness_then_ends_the_env() -> None:
    """idle_timeout=2 and a 6 s command: it completes; the env goes 2 s after it ended."""
    async with gestvenv.ephemeral("idle-6s", idle_timeout=2) as env:
        path, env_id = env.path, env.id
        result = await env.execute(["python", "-c", "import time; time.sleep(6); print('done')"])
        assert (result.returncode, result.stdout, result.killed_by) == (0, "done\n", None)
        assert result.duration >= 6
        idle_from = time.monotonic()
        took = await wait_until(lambda: not path.exists(), 5, "the idle env's files are gone")
        print(f"idle env removed {time.monotonic() - idle_from:.2f}s after its last command")
        assert took >= 1.5  # not before its idle timeout
        assert not registry.state_path("idle-6s").exists()
        assert env_pids(env_id) == []
        with pytest.raises(gestvenv.EnvironmentClosedError, match="has ended"):
            await env.execute(["true"])


def test_a_storage_dir_replaced_by_a_symlink_is_not_followed(tmp_path: Path) -> None:
    keep = precious(tmp_path)
    info = create("linked")
    path = Path(str(info["path"]))
    shutil.rmtree(path)
    path.symlink_to(keep, target_is_directory=True)
    done = gv("ephemeral", "cleanup", "linked")
    assert done.returncode == 1
    assert "symlink" in done.stderr and str(keep) in done.stderr, done.stderr
    assert_intact(keep)
    assert not os.path.lexists(path)  # the link (gestvenv's entry) went, not its target
    assert gestvenv.list_environments() == []


def test_a_state_file_pointing_outside_cannot_make_cleanup_delete_there(
        tmp_path: Path) -> None:
    keep = precious(tmp_path)
    info = create("tampered")
    real = Path(str(info["path"]))
    state = registry.state_path("tampered")
    data = json.loads(state.read_text())
    data["path"] = str(keep)
    rewrite(state, data)
    done = gv("ephemeral", "cleanup", "tampered")
    assert done.returncode == 1
    assert "refusing" in done.stderr and str(keep) in done.stderr, done.stderr
    assert_intact(keep)
    assert gestvenv.list_environments() == []
    if systemd_booted():
        # The unit's reaper knows the real dir from its own command line.
        assert not real.exists()
    # Else the real dir's claim names a state file that is gone: an orphan, swept (by the
    # watchdog already, or by this).
    swept = gv("ephemeral", "cleanup", "--orphans")
    assert swept.returncode == 0, swept.stderr
    assert not real.exists()
    assert_intact(keep)


def test_a_state_file_pointing_at_another_env_cannot_destroy_it() -> None:
    victim = create("victim")
    create("attacker")
    state = registry.state_path("attacker")
    data = json.loads(state.read_text())
    data["path"] = victim["path"]
    rewrite(state, data)
    done = gv("ephemeral", "cleanup", "attacker")
    assert done.returncode == 1
    assert "refusing" in done.stderr, done.stderr
    victim_path = Path(str(victim["path"]))
    assert (victim_path / "bin" / "python").exists()
    ran = gv("run", "--env", "victim", "--", "python", "-c", "print('alive')")
    assert ran.returncode == 0 and ran.stdout == "alive\n", ran.stderr
    assert gv("ephemeral", "cleanup", "victim").returncode == 0
    assert gv("ephemeral", "cleanup", "--orphans").returncode == 0  # the attacker's real dir


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_orphans_with_a_leftover_mount_or_a_symlink_are_swept(tmp_path: Path) -> None:
    keep = precious(tmp_path)
    root = storage.storage_root(gestvenv.StorageBackend.DISK, gestvenv.load_config()).path
    orphan = root / "gone-0123abcd"
    (orphan / "lib").mkdir(parents=True)
    (orphan / storage.CLAIM).write_text(json.dumps(
        {"id": "0123abcd" + "0" * 24, "state_file": str(tmp_path / "no-such-state.json")}))
    mnt = orphan / "lib" / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "gvtest-leftover", str(mnt)],
                   check=True)
    (mnt / "inside").write_text("in the mount")
    link = root / "linked-0123abcd"
    link.symlink_to(keep, target_is_directory=True)
    try:
        done = gv("ephemeral", "cleanup", "--orphans")
        assert not orphan.exists(), done.stdout + done.stderr
        assert str(orphan) in done.stdout
        assert not os.path.lexists(link)
        assert "symlink" in done.stderr  # reported: someone put it there
        assert_intact(keep)
        mounts = Path("/proc/self/mountinfo").read_text()
        assert "gvtest-leftover" not in mounts
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.skipif(systemd_booted(), reason="without systemd only: there the timer does it")
async def test_without_systemd_every_invocation_sweeps_orphans() -> None:
    root = storage.storage_root(gestvenv.StorageBackend.DISK, gestvenv.load_config()).path
    orphan = root / "crashed-89abcdef"
    orphan.mkdir()
    (orphan / storage.CLAIM).write_text(json.dumps(
        {"id": "89abcdef" + "0" * 24, "state_file": "/nonexistent/state.json"}))
    old = time.time() - 60
    os.utime(orphan, (old, old))
    assert gv("ephemeral", "list").returncode == 0  # any command
    await wait_until(lambda: not orphan.exists(), 5, "the orphan swept by the watchdog")


@pytest.mark.local_runtime
async def test_each_local_env_has_a_watchdog_of_its_own(gv_home: Path) -> None:
    """Without systemd an env's end does not depend on one process: its own watchdog (the
    holder, detached) ends it at its TTL and deletes its files with no per-user watchdog
    running; an env whose own watchdog was killed is swept by the per-user one, which any
    gestvenv command restarts."""
    from gestvenv.runtime.local import HOLDER_MARKER
    from gestvenv.runtime.processes import kill_marked, marked_pids

    from .support import processes_of

    solo = await gestvenv.create_environment("own-watch", ttl=3)
    backed = await gestvenv.create_environment("shared-watch", ttl=3)
    assert solo.expires_at is not None
    # create returns once sh has forked the detached watchdog; reading its environment
    # finds nothing while it is in the middle of exec'ing Python.
    await wait_until(lambda: bool(marked_pids(HOLDER_MARKER, solo.id)
                                  and marked_pids(HOLDER_MARKER, backed.id)), 2,
                     "each env's own watchdog running")
    kill_watchdogs(gv_home / "run")  # the per-user one
    kill_marked(HOLDER_MARKER, backed.id)  # and backed's own
    await wait_until(lambda: not solo.path.exists(), solo.expires_at - time.time() + 3,
                     "solo ended at its TTL, by its own watchdog")
    late = time.time() - solo.expires_at
    print(f"solo gone {late:.2f}s after its TTL, with no per-user watchdog")
    assert late < 1.0
    assert processes_of(gv_home / "run", marked_only=False, cmd="gestvenv.watchdog") == []
    assert backed.path.exists()  # nothing watched it
    gv("ephemeral", "list")  # any command restarts the per-user watchdog, which sweeps
    # (A sweep deletes an env's dir, then its state file: the dir gone is not the end yet.)
    await wait_until(lambda: not backed.path.exists() and not gestvenv.list_environments(), 3,
                     "backed swept, its state file too")
    assert gestvenv.list_environments() == []


def test_unfinished_and_unreadable_state_files_are_swept_not_one_being_written() -> None:
    """A creator SIGKILLed between writing its state to a temporary file and linking it; a
    state file nobody can read (but not one changed a moment ago)."""
    import asyncio

    from gestvenv.cleanup import sweep

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    state = storage.state_dir()
    orphan = state / f".gone.v1.{dead.stdout.strip()}.123.tmp"  # (a name may hold dots)
    writing = state / f".busy.{os.getpid()}.456.tmp"  # a live writer's, this instant
    for path in (orphan, writing):
        path.write_text("{}")
    garbage, being_edited = state / "garbage.json", state / "editing.json"
    for path in (garbage, being_edited):
        path.write_text('{"name": "gar')
    old = time.time() - 60
    os.utime(garbage, (old, old))
    report = asyncio.run(sweep(gestvenv.load_config()))
    assert orphan.name in report.removed and not orphan.exists()
    assert writing.exists()
    assert report.removed.get("garbage.json") == "unreadable state file"
    assert not garbage.exists()
    assert being_edited.exists()  # changed a moment ago: maybe someone is writing it
    writing.unlink()
    being_edited.unlink()
