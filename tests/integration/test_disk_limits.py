"""max_disk for real: a filesystem of the env's own on every backend (a tmpfs, or a
loop-mounted ext4 image), writing past it fails inside with ENOSPC, a full disk met while
creating or installing is one clear line, and nothing (mount, loop device, image) outlives it.

Run by the host tier (local runtime) and, inside the test host, by the systemd tier: the cap is
the storage's, the same under both runtimes. Mounting needs root: as another user the cap is
refused, which tests/integration/test_local_env.py checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gestvenv
from gestvenv import DiskFullError, ResourceLimits, StorageBackend

from .support import gvtest, leftover_summary, leftovers, run_as_gvtest

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a filesystem needs root")

BACKENDS = [b.value for b in StorageBackend]
MB = 1 << 20

# Writes up to MB megabytes, 1 MB at a time, into each place given, and prints, per place,
# how many MB got in and the error that stopped it ("none" if nothing did).
FILL = """
import errno, os, sys
for place in sys.argv[2:]:
    n, err = 0, "none"
    try:
        with open(os.path.join(place, f"fill-{os.getpid()}"), "wb") as f:
            for _ in range(int(sys.argv[1])):
                f.write(b"x" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
                n += 1
    except OSError as exc:
        err = errno.errorcode.get(exc.errno, str(exc.errno))
    print(place, n, err)
"""


def filled(output: str) -> dict[str, tuple[int, str]]:
    """FILL's output: place -> (MB written, what stopped it)."""
    return {line.split()[0]: (int(line.split()[1]), line.split()[2])
            for line in output.splitlines()}


def mounts_at_or_under(path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == path or p.startswith(prefix)]


def loops_backed_under(path: str) -> list[str]:
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().startswith(path.rstrip("/") + "/"):
                found.append(backing.parent.parent.name)
        except OSError:
            continue
    return found


def fills_in(place: str) -> list[str]:
    """What the hostile probe left in a host dir (none, if the sandbox held)."""
    return [p.name for p in Path(place).glob("fill-*")]


def gv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gestvenv", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def nothing_of(path: str) -> None:
    assert not os.path.lexists(path), f"{path} is left"
    assert mounts_at_or_under(path) == [], mounts_at_or_under(path)
    assert loops_backed_under(path) == [], loops_backed_under(path)


@root_only
@pytest.mark.parametrize("isolation", ["process", "namespace"])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_writing_past_max_disk_fails_with_enospc_at_the_cap(backend: str,
                                                                  isolation: str) -> None:
    async with gestvenv.ephemeral("capped", storage_backend=backend, isolation_level=isolation,
                                  resource_limits=ResourceLimits(max_disk=50)) as env:
        path = str(env.path)
        status = env.enforcement.limits["max_disk"]
        assert status.enforced, status
        assert ("ext4 image" if backend == "disk" else "tmpfs") in status.mechanism
        assert mounts_at_or_under(path) == [path]
        result = await env.execute(["python", "-c", FILL, "100", path], check=True)
        written, error = filled(result.stdout)[path]
        # About 50 MB: the cap minus what the venv and the filesystem's own metadata take.
        assert error == "ENOSPC" and 45 <= written <= 50, result.stdout
        # The env's bookkeeping still works with its disk full: a command, its own state.
        assert (await env.execute(["python", "-c", "print('still here')"])).stdout == \
            "still here\n"
        assert (await env.usage()).disk_bytes >= 40 * MB
    nothing_of(path)


@root_only
@pytest.mark.parametrize("isolation", ["process", "namespace"])
async def test_a_disk_cap_s_loop_device_is_gone_when_its_env_is(isolation: str) -> None:
    """The kernel clears an autoclear loop device a moment after the unmount returns (found by
    CI: 1 run in ~20 under load still had it at the env's exit); the end of an env waits for
    it. Ten in a row, each checked at once."""
    for index in range(10):
        async with gestvenv.ephemeral(f"loop{index}", storage_backend="disk",
                                      isolation_level=isolation,
                                      resource_limits=ResourceLimits(max_disk=20)) as env:
            path = str(env.path)
            assert loops_backed_under(path)
            await env.execute(["python", "-c", "import sys; open(sys.argv[1] + '/x', 'w')"
                               ".write('a' * 4096)", path], check=True)
        assert loops_backed_under(path) == [], f"{index}: {loops_backed_under(path)}"
        nothing_of(path)


@root_only
def test_a_loop_device_still_mounted_elsewhere_is_said_not_waited_for(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The cap's filesystem bind-mounted elsewhere by root: the env ends at once, and says
    that its loop device lasts as long as that mount."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    since = time.time()
    with gestvenv.ephemeral_sync("bound", storage_backend="disk",
                                 resource_limits=ResourceLimits(max_disk=20)) as env:
        path = str(env.path)
        subprocess.run(["mount", "--bind", path, str(elsewhere)], check=True)
    try:
        said = "also mounted on " + str(elsewhere)
        # Said by whoever unmounted it: this process (the local runtime), or the env unit's
        # stop action, in the journal (under systemd).
        err = capfd.readouterr().err
        deadline = time.monotonic() + 10
        while said not in err and os.path.isdir("/run/systemd/system") and \
                time.monotonic() < deadline:
            err += subprocess.run(["journalctl", "--no-pager", "-o", "cat", "--since",
                                   f"@{int(since)}", "-g", "also mounted on"],
                                  capture_output=True, text=True).stdout
            time.sleep(0.2)
        assert said in err
        assert loops_backed_under(path)  # (as said: it lasts with that mount)
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True)
    nothing_of(path)


@root_only
def test_show_says_what_holds_the_cap() -> None:
    created = gv("ephemeral", "create", "shown", "--disk", "20", "--storage", "disk")
    assert created.returncode == 0, created.stderr
    try:
        shown = gv("ephemeral", "show", "shown")
        assert "max_disk = 20: enforced (an ext4 image of its own (20 MB, pre-allocated) " \
            "loop-mounted on its dir" in shown.stdout, shown.stdout
        info = json.loads(gv("ephemeral", "show", "shown", "--json").stdout)
        assert info["enforcement"]["limits"]["max_disk"]["enforced"] is True
        path = info["path"]
    finally:
        assert gv("ephemeral", "cleanup", "shown").returncode == 0
    nothing_of(path)


def image_blocks(env_path: str) -> int:
    """Bytes the env's image occupies on the host disk. The image is under the env's own
    mount, out of everyone's sight: looked at from a mount namespace of our own, where the
    env's filesystem is unmounted (private propagation: the real one stays)."""
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'umount -l "$1" && stat -c "%b %B" "$1/.gestvenv-disk.img"', "sh", env_path],
        capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]) * int(out[1])


