"""A hostile user of root's service: what it sends must never be read, run or expanded as root.

Each test is a caller of another uid (a real process, over the shared socket, as in
test_api_users.py) trying to reach what only root may: a file only root can read, or root's
own environment variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

import gestvenv

from .test_api import service  # noqa: F401  (the fixture)
from .test_api_users import ALICE, as_user, asyncio_run, events

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="root's service, other uids")]

SECRET = "root-only-d41d8cd98f00b204"


@pytest.fixture
def secret_var(monkeypatch: pytest.MonkeyPatch) -> str:
    """A variable of the service's own environment (set before the service starts)."""
    monkeypatch.setenv("GV_HOSTILE_SECRET", SECRET)
    return SECRET


@pytest.fixture
def shared(secret_var: str, service: Path) -> Path:  # noqa: F811
    os.chmod(service, 0o666)
    return service


@pytest.fixture
def root_only_wheel(tmp_path: Path) -> Path:
    """A wheel only root can read (0600, in a 0700 dir of root's)."""
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    wheel = folder / "secretpkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("secretpkg.py", f"SECRET = {SECRET!r}\n")
        z.writestr("secretpkg-1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: secretpkg\nVersion: 1.0\n")
        z.writestr("secretpkg-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("secretpkg-1.0.dist-info/RECORD",
                   "secretpkg.py,,\nsecretpkg-1.0.dist-info/METADATA,,\n"
                   "secretpkg-1.0.dist-info/WHEEL,,\nsecretpkg-1.0.dist-info/RECORD,,\n")
    wheel.chmod(0o600)
    return wheel


def _cleanup(*names: str) -> None:
    for name in names:
        with contextlib.suppress(gestvenv.EnvironmentNotFoundError):
            asyncio_run(gestvenv.destroy_environment(f"u{ALICE}-{name}"))


@pytest.mark.parametrize("spec", ["secretpkg @ {wheel}", "secretpkg@{wheel}"])
def test_a_package_spec_cannot_name_a_root_only_local_path(shared: Path, root_only_wheel: Path,
                                                           spec: str) -> None:
    """``name @ /path`` is a local path (uv takes it without ``file:``): the creation's
    resolving install runs as root on the host, so the caller would get, in its own env, a
    file it cannot read."""
    try:
        created, ran = as_user(
            ALICE, shared,
            ("POST", "/v1/envs", {"name": "wheel", "ttl": 300,
                                  "packages": [spec.format(wheel=root_only_wheel)]}),
            ("POST", "/v1/envs/wheel/exec", {"command": [
                "python", "-c", "import secretpkg; print(secretpkg.SECRET)"]}))
        assert SECRET not in json.dumps([created, ran]), (created, events(ran[1]))
        assert created[0] == 400, created  # refused as a local path, as '/...' is
    finally:
        _cleanup("wheel")


def test_requirements_cannot_name_a_root_only_path_relative_to_their_file(
        shared: Path, root_only_wheel: Path) -> None:
    """In a requirements file, ``name @ ../..`` is relative to the file (a temp dir of root's):
    neither '/' nor '.' begins the line."""
    relative = "../.." + str(root_only_wheel)
    try:
        created, ran = as_user(
            ALICE, shared,
            ("POST", "/v1/envs", {"name": "relreq", "ttl": 300,
                                  "requirements": f"secretpkg @ {relative}\n"}),
            ("POST", "/v1/envs/relreq/exec", {"command": [
                "python", "-c", "import secretpkg; print(secretpkg.SECRET)"]}))
        assert SECRET not in json.dumps([created, ran]), (created, events(ran[1]))
        assert created[0] == 400, created
    finally:
        _cleanup("relreq")


def test_requirements_do_not_expand_the_service_s_environment(shared: Path,
                                                              secret_var: str) -> None:
    """uv expands ``${VAR}`` in a requirements file, with the service's (root's) environment:
    the value comes back in the error (and a URL would send it anywhere); ``${HOME}/x`` is a
    local path that no check saw."""
    try:
        (created,) = as_user(
            ALICE, shared,
            ("POST", "/v1/envs", {"name": "expand", "ttl": 300,
                                  "requirements": "x @ ${GV_HOSTILE_SECRET}\n"}))
        assert secret_var not in json.dumps(created), created
        assert created[0] == 400, created
    finally:
        _cleanup("expand")


@pytest.fixture
def at_root_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's cwd is '/', as a system service's is (systemd's default)."""
    monkeypatch.chdir("/")


@pytest.mark.parametrize("route", ["create", "install"])
def test_a_bare_relative_path_is_not_read_as_root(at_root_dir: None, shared: Path,
                                                 root_only_wheel: Path, route: str) -> None:
    """``tmp/.../x.whl`` begins with none of '/', '.', '~', '-': uv takes it as a path relative
    to the service's cwd ('/'); at creation uv reads it as root, and an install after creation
    copies it into the env as root first (inside.stage_inputs: any argument that is an
    existing host path), for the caller's uid."""
    relative = str(root_only_wheel).lstrip("/")
    create: dict[str, object] = {"name": "bare", "ttl": 300}
    requests: list[tuple[str, str, object]] = []
    if route == "create":
        create["packages"] = [relative]
    else:
        requests.append(("POST", "/v1/envs/bare/install", {"packages": [relative]}))
    try:
        answers = as_user(
            ALICE, shared, ("POST", "/v1/envs", create), *requests,
            ("POST", "/v1/envs/bare/exec", {"command": [
                "python", "-c", "import secretpkg; print(secretpkg.SECRET)"]}))
        assert SECRET not in json.dumps(answers), answers
        assert answers[len(requests)][0] == 400, answers  # the create, or the install
    finally:
        _cleanup("bare")


_PRELOAD = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    const char *path = getenv("GV_HOSTILE_MARK");
    if (path && geteuid() == 0) close(open(path, O_WRONLY | O_CREAT, 0644));
}
"""


@pytest.mark.skipif(not os.path.exists("/usr/bin/gcc"), reason="the caller builds its library")
def test_a_command_s_variables_do_not_reach_root_s_sandbox_launcher(shared: Path,
                                                                    tmp_path: Path) -> None:
    """A command's ``env`` is the environment of the whole command line, bwrap and setpriv
    included, which run as root (a root creator's bwrap has no user namespace): LD_PRELOAD of
    a library the caller built in its env's dir runs the caller's code as root."""
    mark = tmp_path / "ran-as-root"  # (a dir only root can write in)
    try:
        created, built = as_user(
            ALICE, shared,
            ("POST", "/v1/envs", {"name": "preload", "ttl": 300}),
            ("POST", "/v1/envs/preload/exec", {
                "command": ["sh", "-c", "cat > e.c && gcc -shared -fPIC -o e.so e.c"],
                "stdin": _PRELOAD}))
        assert created[0] == 201 and events(built[1])["exit"]["returncode"] == 0, built
        library = os.path.join(created[1]["path"], "e.so")
        (ran,) = as_user(
            ALICE, shared,
            ("POST", "/v1/envs/preload/exec", {
                "command": ["true"],
                "env": {"LD_PRELOAD": library, "GV_HOSTILE_MARK": str(mark)}}))
        assert not mark.exists(), ("the caller's library ran as root", ran)
    finally:
        _cleanup("preload")
