"""max_disk: a filesystem of the environment's own, ``max_disk`` MB, mounted on its dir.

- TMPFS and MEMORY: a tmpfs with ``size=max_disk`` (RAM; pages are charged to the memory
  cgroup of whoever writes them: what the env's commands write counts against its
  ``max_memory`` too, whichever is lower is met first).
- DISK: an ext4 image of exactly ``max_disk`` MB, loop-mounted. The image is a file in the
  env's own dir, *under* the mount: nothing inside the env can see or touch it, and everything
  that deletes an env dir (the reaper, a sweep, the timer at boot) already detaches mounts
  first and then deletes the dir, image included. The loop device is set up with
  LO_FLAGS_AUTOCLEAR: it goes by itself when the mount's last reference does (an unmount, the
  end of a mount namespace, a crash of the test host), and if its creator dies between
  attaching and mounting (its descriptor closes). ``preallocate`` (config) reserves the image's
  blocks at creation (fallocate: unwritten extents, no bytes written); without it, a sparse
  image still caps the size, but a host disk that fills first makes writes fail with EIO.

Why not project quotas (ext4/XFS ``prjquota``): they need the host filesystem formatted and
mounted with the quota feature, which gestvenv cannot assume nor change (this machine's root
ext4 has it off). The measured costs are in benchmarks/README.md: mkfs of a 50 MB image
~5 ms, attach + mount ~2 ms, unmount ~70 ms.

Either way mounting needs root: for other users the cap is refused (or, with
allow_unenforced, reported as not enforced) with that reason. The decisions are pure
functions (:func:`status`, :func:`explain_full`); the rest is the mount itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .exceptions import BuildError, DiskFullError, GestvenvError
from .models import Enforcement, LimitStatus, StorageBackend
from .reaper import CLAIM, mount_of

IMAGE = ".gestvenv-disk.img"  # DISK: the image, in the env's dir under its own mount
_SEED = ".gestvenv-seed"      # DISK: what mkfs copies into the new filesystem (the claim)
_MKFS_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
_MB = 1 << 20

# <linux/loop.h>
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_info64, then loop_config = {fd, block_size, info, reserved[8]}
_LOOP_INFO64 = "=QQQQQIIII64s64s32sQQ"
# <sys/mount.h>
_MS_NOSUID, _MS_NODEV = 2, 4


@dataclass(frozen=True)
class Host:
    """What this host offers for a filesystem of an env's own."""

    uid: int              # the creator's: only root (0) may mount
    loop: bool            # /dev/loop-control exists (DISK's image)
    mkfs: str | None      # mkfs.ext4


def probe() -> Host:
    return Host(uid=os.geteuid(), loop=os.path.exists("/dev/loop-control"),
                mkfs=shutil.which("mkfs.ext4", path=os.pathsep.join(_MKFS_DIRS)))


@dataclass(frozen=True)
class Facts:
    """What the rest of an env's plan says that the cap's description depends on."""

    sandboxed: bool                   # namespace isolation or above
    memory_cgroup: bool               # tmpfs pages count in its max_memory (systemd, enforced)
    preallocate: bool = True          # (config) the disk backend's image reserved at creation


def mechanism(backend: StorageBackend, max_disk: int, facts: Facts) -> str:
    """What holds ``max_disk`` on ``backend``, as ``show`` says it, and what it covers."""
    if backend is StorageBackend.DISK:
        how = "pre-allocated" if facts.preallocate else (
            "sparse: nothing reserved, a host disk that fills first makes its writes fail "
            "with EIO")
        what = f"an ext4 image of its own ({max_disk} MB, {how}) loop-mounted on its dir"
    else:
        ram = "its pages also count against max_memory" if facts.memory_cgroup else \
            "RAM, not counted in max_memory here"
        what = f"a tmpfs of its own (size={max_disk}M) mounted on its dir ({ram})"
    if facts.sandboxed:
        covers = ("its /tmp and /var/tmp are in it too, its private /dev/shm is capped at the "
                  "same size (RAM), the rest of the host is read-only: writing past it fails "
                  "with ENOSPC")
    else:
        covers = ("writing past it in its dir fails with ENOSPC; at process isolation its "
                  "commands can still write elsewhere (/tmp, their home), uncapped; TMPDIR "
                  "points into it")
    return f"{what}; {covers}"


