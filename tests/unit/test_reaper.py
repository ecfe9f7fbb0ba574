"""The reaper as the env unit runs it: a file, with the base interpreter in isolated mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gestvenv.reaper
from gestvenv.reaper import ROOT_MARK

REAPER = Path(gestvenv.reaper.__file__)
ENV_ID = "0123abcd" + "ef" * 12


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "envs"
    root.mkdir()
    (root / ROOT_MARK).write_text("gestvenv storage root\n")
    return root


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "envs").mkdir(parents=True)
    (run / "registry.lock").touch()
    return run


def make_env(root: Path, registry: Path, env_id: str = ENV_ID) -> tuple[Path, Path]:
    path = root / f"ci-{env_id[:8]}"
    (path / "lib").mkdir(parents=True)
    (path / "lib" / "mod.py").write_text("x = 1\n")
    (path / "lib" / "ro.txt").write_text("read-only\n")
    os.chmod(path / "lib", 0o555)
    state = registry / "envs" / "ci.json"
    state.write_text(json.dumps({"id": env_id, "path": str(path)}))
    return path, state


def reap(path: Path, state: Path, registry: Path,
         env_id: str = ENV_ID) -> subprocess.CompletedProcess[str]:
    # Exactly as ExecStopPost= runs it: no site, no PYTHONPATH, not as part of the package.
    python = os.path.realpath(sys.executable)
    return subprocess.run([python, "-I", "-S", "-B", str(REAPER), str(path), env_id, str(state),
                           str(registry / "registry.lock")],
                          capture_output=True, text=True, timeout=30, env={})


def test_removes_the_dir_and_the_state_file(root: Path, registry: Path) -> None:
    path, state = make_env(root, registry)
    done = reap(path, state, registry)
    assert done.returncode == 0, done.stderr
    assert not path.exists() and not state.exists()
    assert f"removed {path}" in done.stdout and f"removed {state}" in done.stdout
    assert (root / ROOT_MARK).exists()
    again = reap(path, state, registry)  # idempotent: a second stop finds nothing to do
    assert again.returncode == 0 and "nothing left to remove" in again.stdout


def test_a_state_file_of_a_newer_env_of_that_name_is_kept(root: Path, registry: Path) -> None:
    path, state = make_env(root, registry)
    state.write_text(json.dumps({"id": "f" * 32}))  # the name was reused meanwhile
    assert reap(path, state, registry).returncode == 0
    assert not path.exists()
    assert json.loads(state.read_text())["id"] == "f" * 32


def test_the_path_comes_from_the_command_line_not_the_state_file(
        root: Path, registry: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep")
    path, state = make_env(root, registry)
    state.write_text(json.dumps({"id": ENV_ID, "path": str(precious)}))  # tampered
    assert reap(path, state, registry).returncode == 0
    assert (precious / "data").read_text() == "keep"
    assert not path.exists()


@pytest.mark.parametrize("name", ["ci-ffffffff", "..", "ci"])
def test_a_dir_that_is_not_this_envs_is_refused(root: Path, registry: Path, name: str) -> None:
    other = root / name
    if name != "..":
        other.mkdir()
    _, state = make_env(root, registry)
    done = reap(other, state, registry)
    assert done.returncode == 1
    assert "refusing" in done.stderr
    assert other.exists()


def test_a_root_without_gestvenv_mark_is_refused(tmp_path: Path, registry: Path) -> None:
    unmarked = tmp_path / "home"
    unmarked.mkdir()
    path, state = make_env(unmarked, registry)
    done = reap(path, state, registry)
    assert done.returncode == 1 and "not a gestvenv storage root" in done.stderr
    assert (path / "lib" / "mod.py").exists()


def test_a_dir_replaced_by_a_symlink_loses_the_link_only(root: Path, registry: Path,
                                                         tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data").write_text("keep")
    path, state = make_env(root, registry)
    os.chmod(path / "lib", 0o755)
    subprocess.run(["rm", "-rf", str(path)], check=True)
    path.symlink_to(outside, target_is_directory=True)
    done = reap(path, state, registry)
    assert done.returncode == 1
    assert "symlink" in done.stderr and str(outside) in done.stderr
    assert (outside / "data").read_text() == "keep"
    assert not os.path.lexists(path)
    assert not state.exists()  # the env is gone either way: its record goes too


def test_leftover_processes_of_the_env_are_killed_first(root: Path, registry: Path) -> None:
    """A builder whose creator died keeps writing into the dir: it goes before the files."""
    path, state = make_env(root, registry)
    writer = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"],
        env={**os.environ, "GESTVENV_ENV_ID": ENV_ID})
    other = subprocess.Popen(["sleep", "30"], env={**os.environ, "GESTVENV_ENV_ID": "x" * 32})
    try:
        time.sleep(0.2)
        done = reap(path, state, registry)
        assert done.returncode == 0, done.stderr
        assert "killed 1 leftover process" in done.stdout
        assert writer.wait(timeout=5) == -9
        assert other.poll() is None  # another env's process is not this reaper's business
    finally:
        for proc in (writer, other):
            proc.kill()
            proc.wait()


def test_the_file_needs_only_the_standard_library() -> None:
    python = os.path.realpath(sys.executable)
    done = subprocess.run([python, "-I", "-S", "-B", "-X", "importtime", str(REAPER)],
                          capture_output=True, text=True, env={})
    assert done.returncode == 2 and "usage" in done.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & {"gestvenv", "psutil", "dbus_next", "click", "tomlkit"}


def test_the_claim_is_deleted_last(root: Path, registry: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletion cut short still says whose dir it was: the next sweep can finish it."""
    path, _ = make_env(root, registry)
    (path / "zz").write_text("z")
    (path / gestvenv.reaper.CLAIM).write_text("{}")
    unlinked: list[str] = []
    real_unlink = os.unlink

    def unlink(name: str, *, dir_fd: int | None = None) -> None:
        unlinked.append(name)
        real_unlink(name, dir_fd=dir_fd)

    monkeypatch.setattr(gestvenv.reaper.os, "unlink", unlink)
    assert gestvenv.reaper.remove_tree(path, [root])
    assert unlinked[-1] == gestvenv.reaper.CLAIM and len(unlinked) == 4


