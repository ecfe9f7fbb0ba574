"""The builder without uv (``builder = "venv"``): a venv written in-process, one pip for all.

Real installs from the session's offline wheelhouse. The pip used is the one beside the tests'
Python; Debian's own pip (23.0.1, what the .deb runs) and the pip wheel its ``ensurepip`` ships
are tried too where this machine has them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import gestvenv
from gestvenv import builder as builder_mod
from gestvenv import storage
from gestvenv.builder import Pip, VenvPipBuilder, find_pip
from gestvenv.config import load_config
from gestvenv.reaper import mount_of
from gestvenv.runtime import bwrap
from gestvenv.runtime.systemd import systemd_booted

from .hostile_sdist import hostile_sdist, make_sdist, report_of

DEBIAN_PIP = "/usr/lib/python3/dist-packages/pip"
PIP_WHEELS = sorted(Path("/usr/share/python-wheels").glob("pip-*.whl"))

SANDBOX = systemd_booted() or bwrap.probe_for(os.geteuid(), namespaces=True) is None
needs_sandbox = pytest.mark.skipif(not SANDBOX, reason="no namespace sandbox here")


@pytest.fixture(autouse=True)
def venv_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_BUILDER", "venv")
    # Snapshots and pip's cache beside a cache of the test's own: counts are exact.
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CACHE_DIR", str(tmp_path / "cache" / "uv"))
    # Only gestvenv's settings: not the machine's pip configuration (find-links, indexes).
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def templates() -> list[Path]:
    root = storage.templates_dir(load_config())
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() \
        else []


def pips() -> Iterator[object]:
    yield pytest.param(None, id="own")
    if os.path.isfile(f"{DEBIAN_PIP}/__pip-runner__.py"):
        yield pytest.param(Pip(f"{DEBIAN_PIP}/__pip-runner__.py", DEBIAN_PIP, "debian"),
                           id="debian")
    if PIP_WHEELS:
        yield pytest.param(Pip(f"{PIP_WHEELS[-1]}/pip", str(PIP_WHEELS[-1]), "wheel"),
                           id="wheel")


@pytest.fixture(params=list(pips()))
def pip(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Pip:
    chosen = request.param or find_pip()
    assert chosen is not None
    monkeypatch.setattr(builder_mod, "find_pip", lambda: chosen)
    return chosen


def outside_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record what pip runs in the creator's process (the builder's ``_run``)."""
    runs: list[list[str]] = []
    real = VenvPipBuilder._run

    async def recorded(self: VenvPipBuilder, argv: list[str], what: str,
                       env: dict[str, str] | None = None) -> None:
        runs.append(argv)
        await real(self, argv, what, env)

    monkeypatch.setattr(VenvPipBuilder, "_run", recorded)
    return runs


async def test_an_env_is_written_without_ensurepip_and_its_pip_runs_the_one_pip(
        pip: Pip, wheelhouse: Path) -> None:
    async with gestvenv.ephemeral("vb", packages=["gvtool", "six>=1.0"]) as env:
        assert env.info()["builder"] == "venv"
        site = next(env.path.glob("lib/python*/site-packages"))
        # What the install added, and nothing of a seeded pip (ensurepip: pip, setuptools).
        assert sorted(p.name for p in site.iterdir()) == [
            "gvtool", "gvtool-1.0.dist-info", "six", "six-1.16.0.dist-info"]
        assert "written in-process" in (env.path / "pyvenv.cfg").read_text()
        assert (env.bin_dir / "gvtool").read_text().startswith(f"#!{env.python}\n")
        tool = await env.execute("gvtool")
        version = await env.execute(["pip", "--version"])
        # The env's pip: gestvenv's index settings (offline, the wheelhouse), its own cache.
        add = await env.execute(["pip", "install", "gvdemo"])
        demo = await env.execute(["python", "-c", "import gvdemo, sys; "
                                  "print(gvdemo.VALUE, gvdemo.__file__.startswith(sys.prefix))"])
        cache = await env.execute(["pip", "cache", "dir"])
        listed = await env.execute(["pip3", "list", "--format", "freeze"])
    assert tool.stdout == "gvtool ran\n"
    assert version.ok and pip.location in version.stdout, version
    assert add.ok, add.stderr
    assert demo.stdout == "42 True\n", demo.stderr
    assert cache.stdout.strip() == str(env.path / ".gestvenv" / "pip-cache")
    assert set(listed.stdout.split()) == {"gvtool==1.0", "six==1.16.0", "gvdemo==1.0",
                                          "gvdep==2.0"}, listed.stdout


