"""gestvenv-cleanup.timer's pure side: rendering, the checked-in files, which files install
writes, which uninstall removes. No bus, no systemd (tests/integration/systemd runs them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gestvenv import timer
from gestvenv.config import Config
from gestvenv.exceptions import GestvenvError, ValidationError

CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Package dirs and the system admin dir under tmp; the user admin dir is
    $XDG_CONFIG_HOME/systemd/user, which the test conftest already points under tmp."""
    out = {"pkg": tmp_path / "usr-lib-system", "pkg-user": tmp_path / "usr-lib-user",
           "etc": tmp_path / "etc-systemd-system"}
    for path in out.values():
        path.mkdir()
    monkeypatch.setattr(timer, "PACKAGE_DIRS", {False: (out["pkg"],), True: (out["pkg-user"],)})
    monkeypatch.setattr(timer, "SYSTEM_ADMIN_DIR", out["etc"])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return out


def package(directory: Path) -> None:
    """What a distro package installs: the checked-in files."""
    for name, text in timer.packaged_units().items():
        (directory / name).write_text(text)


def apply(plan: timer.FilePlan) -> None:
    """The file half of install (the other half talks to the manager)."""
    for path, text in plan.write.items():
        timer._write(path, text)
    timer._remove(plan.remove)


# --- rendering ---------------------------------------------------------------------------------

def test_the_checked_in_units_are_the_rendering_for_a_distro_install() -> None:
    for name, text in timer.packaged_units().items():
        assert (CHECKOUT / "systemd" / name).read_bytes() == text.encode(), (
            f"systemd/{name} differs from gestvenv/timer.py's rendering: "
            "python -m gestvenv.distfiles --write systemd/")
    assert Config().cleanup_interval == 60
    assert "OnUnitActiveSec=60s\n" in (CHECKOUT / "systemd" / timer.TIMER_UNIT).read_text()
    assert "ExecStart=/usr/bin/gestvenv ephemeral cleanup --expired --idle --orphans --quiet\n" \
        in (CHECKOUT / "systemd" / timer.SERVICE_UNIT).read_text()
    assert timer.MARKER not in "".join(timer.packaged_units().values())  # never uninstalled


def test_the_service_is_a_low_priority_oneshot_without_install_section() -> None:
    text = timer.render_service(["/opt/gv/bin/python", "-m", "gestvenv"])
    lines = text.splitlines()
    assert "Type=oneshot" in lines
    assert "ExecStart=/opt/gv/bin/python -m gestvenv ephemeral cleanup --expired --idle " \
           "--orphans --quiet" in lines
    assert {"Nice=10", "IOSchedulingClass=idle", "After=local-fs.target"} <= set(lines)
    assert "[Install]" not in lines