@root_only
@pytest.mark.parametrize("preallocate", [True, False])
async def test_the_disk_image_is_preallocated_unless_configured_not_to_be(
        preallocate: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_PREALLOCATE", str(preallocate).lower())
    async with gestvenv.ephemeral("prealloc", storage_backend="disk",
                                  resource_limits=ResourceLimits(max_disk=64)) as env:
        occupied = image_blocks(str(env.path))
        if preallocate:
            assert occupied >= 64 * MB, occupied  # before its first write
        else:
            assert occupied < 8 * MB, occupied    # what mkfs and the venv wrote
            # ... and a sparse image still caps the size.
            result = await env.execute(["python", "-c", FILL, "100", str(env.path)],
                                       check=True)
            written, error = filled(result.stdout)[str(env.path)]
            assert error == "ENOSPC" and 55 <= written <= 64, result.stdout
        assert ("pre-allocated" if preallocate else "sparse") in \
            env.enforcement.limits["max_disk"].mechanism


@root_only
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_package_set_bigger_than_the_cap_is_one_line_and_leaves_nothing(backend: str) -> None:
    # gvbig installs 4 MB (tests/harness/wheels.py): the stand-in for a real package set.
    before = leftovers()
    result = gv("ephemeral", "create", "big", "-p", "gvbig", "--disk", "2", "--storage", backend)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == [
        "gestvenv: error: environment 'big' ran out of disk space while installing its "
        "packages: its max_disk of 2 MB is used up"], result.stderr
    assert leftovers() == before, leftover_summary(leftovers())
    assert gestvenv.list_environments() == []


@pytest.fixture
def tiny_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """A storage root on a 1 MB filesystem: full after the first few files."""
    root = tmp_path / "tiny"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tiny", str(root)], check=True)
    monkeypatch.setenv("GESTVENV_EPHEMERAL_STORAGE_ROOT", str(root))
    yield root
    subprocess.run(["umount", str(root)], check=True)


@root_only
@pytest.mark.parametrize("disk", [None, 5])
def test_a_create_into_a_full_storage_root_is_one_line_and_leaves_nothing(
        tiny_root: Path, disk: int | None) -> None:
    args = ["ephemeral", "create", "full", "-p", "gvbig", "--storage", "disk"]
    result = gv(*args, *(["--disk", str(disk)] if disk else []))
    assert result.returncode == 1, (result.stdout, result.stderr)
    [line] = result.stderr.splitlines()
    if disk:  # refused before anything exists: the image would not fit
        assert line.startswith("gestvenv: error: cannot create environment 'full': "
                               "max_disk=5 MB is more than the "), line
        assert line.endswith(f" MB free on the disk storage root's filesystem ({tiny_root})")
    else:
        assert line.startswith(f"gestvenv: error: environment 'full': no space left on device "
                               f"while installing its packages: the disk storage root "
                               f"({tiny_root}) is full ("), line
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tiny_root.iterdir()) == [".gestvenv-root"]
    assert mounts_at_or_under(str(tiny_root)) == [str(tiny_root)]
    assert loops_backed_under(str(tiny_root)) == []
    assert gestvenv.list_environments() == []