def test_process_started_names_one_process_as_psutil_does() -> None:
    import psutil

    from gestvenv.reaper import process_started

    started = process_started(os.getpid())
    assert started is not None and abs(started - psutil.Process().create_time()) < 0.02
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    pid = child.pid
    deadline = time.monotonic() + 10
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process_started(pid) is None          # exited, not yet waited for: no creator
    child.wait()
    assert process_started(pid) is None          # gone


@pytest.mark.parametrize(("name", "env_id", "stem"), [
    ("web-0123abcd", "0123abcd" + "0" * 24, "web"),
    ("a.b_c-d-0123abcd", "0123abcdffff", "a.b_c-d"),
    ("gvpool-deadbeef-0123abcd", "0123abcd", "gvpool-deadbeef"),
    ("web-0123abcd", "0123abce", None),          # another env's id
    ("web-0123abcd", "0123abc", None),           # an id too short to say whose
    ("-0123abcd", "0123abcd", None),             # no stem
    (".hidden-0123abcd", "0123abcd", None),      # not a name gestvenv gives
    ("../x-0123abcd", "0123abcd", None),
])
def test_the_dir_name_rule_is_one_rule(name: str, env_id: str, stem: str | None) -> None:
    """env_dir_name, its inverse and the sweep's filter agree (they were three copies)."""
    assert gestvenv.reaper.stem_of_env_dir(name, env_id) == stem
    if stem is not None:
        assert gestvenv.reaper.env_dir_name(stem, env_id) == name
        assert gestvenv.reaper.is_env_dir_name(name)
    assert gestvenv.reaper.is_env_dir_name(name) == (
        name.startswith(("web", "a.b", "gvpool")) and not name.startswith("../"))


@pytest.mark.parametrize(("state", "env_id", "names"), [
    ({"id": "abc12345"}, "abc12345", True),
    ({"id": "abc12345"}, "abc12346", False),     # the name now another env's
    ({"id": ""}, "", False),                     # an empty id names nobody
    (["abc12345"], "abc12345", False),           # not a state file's shape
    (None, "abc12345", False),
])
def test_whether_a_state_file_still_names_an_env(state: object, env_id: str,
                                                  names: bool) -> None:
    assert gestvenv.reaper.names_env(state, env_id) is names