# A capped env's /tmp and /var/tmp: dirs at the top of its own filesystem, made by its creator
# before any of its code runs. Its sandbox binds them over /tmp and /var/tmp, following
# links, so the env must never be able to replace them: they stay its creator's (the
# hand-over keeps them), in the env's sticky top dir (sandbox.hand_over), mode 1777.
TEMP_NAMES = {"/tmp": ".gestvenv-tmp", "/var/tmp": ".gestvenv-var-tmp"}


def temp_dirs(env_path: str) -> dict[str, str]:
    """Where a capped env's /tmp and /var/tmp are: in its own filesystem (bound there by its
    sandbox; TMPDIR at process isolation), so that they count against its cap."""
    return {tree: f"{env_path}/{name}" for tree, name in TEMP_NAMES.items()}


def cap_of(enforcement: Enforcement) -> int | None:
    """The env's max_disk in MB when a filesystem of its own holds it, else None."""
    status = enforcement.limits.get("max_disk")
    return int(status.requested) if status is not None and status.enforced else None


def capped_temp_dirs(enforcement: Enforcement, env_path: str) -> dict[str, str]:
    """The env's temp dirs to use instead of private empty ones: those of :func:`temp_dirs`
    when its cap is a filesystem of its own (max_disk enforced), else none."""
    return temp_dirs(env_path) if cap_of(enforcement) is not None else {}


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def too_big(max_disk: int | None, backend: StorageBackend, free: int, root: str) -> str | None:
    """Why an image of ``max_disk`` MB cannot be made on the disk root with ``free`` bytes
    left, or None. Checked before anything exists: pre-allocated, it would fill the host's
    disk on its way to failing; sparse, the host's disk would fill before the cap."""
    if max_disk is None or backend is not StorageBackend.DISK or max_disk * _MB <= free:
        return None
    return (f"max_disk={max_disk} MB is more than the {free / _MB:.1f} MB free on the disk storage "
            f"root's filesystem ({root})")


def status(max_disk: int | None, backend: StorageBackend, host: Host,
           facts: Facts) -> LimitStatus | None:
    """Whether ``max_disk`` can be held for an env on ``backend`` here, and by what."""
    if max_disk is None:
        return None
    if host.uid != 0:
        return LimitStatus(max_disk, False,
                           "needs a filesystem of the env's own, and mounting one needs root "
                           f"(uid {host.uid} cannot mount; neither can a user manager)")
    if backend is StorageBackend.DISK:
        missing = [what for what, ok in (("loop devices (/dev/loop-control)", host.loop),
                                         ("mkfs.ext4 (e2fsprogs)", host.mkfs)) if not ok]
        if missing:
            return LimitStatus(max_disk, False,
                               f"the disk backend's cap is a loop-mounted ext4 image and this "
                               f"host has no {' nor '.join(missing)}; the tmpfs and memory "
                               "backends can hold it")
    return LimitStatus(max_disk, True, mechanism(backend, max_disk, facts))


def with_status(enforcement: Enforcement, disk: LimitStatus | None) -> Enforcement:
    """``enforcement`` with the disk cap's status among its limits."""
    if disk is None:
        return enforcement
    return replace(enforcement, limits={**enforcement.limits, "max_disk": disk})


# --- making it -------------------------------------------------------------------------------

