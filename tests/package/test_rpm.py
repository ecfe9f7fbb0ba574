"""The RPM built here (packaging/rpm/build.sh: rpmbuild with a macro shim for this Debian host)
and the PKGBUILD's functions run as makepkg would (makepkg is not available on Debian).

Run by ``make test-package``, after the Debian build dependencies (which include what these
builds need: pip, setuptools, build, installer, the runtime modules) and rpm are installed:
a missing tool is a failure there, not a skip."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_packaging import (
    BUILD_SH,
    CHECKOUT,
    COMMANDS,
    COMPLETIONS,
    PKGBUILD,
    PRIVILEGED,
    PYPROJECT,
    UNIT_SUFFIXES,
    VERSION,
    dependency_names,
    systemd_files,
)

# --- the RPM, built --------------------------------------------------------------------------

def clean_env() -> dict[str, str]:
    """This session's gestvenv settings (conftest) are no part of a package build."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("GESTVENV_", "UV_"))}


def missing_python_modules(*names: str) -> list[str]:
    code = ("import importlib.util, sys; "
            "print(*[m for m in sys.argv[1:] if importlib.util.find_spec(m) is None])")
    if not Path("/usr/bin/python3").exists():
        return ["/usr/bin/python3"]
    out = subprocess.run(["/usr/bin/python3", "-c", code, *names], capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


@pytest.fixture(scope="module")
def built_rpm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """build.sh's SRPM and RPM, --without tests: the unit tier is this pytest run's, not worth
    running again with /usr/bin/python3's pytest (%pyproject_check_import still runs)."""
    for tool in ("rpmbuild", "rpm", "git"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (make test-package installs rpm)")
    missing = missing_python_modules("pip", "setuptools", "wheel", "packaging", "pytest",
                                     "click", "tomlkit", "psutil", "dbus_next")
    if missing:
        pytest.fail(f"/usr/bin/python3 lacks the build dependencies {missing}")
    out = tmp_path_factory.mktemp("rpm")
    proc = subprocess.run([BUILD_SH, out, "--without", "tests"], capture_output=True,
                          text=True, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    srpm, rpm = (Path(p) for p in proc.stdout.split())
    assert srpm.name == f"gestvenv-{VERSION}-1.src.rpm" and srpm.is_file()
    assert rpm.name == f"gestvenv-{VERSION}-1.noarch.rpm" and rpm.is_file()
    return srpm, rpm


def assert_installs_systemd_dir(files: set[str]) -> None:
    """Each unit of systemd/ in both unit dirs (system and user managers), the tmpfiles file."""
    for name in systemd_files():
        if name.endswith(UNIT_SUFFIXES):
            assert {f"/usr/lib/systemd/system/{name}", f"/usr/lib/systemd/user/{name}"} <= files
        elif name.endswith(".tmpfiles"):
            assert f"/usr/lib/tmpfiles.d/{name.removesuffix('.tmpfiles')}.conf" in files


def rpm_query(rpm: Path, *args: str) -> str:
    return subprocess.run(["rpm", "-qp", *args, rpm], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.slow
def test_rpm_holds_the_code_units_tmpfiles_man_pages_and_completions(
        built_rpm: tuple[Path, Path]) -> None:
    files = set(rpm_query(built_rpm[1], "-l").split())
    sitelib = {m.group(1) for f in files
               if (m := re.match(r"(/usr/lib/python3\.\d+/site-packages)/gestvenv/", f))}
    assert len(sitelib) == 1, sorted(files)
    site = sitelib.pop()
    assert {f"{site}/gestvenv/__init__.py", f"{site}/gestvenv/cli/__init__.py",
            f"{site}/gestvenv-{VERSION}.dist-info/METADATA", "/usr/bin/gestvenv"} <= files
    assert_installs_systemd_dir(files)
    for command in COMMANDS:
        assert [f for f in files if re.fullmatch(rf"/usr/share/man/man1/{command}\.1(\.gz)?", f)]
    assert set(COMPLETIONS) <= files
    licenses = rpm_query(built_rpm[1], "-L").split()
    assert [f for f in licenses if f.rsplit("/", 1)[-1].startswith("LICENSE")], licenses
    srpm_files = set(rpm_query(built_rpm[0], "-l").split())
    assert srpm_files == {"gestvenv.spec", f"gestvenv-{VERSION}.tar.gz"}


@pytest.mark.slow
def test_rpm_has_no_setuid_setgid_world_writable_or_policy_files(
        built_rpm: tuple[Path, Path]) -> None:
    for line in rpm_query(built_rpm[1], "--qf", "[%{FILEMODES} %{FILENAMES}\n]").splitlines():
        mode_text, path = line.split(" ", 1)
        mode = int(mode_text)
        assert not PRIVILEGED.search(path), path
        if stat.S_ISLNK(mode):
            continue
        assert not mode & (stat.S_ISUID | stat.S_ISGID), line
        assert not mode & stat.S_IWOTH, line


@pytest.mark.slow
def test_rpm_requires_come_from_the_metadata_and_uv_is_recommended(
        built_rpm: tuple[Path, Path]) -> None:
    requires = rpm_query(built_rpm[1], "--requires")
    for name in dependency_names(PYPROJECT["project"]["dependencies"]):
        present = re.search(rf"^python3(\.\d+)?dist\({re.escape(name)}\)", requires, re.M)
        assert bool(present) == (name != "uv"), (name, requires)
    assert re.search(r"^python\(abi\) = 3\.\d+$", requires, re.M), requires
    # uv (the fast builder) and bubblewrap (namespace isolation without systemd): both optional.
    assert rpm_query(built_rpm[1], "--recommends").split() == ["bubblewrap", "uv"]


def scriptlets(rpm: Path) -> dict[str, str]:
    text = rpm_query(rpm, "--scripts")
    parts = re.split(r"^(\w+) scriptlet \(using [^)]*\):\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.slow
def test_rpm_scriptlets_enable_the_timer_by_preset_and_disable_it_on_removal(
        built_rpm: tuple[Path, Path]) -> None:
    # Shim and Fedora (systemd-update-helper) forms alike.
    scripts = scriptlets(built_rpm[1])
    post = scripts["postinstall"]
    assert re.search(r"(preset|install-system-units) +gestvenv-cleanup\.timer", post), post
    assert re.search(r"(preset --global|install-user-units) +gestvenv-cleanup\.timer", post), post
    assert re.search(r"systemd-tmpfiles --create .*/tmpfiles\.d/gestvenv\.conf", post), post
    preun = scripts["preuninstall"]
    assert re.search(r"(disable --now|remove-system-units) +gestvenv-cleanup\.timer", preun)
    assert re.search(r"(--global disable|remove-user-units) +gestvenv-cleanup\.timer", preun)
    # Nothing in them hands out privileges either.
    for body in scripts.values():
        assert not re.search(r"chmod|chown|setcap|polkit|dbus-1", body), body


# --- the PKGBUILD, run as makepkg would -------------------------------------------------------

@pytest.mark.slow
def test_pkgbuild_functions_build_and_package(tmp_path: Path) -> None:
    missing = missing_python_modules("build", "installer", "setuptools", "wheel", "pytest",
                                     "click", "tomlkit", "psutil", "dbus_next")
    if missing or not shutil.which("git"):
        pytest.fail(f"/usr/bin/python3 lacks {missing} (python3-build, python3-installer...)"
                    if missing else "git is not installed")
    srcdir, pkgdir, bindir = tmp_path / "src", tmp_path / "pkg", tmp_path / "bin"
    tree = srcdir / f"gestvenv-{VERSION}"
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"],
                            cwd=CHECKOUT, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = CHECKOUT / rel
        if src.is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / rel)
    bindir.mkdir()
    (bindir / "python").symlink_to("/usr/bin/python3")  # Arch's python is Python 3
    # makepkg: each function from $srcdir, under set -e; check() left out (the unit tier runs
    # in the RPM build already).
    script = ('set -e; source "$1"; srcdir=$2; pkgdir=$3; '
              'cd "$srcdir"; build; cd "$srcdir"; package')
    env = clean_env() | {"PATH": f"{bindir}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", "-c", script, "bash", PKGBUILD, srcdir, pkgdir],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {"/" + p.relative_to(pkgdir).as_posix() for p in pkgdir.rglob("*")
             if not p.is_dir()}
    # Arch's python installs to /usr/bin and /usr/lib/python3.X/site-packages; Debian's to
    # /usr/local/...: only the names are checked.
    assert [f for f in files if f.endswith("/bin/gestvenv")], sorted(files)
    assert [f for f in files if f.endswith("-packages/gestvenv/cli/__init__.py")]
    assert_installs_systemd_dir(files)
    for command in COMMANDS:
        assert f"/usr/share/man/man1/{command}.1" in files
    assert set(COMPLETIONS) <= files
    assert {"/usr/share/licenses/gestvenv/LICENSE", "/usr/share/doc/gestvenv/README.md"} <= files
    for path in pkgdir.rglob("*"):
        mode = path.lstat().st_mode
        assert not PRIVILEGED.search(path.as_posix()), path
        if not stat.S_ISLNK(mode):
            assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH), path