@pytest.mark.parametrize(("arg", "word"), [
    ("/usr/bin/python3", "/usr/bin/python3"),
    ("--orphans", "--orphans"),
    ("a b", '"a b"'),
    ("", '""'),
    (";", '";"'),                                 # a bare ";" would separate two commands
    ("%h", "%%h"),                                # a specifier otherwise
    ("$HOME", "$$HOME"),                          # a variable otherwise
    ("${X} %n", '"$${X} %%n"'),
    ("it's", '"it\'s"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("two\nlines\tand\x01", '"two\\nlines\\tand\\x01"'),
    ("é", '"é"'),
])
def test_arguments_are_quoted_for_the_unit_file_syntax(arg: str, word: str) -> None:
    assert timer.quote(arg) == word


def test_an_odd_command_line_renders_as_systemd_reads_it() -> None:
    # The same argv goes through a real systemd in tests/integration/systemd/test_cleanup_timer.py.
    argv = ["/bin/sh", "-c", 'printf "[%s]\\n" "$0" > /run/x; shift; exec "$@"',
            "sp ace 'q' \"dq\" \\back ; % $HOME", "", ";", "/usr/bin/gestvenv"]
    line = next(x for x in timer.render_service(argv).splitlines() if x.startswith("ExecStart="))
    assert line == (
        'ExecStart=/bin/sh -c "printf \\"[%%s]\\\\n\\" \\"$$0\\" > /run/x; shift; exec \\"$$@\\"" '
        '"sp ace \'q\' \\"dq\\" \\\\back ; %% $$HOME" "" ";" /usr/bin/gestvenv '
        "ephemeral cleanup --expired --idle --orphans --quiet")


@pytest.mark.parametrize("argv", [[], ["gestvenv"], ["bin/gestvenv"], ["/usr/bin/x", "a\0b"]])
def test_a_command_systemd_could_not_run_as_written_is_refused(argv: list[str]) -> None:
    with pytest.raises(ValidationError):
        timer.render_service(argv)


def test_the_timer_sweeps_at_boot_and_every_interval() -> None:
    lines = timer.render_timer(2).splitlines()
    assert "OnUnitActiveSec=2s" in lines
    assert f"OnBootSec={timer.BOOT_DELAY}s" in lines
    assert "AccuracySec=1s" in lines
    assert lines[-2:] == ["[Install]", "WantedBy=timers.target"]
    for bad in (0, -5, True):
        with pytest.raises(ValidationError):
            timer.render_timer(bad)


def test_the_drop_in_sets_the_boot_delay_again_after_the_reset() -> None:
    # An empty OnUnitActiveSec= resets every monotonic timer, OnBootSec= included.
    lines = timer.render_drop_in(30).splitlines()
    assert lines[0] == timer.MARKER
    assert lines[1:] == ["[Timer]", "OnUnitActiveSec=", f"OnBootSec={timer.BOOT_DELAY}s",
                         "OnUnitActiveSec=30s"]


@pytest.mark.parametrize(("text", "seconds"), [
    ("OnUnitActiveSec=60s\n", 60), ("OnUnitActiveSec = 2min\n", 120), ("OnUnitActiveSec=45\n", 45),
    ("OnUnitActiveSec=60s\nOnUnitActiveSec=\n", None), ("OnBootSec=10s\n", None),
    ("OnUnitActiveSec=1h 30min\n", None),
])
def test_the_packaged_interval_is_read_or_left_unknown(tmp_path: Path, text: str,
                                                       seconds: int | None) -> None:
    path = tmp_path / "t.timer"
    path.write_text(f"[Timer]\n{text}")
    assert timer.interval_in(path) == seconds


# --- which files install writes ----------------------------------------------------------------

@pytest.mark.parametrize("user", [False, True])
def test_without_a_package_both_units_go_to_the_admin_dir(dirs: dict[str, Path],
                                                          gv_home: Path, user: bool) -> None:
    admin = gv_home / "config" / "systemd" / "user" if user else dirs["etc"]
    assert timer.admin_dir(user) == admin
    plan = timer.plan_files(user=user, interval=7)
    assert plan.mode == "units"
    assert sorted(plan.write) == [admin / timer.SERVICE_UNIT, admin / timer.TIMER_UNIT]
    service = plan.write[admin / timer.SERVICE_UNIT]
    timer_text = plan.write[admin / timer.TIMER_UNIT]
    assert service.splitlines()[0] == timer.MARKER == timer_text.splitlines()[0]
    assert f"ExecStart={sys.executable} -m gestvenv ephemeral cleanup" in service
    assert "OnUnitActiveSec=7s" in timer_text

    apply(plan)
    again = timer.plan_files(user=user, interval=7)
    assert (again.write, again.remove) == ({}, [])  # idempotent
    assert sorted(again.unchanged) == sorted(plan.write)
    changed = timer.plan_files(user=user, interval=8)
    assert list(changed.write) == [admin / timer.TIMER_UNIT]


def test_a_pythonpath_install_carries_its_pythonpath(dirs: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/src/gv::rel")
    assert timer.default_exec_argv() == [
        "/usr/bin/env", f"PYTHONPATH=/src/gv:{Path('rel').resolve()}", sys.executable, "-m",
        "gestvenv"]


@pytest.mark.parametrize("user", [False, True])
def test_with_a_package_only_a_different_interval_is_written(dirs: dict[str, Path],
                                                             user: bool) -> None:
    package(dirs["pkg-user" if user else "pkg"])
    admin = timer.admin_dir(user)
    drop_in = admin / f"{timer.TIMER_UNIT}.d" / timer.DROP_IN

    same = timer.plan_files(user=user, interval=Config().cleanup_interval)
    assert (same.mode, same.write, same.remove) == ("package", {}, [])

    other = timer.plan_files(user=user, interval=30)
    assert other.mode == "package"
    assert other.write == {drop_in: timer.render_drop_in(30)}
    apply(other)
    assert sorted(p.name for p in admin.rglob("*")) == [timer.DROP_IN, f"{timer.TIMER_UNIT}.d"]

    # Back to the packaged interval: our drop-in goes, and its dir with it.
    back = timer.plan_files(user=user, interval=Config().cleanup_interval)
    assert (back.write, back.remove) == ({}, [drop_in])
    apply(back)
    assert list(admin.iterdir()) == []


def test_a_package_installed_later_replaces_our_units_not_someone_elses(
        dirs: dict[str, Path]) -> None:
    apply(timer.plan_files(user=False, interval=60))   # before the package came
    package(dirs["pkg"])
    plan = timer.plan_files(user=False, interval=60)
    assert plan.remove == [dirs["etc"] / timer.SERVICE_UNIT, dirs["etc"] / timer.TIMER_UNIT]

    # An admin's own copy (no marker) shadows the package, but is theirs: left alone.
    (dirs["etc"] / timer.TIMER_UNIT).write_text(timer.render_timer(60))
    plan = timer.plan_files(user=False, interval=60)
    assert plan.remove == [dirs["etc"] / timer.SERVICE_UNIT]


@pytest.mark.parametrize("name", [timer.SERVICE_UNIT, timer.TIMER_UNIT])
def test_install_refuses_to_overwrite_a_file_that_is_not_gestvenvs(dirs: dict[str, Path],
                                                                   name: str) -> None:
    mine = dirs["etc"] / name
    mine.write_text("[Unit]\nDescription=the admin's own\n")
    with pytest.raises(GestvenvError, match="not written by gestvenv"):
        timer.plan_files(user=False, interval=60)
    assert mine.read_text() == "[Unit]\nDescription=the admin's own\n"


def test_a_foreign_drop_in_is_never_overwritten(dirs: dict[str, Path]) -> None:
    package(dirs["pkg"])
    drop_in = dirs["etc"] / f"{timer.TIMER_UNIT}.d" / timer.DROP_IN
    drop_in.parent.mkdir()
    drop_in.write_text("[Timer]\nOnUnitActiveSec=5min\n")
    with pytest.raises(GestvenvError, match="not written by gestvenv"):
        timer.plan_files(user=False, interval=30)
    assert timer.plan_files(user=False, interval=60).remove == []  # not ours: not removed


# --- which files uninstall removes -------------------------------------------------------------

@pytest.mark.parametrize("user", [False, True])
def test_uninstall_removes_only_files_with_the_marker(dirs: dict[str, Path], tmp_path: Path,
                                                      user: bool) -> None:
    admin = timer.admin_dir(user)
    apply(timer.plan_files(user=user, interval=60))
    package(dirs["pkg-user" if user else "pkg"])
    drop_dir = admin / f"{timer.TIMER_UNIT}.d"
    drop_dir.mkdir()
    (drop_dir / timer.DROP_IN).write_text("[Timer]\nAccuracySec=1min\n")   # the admin's
    (drop_dir / "60-mine.conf").write_text(timer.render_drop_in(5))      # marker, but not ours
    packaged = {p: p.read_text() for p in (dirs["pkg-user" if user else "pkg"]).iterdir()}
    # A symlink at our path to a file with the marker: install never writes one; not ours.
    elsewhere = tmp_path / "elsewhere.service"
    elsewhere.write_text(f"{timer.MARKER}\n")
    (admin / timer.SERVICE_UNIT).unlink()
    (admin / timer.SERVICE_UNIT).symlink_to(elsewhere)

    removed, kept = timer.remove_our_files(user)

    assert removed == [admin / timer.TIMER_UNIT]
    assert kept == [admin / timer.SERVICE_UNIT, drop_dir / timer.DROP_IN]
    assert (admin / timer.SERVICE_UNIT).is_symlink() and elsewhere.exists()
    assert (drop_dir / timer.DROP_IN).read_text() == "[Timer]\nAccuracySec=1min\n"
    assert (drop_dir / "60-mine.conf").exists()
    assert {p: p.read_text() for p in packaged} == packaged


def test_uninstall_removes_our_drop_in_and_its_empty_dir(dirs: dict[str, Path]) -> None:
    package(dirs["pkg"])
    apply(timer.plan_files(user=False, interval=30))
    removed, kept = timer.remove_our_files(user=False)
    assert removed == [dirs["etc"] / f"{timer.TIMER_UNIT}.d" / timer.DROP_IN]
    assert kept == []
    assert list(dirs["etc"].iterdir()) == []
    assert sorted(p.name for p in dirs["pkg"].iterdir()) == [timer.SERVICE_UNIT, timer.TIMER_UNIT]
