"""The disk cap's pure decisions: whether max_disk is held here and by what, which filesystem
a "no space left" error is about, and how a tool's output says it (the mounts themselves are
tested for real in tests/integration/test_disk_limits.py and the systemd tier)."""

from __future__ import annotations

import errno

import pytest

from gestvenv import diskcap
from gestvenv.diskcap import Host, Space
from gestvenv.exceptions import BuildError, DiskFullError
from gestvenv.models import Enforcement, IsolationLevel, LimitStatus, StorageBackend

ROOT = Host(uid=0, loop=True, mkfs="/usr/sbin/mkfs.ext4")
BOXED = diskcap.Facts(sandboxed=True, memory_cgroup=True)
MB = 1 << 20


def test_no_cap_requested_nothing_reported() -> None:
    assert diskcap.status(None, StorageBackend.DISK, ROOT, BOXED) is None


@pytest.mark.parametrize("backend", list(StorageBackend))
def test_root_holds_the_cap_on_every_backend(backend: StorageBackend) -> None:
    status = diskcap.status(50, backend, ROOT, BOXED)
    assert status is not None and status.enforced and status.requested == 50
    assert ("ext4 image" if backend is StorageBackend.DISK else "tmpfs") in status.mechanism
    assert "ENOSPC" in status.mechanism


def test_the_mechanism_says_whether_the_image_is_preallocated() -> None:
    assert "pre-allocated" in diskcap.mechanism(StorageBackend.DISK, 50, BOXED)
    sparse = diskcap.mechanism(StorageBackend.DISK, 50, diskcap.Facts(True, True, False))
    assert "sparse: nothing reserved, a host disk that fills first makes its writes fail " \
        "with EIO" in sparse


def test_tmpfs_caps_say_whether_they_count_against_memory() -> None:
    assert "its pages also count against max_memory" in \
        diskcap.mechanism(StorageBackend.TMPFS, 5, BOXED)
    # Under RLIMIT_AS (the local runtime) files are not counted: said.
    assert "RAM, not counted in max_memory here" in \
        diskcap.mechanism(StorageBackend.TMPFS, 5, diskcap.Facts(True, memory_cgroup=False))


def test_the_mechanism_says_what_the_cap_covers_at_each_isolation() -> None:
    boxed = diskcap.mechanism(StorageBackend.DISK, 5, BOXED)
    assert "its /tmp and /var/tmp are in it too, its private /dev/shm is capped" in boxed
    # At process isolation the host is writable: said, not pretended.
    assert "can still write elsewhere (/tmp, their home), uncapped" in \
        diskcap.mechanism(StorageBackend.DISK, 5, diskcap.Facts(False, True))


@pytest.mark.parametrize(("backend", "free", "refused"), [
    (StorageBackend.DISK, 100 * MB, False), (StorageBackend.DISK, 49 * MB, True),
    (StorageBackend.TMPFS, 1 * MB, False), (StorageBackend.MEMORY, 0, False)])
def test_an_image_bigger_than_the_free_disk_is_refused_before_anything_exists(
        backend: StorageBackend, free: int, refused: bool) -> None:
    why = diskcap.too_big(50, backend, free, "/envs")
    assert (why is not None) is refused
    if refused:
        assert why == "max_disk=50 MB is more than the 49.0 MB free on the disk storage root's " \
            "filesystem (/envs)"
    assert diskcap.too_big(None, backend, 0, "/envs") is None


def test_a_capped_envs_temp_dirs_are_in_its_own_dir() -> None:
    assert diskcap.temp_dirs("/envs/x-1") == {"/tmp": "/envs/x-1/.gestvenv-tmp",
                                              "/var/tmp": "/envs/x-1/.gestvenv-var-tmp"}


@pytest.mark.parametrize("backend", list(StorageBackend))
def test_a_user_who_cannot_mount_is_told_why(backend: StorageBackend) -> None:
    status = diskcap.status(50, backend, Host(uid=4242, loop=True, mkfs="mkfs"), BOXED)
    assert status is not None and not status.enforced
    assert "needs root" in status.mechanism


@pytest.mark.parametrize(("host", "missing"), [
    (Host(uid=0, loop=False, mkfs="mkfs"), "loop devices"),
    (Host(uid=0, loop=True, mkfs=None), "mkfs.ext4"),
])
def test_disk_without_loop_devices_or_mkfs_is_not_held(host: Host, missing: str) -> None:
    status = diskcap.status(50, StorageBackend.DISK, host, BOXED)
    assert status is not None and not status.enforced
    assert missing in status.mechanism
    # ... but a tmpfs needs neither
    tmpfs = diskcap.status(50, StorageBackend.TMPFS, host, BOXED)
    assert tmpfs is not None and tmpfs.enforced


def test_the_status_joins_the_runtimes_limits() -> None:
    base = Enforcement("local", IsolationLevel.PROCESS, IsolationLevel.PROCESS,
                       limits={"max_memory": LimitStatus(64, True, "x")})
    status = LimitStatus(50, True, "y")
    merged = diskcap.with_status(base, status)
    assert merged.limits == {"max_memory": base.limits["max_memory"], "max_disk": status}
    assert diskcap.with_status(base, None) is base


@pytest.mark.parametrize(("exc", "full"), [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (BuildError("installing failed (exit 2)", "error: Failed to install: No space left on "
                "device (os error 28)"), True),
    (BuildError("installing failed (exit 2)", "OSError: [Errno 28] oops"), True),
    (BuildError("installing failed (exit 1)", "No matching distribution for nospace"), False),
    (ValueError("No space left on device"), False),
])
def test_what_counts_as_a_full_filesystem(exc: BaseException, full: bool) -> None:
    assert diskcap.is_full(exc) is full


def test_a_full_cap_is_named_with_its_size() -> None:
    err = diskcap.explain_full("x", "installing its packages", [
        Space("its max_disk of 2 MB", "/envs/x-1", 4096, own=True),
        Space("the disk storage root", "/", 10 * MB)])
    assert isinstance(err, DiskFullError)
    assert str(err) == ("environment 'x' ran out of disk space while installing its packages: "
                        "its max_disk of 2 MB is used up")


def test_a_full_shared_filesystem_is_named_even_with_a_cap() -> None:
    # The cap still has room: it was the package cache's filesystem that filled.
    err = diskcap.explain_full("x", "installing its packages", [
        Space("its max_disk of 50 MB", "/envs/x-1", 30 * MB, own=True),
        Space("the disk storage root", "/", 100 * MB),
        Space("the package cache", "/cache", 0)])
    assert "the package cache (/cache) is full (0.0 MB free)" in str(err)
    assert "max_disk" not in str(err)


def test_without_any_figure_the_error_still_names_the_env() -> None:
    assert "environment 'x'" in str(diskcap.explain_full("x", "writing its state", []))


def test_only_an_enforced_cap_moves_the_temp_dirs() -> None:
    def enforcement(enforced: bool | None) -> Enforcement:
        limits = {} if enforced is None else {"max_disk": LimitStatus(5, enforced, "x")}
        return Enforcement("local", IsolationLevel.NAMESPACE, IsolationLevel.NAMESPACE, limits)
    assert diskcap.capped_temp_dirs(enforcement(True), "/e") == diskcap.temp_dirs("/e")
    assert diskcap.capped_temp_dirs(enforcement(False), "/e") == {}
    assert diskcap.capped_temp_dirs(enforcement(None), "/e") == {}