def make(path: Path, backend: StorageBackend, max_disk: int, preallocate: bool) -> None:
    """Mount a filesystem of ``max_disk`` MB on ``path`` (the env's claimed, empty dir), owned
    and moded as ``path`` is. The claim goes on top by the caller (DISK's is in it already)."""
    st = path.stat()
    if backend is StorageBackend.DISK:
        _make_image(path, max_disk, preallocate, st.st_uid, st.st_gid)
        device = _attach(path / IMAGE)
        try:
            _mount(device.path, path, "ext4", "noinit_itable")
        finally:
            device.close()  # the mount holds it now (autoclear: it goes with the mount)
        with contextlib.suppress(OSError):
            (path / "lost+found").rmdir()
    else:
        _mount("tmpfs", path, "tmpfs",
               f"size={max_disk}m,mode={st.st_mode & 0o7777:o},uid={st.st_uid},gid={st.st_gid}")
    os.chmod(path, st.st_mode & 0o7777)
    for tmp in temp_dirs(str(path)).values():
        os.mkdir(tmp, 0o700)
        os.chmod(tmp, 0o1777)  # (as /tmp: anyone may create, nobody may remove another's)


def _make_image(path: Path, max_disk: int, preallocate: bool, uid: int, gid: int) -> None:
    mkfs = probe().mkfs
    if mkfs is None:
        raise GestvenvError("cannot cap the disk: mkfs.ext4 (e2fsprogs) is not installed")
    image = path / IMAGE
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, max_disk * _MB)
        _mkfs(mkfs, path, image, uid, gid)
        if preallocate:
            # After mkfs, which zeroes ranges by punching holes where the filesystem under the
            # image cannot zero in place (tmpfs): every block is reserved, mkfs's kept.
            os.posix_fallocate(fd, 0, max_disk * _MB)
    finally:
        os.close(fd)