async def test_the_second_env_of_a_set_is_a_clone_without_pip(
        monkeypatch: pytest.MonkeyPatch) -> None:
    runs = outside_runs(monkeypatch)
    async with gestvenv.ephemeral("first", packages=["gvtool", "six>=1.0"]):
        pass
    assert len(runs) == 1 and "--only-binary" in runs[0]  # wheels only, in the creator
    [snapshot] = templates()
    assert b"@@gestvenv-env-python@@" in (snapshot / "bin" / "gvtool").read_bytes()
    assert not (snapshot / "bin" / "pip").exists()          # the shim is each env's own
    async with gestvenv.ephemeral("second", packages=["gvtool", "six>=1.0"]) as env:
        assert len(runs) == 1                                # no pip at all: a clone
        assert (env.bin_dir / "gvtool").read_text().startswith(f"#!{env.python}\n")
        assert env.path.as_posix() in (env.bin_dir / "pip").read_text()
        site = next(env.path.glob("lib/python*/site-packages"))
        mine = (site / "six" / "__init__.py").stat()
        theirs = (snapshot / site.relative_to(env.path) / "six" / "__init__.py").stat()
        if mount_of(str(site))[1] == "overlay":  # root, process isolation (test_overlay.py)
            assert mine.st_dev != theirs.st_dev
        else:
            assert mine.st_nlink == 1
            assert mine.st_ino != theirs.st_ino
        tool = await env.execute("gvtool")
        listed = await env.execute(["pip", "list", "--format", "freeze"])
    assert tool.stdout == "gvtool ran\n"
    assert set(listed.stdout.split()) == {"gvtool==1.0", "six==1.16.0"}
    assert len(templates()) == 1


async def test_a_uv_snapshot_is_not_the_venv_builders(monkeypatch: pytest.MonkeyPatch) -> None:
    if builder_mod.find_uv() is None:
        pytest.skip("no uv here")
    monkeypatch.setenv("GESTVENV_EPHEMERAL_BUILDER", "uv")
    async with gestvenv.ephemeral("by-uv", packages=["six"]):
        pass
    monkeypatch.setenv("GESTVENV_EPHEMERAL_BUILDER", "venv")
    runs = outside_runs(monkeypatch)
    async with gestvenv.ephemeral("by-pip", packages=["six"]) as env:
        assert not (env.bin_dir / "pip").read_text().count(" uv ")
    assert len(runs) == 1
    assert len(templates()) == 2


async def test_a_failing_install_is_a_build_error_that_says_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(gestvenv.BuildError) as caught:
        async with gestvenv.ephemeral("bad", packages=["six", "gvnosuchthing>=1"]):
            pass
    message = str(caught.value)
    assert message.splitlines()[0].startswith(
        "pip install six gvnosuchthing>=1 failed inside environment 'bad' (exit 1)"), message
    assert "No matching distribution found for gvnosuchthing" in message
    assert templates() == []
    assert gestvenv.list_environments() == []


async def test_an_sdist_by_name_is_built_inside_after_the_wheels_only_attempt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wheelhouse: Path) -> None:
    """A plain name whose only distribution is an sdist: the creator's pip finds no wheel, and
    the install moves inside the env, where the build runs; nothing is snapshotted."""
    links = tmp_path / "links"
    links.mkdir()
    sdist = make_sdist(tmp_path / "src", tag="gvevil-ok", secret="/nonexistent", port=9,
                       alloc_mb=0)
    shutil.copy(sdist, links)
    monkeypatch.setenv("GESTVENV_EPHEMERAL_FIND_LINKS", f"{wheelhouse} {links}")
    runs = outside_runs(monkeypatch)
    async with gestvenv.ephemeral("sdist", packages=["gvevil", "six"]) as env:
        built = await env.execute(["python", "-c", "import gvevil, six; print(gvevil.BUILT)"])
        listed = await env.execute(["pip", "list", "--format", "freeze"])
    assert built.stdout == "True\n", built.stderr
    assert [("--only-binary" in argv) for argv in runs] == [True]  # then inside
    assert "gvevil==1.0" in listed.stdout.split()
    assert templates() == []  # a build's files are the env's code, never a snapshot


async def test_installs_after_creation_and_local_paths_run_inside(
        monkeypatch: pytest.MonkeyPatch, wheelhouse: Path) -> None:
    runs = outside_runs(monkeypatch)
    wheel = wheelhouse / "gvdemo-1.0-py3-none-any.whl"
    async with gestvenv.ephemeral("later", packages=[str(wheel)]) as env:
        assert runs == []                                    # a path: inside
        await env.install(["gvtool"])                        # site-packages not empty: inside
        assert runs == []
        tool = await env.execute("gvtool")
        demo = await env.execute(["python", "-c", "import gvdemo; print(gvdemo.VALUE)"])
    assert tool.stdout == "gvtool ran\n"
    assert demo.stdout == "42\n"


async def test_the_creators_pip_variables_that_add_projects_keep_the_install_inside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (A project named by PIP_EDITABLE would be built whatever --only-binary says.)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("six==0.9.0\n")
    monkeypatch.setenv("PIP_CONSTRAINT", str(constraints))
    runs = outside_runs(monkeypatch)
    async with gestvenv.ephemeral("constrained", packages=["six"]) as env:
        out = await env.execute(["python", "-c", "import six; print(six.__version__)"])
    assert runs == []
    assert out.stdout == "0.9.0\n"