@root_only
@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_install_past_the_cap_is_a_disk_full_error_and_the_env_stays(
        backend: str) -> None:
    async with gestvenv.ephemeral("grow", storage_backend=backend,
                                  resource_limits=ResourceLimits(max_disk=3)) as env:
        with pytest.raises(DiskFullError) as info:
            await env.install(["gvbig"])
        assert str(info.value) == ("environment 'grow' ran out of disk space while installing "
                                   "gvbig: its max_disk of 3 MB is used up")
        # What fitted before still works; the failed install's files are gone.
        assert (await env.execute(["python", "-c", "print(1)"])).ok
        assert (await env.usage()).disk_bytes < 2 * MB


def test_a_user_who_cannot_mount_is_refused_the_cap_and_told_why() -> None:
    user = gvtest()  # (the test host's unprivileged user, with a user manager)
    refused = run_as_gvtest("python3", "-m", "gestvenv", "ephemeral", "create", "nocap",
                            "--disk", "10")
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    [line] = refused.stderr.splitlines()
    assert "max_disk=10: needs a filesystem of the env's own, and mounting one needs root " \
        f"(uid {user.pw_uid} cannot mount" in line, line
    assert "allow_unenforced" in line
    allowed = run_as_gvtest("python3", "-m", "gestvenv", "ephemeral", "create", "nocap",
                            "--disk", "10", "--allow-unenforced")
    try:
        assert allowed.returncode == 0, allowed.stderr
        shown = run_as_gvtest("python3", "-m", "gestvenv", "ephemeral", "show", "nocap",
                              "--json")
        status = json.loads(shown.stdout)["enforcement"]["limits"]["max_disk"]
        assert status["enforced"] is False and "needs root" in status["mechanism"]
    finally:
        assert run_as_gvtest("python3", "-m", "gestvenv", "ephemeral", "cleanup",
                             "nocap").returncode == 0


