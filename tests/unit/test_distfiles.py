"""The files of systemd/ (what a distro package installs): the checked-in files are the
rendering, and what they name agrees with the code (paths, slice properties)."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from gestvenv import distfiles, storage, timer
from gestvenv.config import Config, user_config_path
from gestvenv.models import StorageBackend
from gestvenv.runtime.systemd import plan

CHECKOUT = Path(__file__).resolve().parents[2]
SYSTEMD = CHECKOUT / "systemd"


def unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_systemd_dir_holds_exactly_the_rendering() -> None:
    files = distfiles.distro_files()
    assert sorted(p.name for p in SYSTEMD.iterdir()) == sorted(files)
    for name, text in files.items():
        assert (SYSTEMD / name).read_bytes() == text.encode(), (
            f"systemd/{name} differs from its rendering: python -m gestvenv.distfiles "
            "--write systemd/")


def test_the_regeneration_command_writes_the_same_files(tmp_path: Path) -> None:
    assert distfiles.main(["--write", str(tmp_path)]) == 0
    for path in SYSTEMD.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes()


def test_the_slice_file_sets_what_the_runtime_sets_on_a_transient_one() -> None:
    caps = plan.Capabilities(user=False, controllers=frozenset({"memory"}), cgroup_v2=False)
    transient = {name: value for name, _, value in plan.parent_slice_properties(
        Config().max_total_memory_mb, caps)}
    section = unit((SYSTEMD / distfiles.SLICE_UNIT).read_text())["Slice"]
    assert section["MemoryAccounting"] == "yes" and transient["MemoryAccounting"] is True
    assert section["TasksAccounting"] == "yes" and transient["TasksAccounting"] is True
    assert section["MemoryMax"] == "8192M"
    assert transient["MemoryMax"] == 8192 * 2**20
    assert distfiles.SLICE_UNIT == "gestvenv.slice"


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """storage's paths for root, computed without creating anything."""
    monkeypatch.setattr(storage, "_is_root", lambda: True)
    monkeypatch.setattr(storage, "_private_dir", lambda path: path)
    monkeypatch.setattr(storage, "_mark_root", lambda path: path)
    monkeypatch.delenv("GESTVENV_RUNTIME_DIR", raising=False)


@pytest.mark.usefixtures("as_root")
def test_tmpfiles_creates_roots_dirs_private() -> None:
    rules = [line.split() for line in (SYSTEMD / distfiles.TMPFILES).read_text().splitlines()
             if line and not line.startswith("#")]
    created = {Path(r[1]): r[2:5] for r in rules if r[0] == "d"}
    config = Config()
    wanted = {storage.runtime_dir(),
              storage.storage_root(StorageBackend.MEMORY, config).path,
              storage.cache_base(config)}
    assert set(created) == wanted
    # Private, but for the runtime dir: traversable (not listable) to reach the API's socket.
    assert {path: owner for path, owner in created.items()} == {
        path: ["0711" if path == storage.runtime_dir() else "0700", "root", "root"]
        for path in wanted}
    # Nothing is ever aged away: no age column, and the users' /tmp fallback is excluded.
    assert all(len(r) <= 6 and r[-1] == "-" for r in rules if r[0] == "d")
    assert ["x", "/tmp/gestvenv-*"] in rules


def test_the_sweep_is_skipped_only_where_gestvenv_was_never_used(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The service's conditions name the state dir, the disk root and the config file, as the
    code computes them for a user (%t, %C, %E: XDG_RUNTIME_DIR, XDG_CACHE_HOME, XDG_CONFIG_HOME
    under a user manager; /run, /var/cache, /etc under the system manager)."""
    conditions = [line.split("=", 1)[1] for line in
                  (SYSTEMD / timer.SERVICE_UNIT).read_text().splitlines()
                  if line.startswith("ConditionPathExists=")]
    assert all(c.startswith("|") for c in conditions)  # any one of them
    xdg = {"t": tmp_path / "run", "C": tmp_path / "cache", "E": tmp_path / "config"}
    (tmp_path / "run").mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg["t"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg["C"]))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg["E"]))
    monkeypatch.delenv("GESTVENV_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("GESTVENV_CONFIG", raising=False)
    monkeypatch.setattr(storage, "_is_root", lambda: False)
    monkeypatch.setattr(storage, "_mark_root", lambda path: path)
    expanded = {Path(str(xdg[c[2]]) + c[3:]) for c in conditions}
    assert expanded == {storage.state_dir(),
                        storage.storage_root(StorageBackend.DISK, Config()).path,
                        user_config_path()}