@needs_sandbox
async def test_a_hostile_sdist_is_built_inside_the_sandbox_and_said_plainly(
        tmp_path: Path) -> None:
    with hostile_sdist(tmp_path / "src", alloc_mb=600) as (sdist, tag, listener):
        limits = gestvenv.ResourceLimits(network_access=False, max_memory=256)
        with pytest.raises(gestvenv.BuildError) as caught:
            async with gestvenv.ephemeral("hostile", packages=[str(sdist)],
                                          isolation_level="namespace", resource_limits=limits):
                pass
        message = str(caught.value)
        assert message.startswith("pip install ") and "environment 'hostile'" in message
        report = report_of(message)
        assert report["uid"] != 0                     # the env's own uid, not the creator's
        for key in ("root_marker", "read_home", "network"):
            assert report[key].startswith("held "), (key, report[key])
        assert not os.path.lexists("/" + tag)  # noqa: ASYNC240 - one stat
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert gestvenv.list_environments() == []


@needs_sandbox
async def test_a_build_inside_the_sandbox_is_the_envs_own(tmp_path: Path) -> None:
    sdist = make_sdist(tmp_path / "src", tag="gvevil-ok", secret="/nonexistent", port=9,
                       alloc_mb=0)
    async with gestvenv.ephemeral("sandboxed", packages=[str(sdist), "six"],
                                  isolation_level="namespace") as env:
        uid = env.info()["sandbox_uid"]
        built = await env.execute(["python", "-c", "import gvevil; print(gvevil.BUILT)"])
        await env.install(["gvtool"])                # after creation: all of it inside
        tool = await env.execute("gvtool")
        # (The wheelhouse is in /tmp, which the sandbox hides: the shim only lists here.)
        shim = await env.execute(["pip", "list", "--format", "freeze"])
        owners = {p.stat().st_uid for p in env.path.rglob("gvevil/__init__.py")}
    assert built.stdout == "True\n", built.stderr
    assert tool.stdout == "gvtool ran\n"
    assert {"gvevil==1.0", "gvtool==1.0", "six==1.16.0"} <= set(shim.stdout.split()), shim
    assert owners == {uid} and uid != 0  # built and installed by the env's own uid


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a filesystem needs root")
async def test_a_full_cap_during_the_install_is_said() -> None:
    # gvbig installs 4 MB (tests/harness/wheels.py); pip's ENOSPC is the env's cap, said so.
    limits = gestvenv.ResourceLimits(max_disk=2)
    with pytest.raises(gestvenv.DiskFullError) as caught:
        async with gestvenv.ephemeral("capped", packages=["gvbig"], storage_backend="tmpfs",
                                      resource_limits=limits):
            pass
    assert str(caught.value) == ("environment 'capped' ran out of disk space while installing "
                                 "its packages: its max_disk of 2 MB is used up")


@pytest.fixture
def podman(wheelhouse: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Podman as the engine, and the wheelhouse where the env's own uid can read it (pytest's
    temp dirs are root's alone), as find_links: the container binds it read-only."""
    from gestvenv.container import engine as engines

    found, why = engines.find("podman", Path(tempfile.gettempdir()))
    if found is None:
        pytest.skip(f"no podman: {why}")
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CONTAINER_ENGINE", "podman")
    copy = Path(tempfile.mkdtemp(prefix="gv-wheels-", dir="/var/tmp"))
    copy.chmod(0o755)
    for wheel in wheelhouse.iterdir():
        shutil.copy(wheel, copy / wheel.name)
        (copy / wheel.name).chmod(0o644)
    monkeypatch.setenv("GESTVENV_EPHEMERAL_FIND_LINKS", str(copy))
    yield copy
    shutil.rmtree(copy)


@pytest.mark.usefixtures("podman")
async def test_in_a_container_the_one_pip_is_bound_in() -> None:
    """The container holds the env's dir and its interpreter's image: the pip the builder runs
    (Builder.tools) is bound in read-only, for the installs run inside and for the env's pip."""
    async with gestvenv.ephemeral("boxed", isolation_level="container",
                                  packages=["gvdemo"]) as env:
        await env.install(["gvtool"])                        # inside: in the container
        ran = await env.execute(["gvtool"])
        pip = await env.execute(["pip", "install", "--quiet", "six==1.16.0"])
        both = await env.execute(["python", "-c", "import gvdemo, six; print(gvdemo.VALUE, "
                                  "six.__file__.startswith(__import__('sys').prefix))"])
    assert ran.stdout == "gvtool ran\n", ran.stderr
    assert pip.ok, pip.stderr
    assert both.stdout.split() == ["42", "True"], both.stderr
