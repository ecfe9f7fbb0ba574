"""packaging/: the Fedora spec (built here by packaging/rpm/build.sh with a macro shim) and the
Arch PKGBUILD agree with pyproject.toml and systemd/, and what they build holds what it should
and nothing that would let one user start units as another (no setuid/setgid files, nothing
world-writable, no polkit or D-Bus policy).

tests/package/test_rpm.py builds the RPM (rpmbuild) and runs the PKGBUILD's functions as makepkg
would (makepkg itself is not available on Debian)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
SYSTEMD = CHECKOUT / "systemd"
SPEC = CHECKOUT / "packaging" / "rpm" / "gestvenv.spec"
BUILD_SH = CHECKOUT / "packaging" / "rpm" / "build.sh"
MACROS = CHECKOUT / "packaging" / "rpm" / "debian-host.macros"
PKGBUILD = CHECKOUT / "packaging" / "arch" / "PKGBUILD"
ARCH_INSTALL = CHECKOUT / "packaging" / "arch" / "gestvenv.install"

PYPROJECT = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
UNIT_SUFFIXES = (".service", ".timer", ".slice", ".socket", ".path", ".target", ".mount")
COMMANDS = ("gestvenv", "gestvenv-ephemeral")  # man pages that must exist (gestvenv-*.1 too)
COMPLETIONS = ("/usr/share/bash-completion/completions/gestvenv",
               "/usr/share/zsh/site-functions/_gestvenv",
               "/usr/share/fish/vendor_completions.d/gestvenv.fish")
# Paths whose presence would hand out privileges: polkit actions/rules, D-Bus policy.
PRIVILEGED = re.compile(r"/polkit-1/|/dbus-1/|\.policy$|\.rules$")


def systemd_files() -> list[str]:
    return sorted(p.name for p in SYSTEMD.iterdir())


def spec_section(name: str) -> str:
    """The body of a spec section (%prep, %install, %files...), up to the next section."""
    text = SPEC.read_text()
    match = re.search(rf"^%{name}\b[^\n]*\n(.*?)(?=^%(?:prep|generate_buildrequires|build|install"
                      r"|check|post|preun|postun|files|changelog)\b|\Z)", text, re.M | re.S)
    assert match, f"no %{name} section in {SPEC}"
    return match.group(1)


def pkgbuild_vars() -> dict[str, list[str]]:
    script = ('source "$1"; for v in pkgname pkgver pkgrel arch license depends makedepends '
              'optdepends checkdepends install; do eval "vals=(\\"\\${$v[@]}\\")"; '
              'printf "%s\\0" "$v" "${#vals[@]}" "${vals[@]}"; done')
    out = subprocess.run(["bash", "-c", script, "bash", PKGBUILD], capture_output=True,
                         check=True, cwd=PKGBUILD.parent).stdout.decode().split("\0")
    result: dict[str, list[str]] = {}
    items = iter(out)
    for name in items:
        if not name:
            break
        count = int(next(items))
        result[name] = [next(items) for _ in range(count)]
    return result


def dependency_names(specs: list[str]) -> list[str]:
    return [re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs]


# --- versions and dependencies ---------------------------------------------------------------

def test_spec_version_is_pyprojects() -> None:
    assert re.findall(r"^Version:\s*(\S+)$", SPEC.read_text(), re.M) == [VERSION]


def test_pkgbuild_parses_and_its_version_is_pyprojects() -> None:
    subprocess.run(["bash", "-n", PKGBUILD], check=True)
    subprocess.run(["bash", "-n", ARCH_INSTALL], check=True)
    found = pkgbuild_vars()
    assert found["pkgname"] == ["gestvenv"]
    assert found["pkgver"] == [VERSION]
    assert found["arch"] == ["any"]
    assert found["license"] == ["MIT"]
    assert found["install"] == [ARCH_INSTALL.name]
    assert set(found["makedepends"]) >= {"python-build", "python-installer", "python-wheel",
                                         "python-setuptools"}


def test_pkgbuild_depends_on_every_runtime_dependency_and_uv_is_optional() -> None:
    found = pkgbuild_vars()
    # (python-pip: the builder without uv runs the system's one pip.)
    wanted = {"python", "python-pip"} | {f"python-{name}" for name in dependency_names(
        PYPROJECT["project"]["dependencies"]) if name != "uv"}
    assert set(found["depends"]) == wanted
    assert [d for d in found["optdepends"] if d.startswith("uv:")], found["optdepends"]


def test_spec_drops_uv_and_only_uv_from_the_metadata(tmp_path: Path) -> None:
    """The %prep sed turns uv into a Recommends; every other dependency stays in the metadata
    (the generated Requires)."""
    prep = spec_section("prep")
    seds = re.findall(r"^sed -i '([^']+)' pyproject.toml$", prep, re.M)
    assert len(seds) == 1, prep
    copy = tmp_path / "pyproject.toml"
    shutil.copy(CHECKOUT / "pyproject.toml", copy)
    subprocess.run(["sed", "-i", seds[0], copy], check=True)
    after = tomllib.loads(copy.read_text())["project"]["dependencies"]
    before = PYPROJECT["project"]["dependencies"]
    assert after == [d for d in before if dependency_names([d]) != ["uv"]]
    assert re.search(r"^Recommends:\s*uv$", SPEC.read_text(), re.M)
    assert not re.search(r"^Requires:.*\buv\b", SPEC.read_text(), re.M)


# --- systemd/ is packaged --------------------------------------------------------------------

@pytest.mark.parametrize("name", systemd_files())
def test_every_file_of_systemd_dir_is_packaged(name: str) -> None:
    install, files = spec_section("install"), spec_section("files")
    pkgbuild = PKGBUILD.read_text()
    if name.endswith(UNIT_SUFFIXES):
        # Installed by both install lines (system and user) and listed in both unit dirs.
        for text, dirs in ((install, ("%{_unitdir}", "%{_userunitdir}")),
                           (pkgbuild, ("/usr/lib/systemd/system", "/usr/lib/systemd/user"))):
            for target in dirs:
                pattern = rf"install -D[^\n]*? -t \S*{re.escape(target)}\"? \\\n(.*)\n"
                line = re.search(pattern, text)
                assert line and f"systemd/{name}" in line.group(1).split(), (name, target)
        assert f"%{{_unitdir}}/{name}\n" in files
        assert f"%{{_userunitdir}}/{name}\n" in files
    elif name.endswith(".tmpfiles"):
        conf = name.removesuffix(".tmpfiles") + ".conf"
        assert f"systemd/{name} %{{buildroot}}%{{_tmpfilesdir}}/{conf}\n" in install
        assert f"%{{_tmpfilesdir}}/{conf}\n" in files
        assert f'systemd/{name} "$pkgdir/usr/lib/tmpfiles.d/{conf}"' in pkgbuild
    else:
        pytest.fail(f"systemd/{name}: no rule to package this kind of file (spec, PKGBUILD, "
                    "and this test)")


@pytest.mark.parametrize("name", [n for n in systemd_files() if n.endswith(".tmpfiles")])
def test_tmpfiles_create_nothing_setuid_or_world_writable(name: str) -> None:
    for line in (SYSTEMD / name).read_text().splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) < 3 or fields[2] == "-":
            continue
        mode = int(fields[2].lstrip("~:"), 8)
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH), line


def test_no_privilege_granting_files_or_modes_in_the_recipes() -> None:
    for path in (SPEC, PKGBUILD):
        text = path.read_text()
        assert not PRIVILEGED.search(text.replace("polkit-1/*", "").replace("dbus-1/*", "")), path
        # Octal modes given to install/chmod/%attr: no setuid, setgid or world-writable bit.
        for mode in re.findall(r"(?:-[dDp]*m ?|%attr\(|chmod )([0-7]{3,4})\b", text):
            assert not int(mode, 8) & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH), (path, mode)
    # The spec's own guard refuses such files in the buildroot.
    assert "-perm /6000 -o -perm -0002" in spec_section("install")


def test_scripts_are_valid_shell() -> None:
    scripts = [BUILD_SH, PKGBUILD, ARCH_INSTALL]
    for script in scripts:
        subprocess.run(["bash", "-n", script], check=True)
    assert os.access(BUILD_SH, os.X_OK)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", BUILD_SH], check=True)
        # PKGBUILD variables are read by makepkg, srcdir/pkgdir set by it.
        subprocess.run(["shellcheck", "-s", "bash", "-e", "SC2034,SC2154,SC2164",
                        PKGBUILD, ARCH_INSTALL], check=True)


def test_macro_shim_says_it_is_for_debian_ci_only() -> None:
    header = MACROS.read_text().split("\n\n", 1)[0]
    assert "DEBIAN CI HOST ONLY" in header and "real macros" in header