@root_only
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_sandboxed_env_cannot_write_past_its_cap_anywhere(backend: str) -> None:
    """Hostile: code in a capped env at namespace isolation fills every place it might write
    to: its dir, /tmp, /var/tmp, its home, gestvenv's dirs. On disk they hold together no more
    than the cap (its temp dirs are in its own filesystem); the others are refused or private
    scratch of the command's (systemd 252 leaves ProtectHome's empty tmpfs writable: RAM,
    charged to the env's memory cgroup, gone with the command): nothing reaches the host."""
    async with gestvenv.ephemeral("hostile-disk", storage_backend=backend,
                                  isolation_level="namespace",
                                  resource_limits=ResourceLimits(max_disk=20)) as env:
        assert env.isolation.sandboxed
        home, root = str(Path.home()), str(env.path.parent)
        places = [str(env.path), "/tmp", "/var/tmp", home, "/var/cache", root, "/dev/shm"]
        result = await env.execute(["python", "-c", FILL, "40", *places], check=True,
                                   cwd=str(env.path))
        written = filled(result.stdout)
        # The first place took what the cap allows, the temp dirs then found it full.
        assert written[str(env.path)][1] == "ENOSPC" and written[str(env.path)][0] >= 15, written
        assert written["/tmp"] == (0, "ENOSPC") and written["/var/tmp"] == (0, "ENOSPC"), written
        # Its private /dev/shm (RAM) is capped at the same size.
        assert written["/dev/shm"][1] == "ENOSPC" and written["/dev/shm"][0] <= 20, written
        for place in (home, "/var/cache", root):
            assert fills_in(place) == [], (place, written[place])


SWAP_TEMP = """
import errno, os, sys
env = sys.argv[1]
for name in (".gestvenv-tmp", ".gestvenv-var-tmp"):
    path = os.path.join(env, name)
    for attempt in (lambda: os.rename(path, path + ".moved"), lambda: os.rmdir(path),
                    lambda: os.symlink("/etc", path)):
        try:
            attempt()
            print(name, "changed")
        except OSError as exc:
            print(name, errno.errorcode[exc.errno])
"""


@root_only
async def test_a_sandboxed_env_cannot_swap_its_temp_dirs_for_a_link() -> None:
    """Hostile: the dirs its sandbox binds over /tmp are followed as links; the env must not
    be able to move, remove or replace them (they stay its creator's, in its sticky top)."""
    async with gestvenv.ephemeral("swap-temp", isolation_level="namespace",
                                  resource_limits=ResourceLimits(max_disk=20)) as env:
        result = await env.execute(["python", "-c", SWAP_TEMP, str(env.path)], check=True)
        assert "changed" not in result.stdout, result.stdout
        assert set(result.stdout.split()) <= {".gestvenv-tmp", ".gestvenv-var-tmp", "EPERM",
                                               "EACCES", "EEXIST", "EBUSY"}, result.stdout
        # ... and its /tmp still is its own.
        probe = await env.execute(["sh", "-c", "touch /tmp/mine && ls /tmp"], check=True)
        assert "mine" in probe.stdout.split()


@root_only
def test_a_full_cap_is_said_with_the_venv_builder_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # pip's ENOSPC, met in the env's own filesystem, is said as uv's is.
    monkeypatch.setenv("GESTVENV_EPHEMERAL_BUILDER", "venv")
    before = leftovers()
    result = gv("ephemeral", "create", "vt", "-p", "gvbig", "--storage", "disk", "--disk", "2")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == [
        "gestvenv: error: environment 'vt' ran out of disk space while installing its "
        "packages: its max_disk of 2 MB is used up"], result.stderr
    assert leftovers() == before, leftover_summary(leftovers())