def _mkfs(mkfs: str, path: Path, image: Path, uid: int, gid: int) -> None:
    # The claim is in the new filesystem from the start: an env whose creator dies right after
    # the mount is still recognisably gestvenv's (sweeps go by claims).
    seed = path / _SEED
    seed.mkdir(mode=0o700)
    (seed / CLAIM).write_bytes((path / CLAIM).read_bytes())
    os.chown(seed / CLAIM, uid, gid)
    # No journal (an env does not outlive a crash), no reserved blocks (the cap is the env's),
    # inodes for small files (a venv is thousands), no discard (nothing to give back in a
    # new image).
    result = subprocess.run(
        [mkfs, "-q", "-F", "-b", "4096", "-i", "8192", "-m", "0", "-L", "gestvenv",
         "-O", "^has_journal,^resize_inode",
         "-E", f"nodiscard,lazy_itable_init=1,root_owner={uid}:{gid}", "-d", str(seed),
         str(image)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
        raise _os_error(result.stderr, f"mkfs.ext4 failed on {image}: {tail[0]}")


def _os_error(output: str, message: str) -> Exception:
    if "No space left" in output:
        return OSError(errno.ENOSPC, message)
    return GestvenvError(message)


@dataclass
class _Loop:
    path: str
    fd: int

    def close(self) -> None:
        os.close(self.fd)


def _attach(image: Path) -> _Loop:
    """A free loop device backed by ``image``, with autoclear (LOOP_CONFIGURE, Linux 5.8)."""
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        for _ in range(20):  # another process may take the free device between the two calls
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
            finally:
                os.close(ctl)
            device = f"/dev/loop{number}"
            try:
                fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise GestvenvError(
                    f"cannot cap the disk: the kernel gave loop device {number} but {device} "
                    "does not exist (a container without loop device nodes?)") from None
            info = struct.pack(_LOOP_INFO64, 0, 0, 0, 0, 0, 0, 0, 0, _LO_FLAGS_AUTOCLEAR,
                               b"", b"", b"", 0, 0)
            config = struct.pack("=II", backing, 0) + info + bytes(64)
            try:
                fcntl.ioctl(fd, _LOOP_CONFIGURE, config)
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY:
                    time.sleep(0.001)
                    continue
                raise GestvenvError(f"cannot cap the disk: attaching {image} to {device}: "
                                    f"{exc.strerror}") from None
            return _Loop(device, fd)
        raise GestvenvError("cannot cap the disk: no free loop device (20 tries)")
    finally:
        os.close(backing)


def _mount(source: str, target: Path, fstype: str, options: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    if libc.mount(source.encode(), os.fsencode(target), fstype.encode(),
                  _MS_NOSUID | _MS_NODEV, options.encode()) != 0:
        err = ctypes.get_errno()
        raise GestvenvError(f"cannot cap the disk: mounting {fstype} on {target}: "
                            f"{os.strerror(err)}")


# --- reading it ------------------------------------------------------------------------------

def own_filesystem(path: Path) -> bool:
    """``path`` is the mount point of a filesystem of its own (an env with max_disk)."""
    return os.path.ismount(path)


# --- when it is full -------------------------------------------------------------------------

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How uv, pip and Python say it in their output (an install run as a process of its own).
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (?:28|122)\b"
                        r"|\[Errno (?:28|122)\]")


def is_full(exc: BaseException) -> bool:
    """An error that says a filesystem was full (ENOSPC, EDQUOT), ours or a tool's."""
    if isinstance(exc, OSError):
        return exc.errno in FULL_ERRNOS
    if isinstance(exc, BuildError):
        return bool(_FULL_TEXT.search(f"{exc.args[0] if exc.args else ''}\n{exc.output}"))
    return False


def used_up(path: Path) -> bool:
    """``path`` is a filesystem of its own with (nearly) no room left: what a tool that
    swallowed its ENOSPC (``python -m venv`` running ensurepip) failed on."""
    if not own_filesystem(path):
        return False
    st = os.statvfs(path)
    return free_bytes(path) < _MB or st.f_bavail < st.f_blocks // 50


@dataclass(frozen=True)
class Space:
    """A filesystem gestvenv wrote to, as seen when something was full."""

    label: str      # "its max_disk of 2 MB", "the storage root /x", ...
    path: str
    free: int       # bytes available
    own: bool = False  # the env's own capped filesystem


def explain_full(name: str, stage: str, spaces: list[Space]) -> DiskFullError:
    """The one line for a full disk: the env, what it was doing, and which space was full
    (the one with the least room; the env's own cap first when it is nearly full)."""
    own = [s for s in spaces if s.own]
    if own and own[0].free < _MB:
        full = own[0]
    elif spaces:
        full = min(spaces, key=lambda s: s.free)
    else:
        return DiskFullError(f"environment {name!r}: no space left on device while {stage}")
    if full.own:
        return DiskFullError(f"environment {name!r} ran out of disk space while {stage}: "
                             f"{full.label} is used up")
    return DiskFullError(f"environment {name!r}: no space left on device while {stage}: "
                         f"{full.label} ({full.path}) is full ({full.free / _MB:.1f} MB free)")


def spaces(env_path: Path, max_disk: int | None, others: dict[str, Path]) -> list[Space]:
    """The filesystems an env's creation writes to, with their free space now: its own (when
    it has a cap and it is mounted) and ``others`` (label -> a path on it), one per device."""
    out = []
    seen: set[int] = set()
    if max_disk is not None and own_filesystem(env_path):
        out.append(Space(f"its max_disk of {max_disk} MB", str(env_path),
                         free_bytes(env_path), own=True))
        seen.add(os.stat(env_path).st_dev)
    for label, path in others.items():
        try:
            dev = os.stat(path).st_dev
            free = free_bytes(path)
        except OSError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        out.append(Space(label, _mount_point(str(path)), free))
    return out


def _mount_point(path: str) -> str:
    """The mount point a path is on (named in the error: "the filesystem of /x is full")."""
    try:
        return mount_of(path)[0] or "/"
    except OSError:
        return "/"

