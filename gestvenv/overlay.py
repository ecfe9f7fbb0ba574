"""A snapshot's site-packages shared with an env through an overlay mount, writes kept apart.

At process isolation an env's commands run under its creator's uid and can write its files, so
a clone of a package set's snapshot (templates.py) is a copy of every file: 3.7 MB and ~250 ms
for ``requests``, 166 MB and seconds for numpy + pandas on a filesystem without reflinks. For
a root creator an overlay gives the same write isolation without the copy: the snapshot's
site-packages is the read-only lower layer, a dir in the env's private dir the upper one, and
the merge is mounted on the env's site-packages. What the env writes (``pip install -U``, a
patched module) is copied up into its upper layer; the snapshot is never written through it.

The mount lives in the creator's mount namespace, which is where the env's commands run (its
children locally; PID 1's under systemd, hence :func:`chosen`'s same-namespace rule). It goes
with the env's dir: ``reaper.remove_tree`` unmounts what is mounted inside a dir before
deleting it, whoever removes it (destroy, the undo of a failed create, the reaper, a sweep).
A snapshot that is the lower layer of a live mount is never pruned (:func:`lowers_in_use`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .reaper import unescape_mountinfo

# In the env's private dir (templates.PRIVATE_DIR): one <n>/upper and <n>/work per overlay.
OVERLAY_DIR = "overlay"
_MS_NOSUID, _MS_NODEV = 2, 4
# What an overlay's mount options cannot carry without escaping (lowerdir takes ":" lists).
_UNSAFE = frozenset(",:\\\n\t ")


def chosen(*, euid: int, sandboxed: bool, link_mode: str, runtime: str,
           same_mount_ns: bool) -> bool:
    """Whether an env's snapshot clone shares site-packages through an overlay.

    Only at process isolation (``sandboxed`` envs run under a uid of their own and get
    read-only hardlinks instead, which cost no mount), only for root (mounting needs
    CAP_SYS_ADMIN in the initial namespaces), only with ``link_mode`` "auto" ("copy" asks for
    files of the env's own), and under systemd only when the creator shares PID 1's mount
    namespace (the env's commands run there, and must see the mount)."""
    return (euid == 0 and not sandboxed and link_mode == "auto"
            and (runtime != "systemd" or same_mount_ns))


def same_mount_ns_as_init() -> bool:
    try:
        return os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return False


def options(lower: str, upper: str, work: str) -> str | None:
    """The overlay's mount options; None when a path holds a character they cannot carry."""
    if any(set(p) & _UNSAFE for p in (lower, upper, work)):
        return None
    return f"lowerdir={lower},upperdir={upper},workdir={work}"


def site_packages(template: Path) -> list[str]:
    """The site-packages dirs of a snapshot, relative to it (lib/pythonX.Y/site-packages)."""
    found = []
    lib = template / "lib"
    try:
        names = sorted(os.listdir(lib))
    except OSError:
        return []
    for name in names:
        rel = f"lib/{name}/site-packages"
        if name.startswith("python") and os.path.isdir(template / rel) \
                and not os.path.islink(template / rel):
            found.append(rel)
    return found


def mount(lower: Path, env_path: Path, rel: str, private: Path, index: int) -> bool:
    """Mount ``lower`` (a snapshot's ``rel``) over the env's ``rel``, what the env already has
    there (its venv's own files) becoming the upper layer. False, with nothing changed, when it
    cannot be done (no overlay, another filesystem's refusal, a path the options cannot carry):
    the caller copies instead."""
    target = env_path / rel
    base = private / OVERLAY_DIR / str(index)
    upper, work = base / "upper", base / "work"
    opts = options(str(lower), str(upper), str(work))
    if opts is None or os.path.islink(target) or not target.is_dir():
        return False
    import ctypes  # (only here: a few ms, and only root at process isolation gets here)

    base.mkdir(parents=True, exist_ok=True)
    work.mkdir()
    os.rename(target, upper)  # (same filesystem: the env's dir; its baseline files stay)
    os.mkdir(target)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"overlay", str(target).encode(), b"overlay", _MS_NOSUID | _MS_NODEV,
                  opts.encode()) == 0:
        return True
    os.rmdir(target)
    os.rename(upper, target)
    os.rmdir(work)
    return False


def unmount(env_path: Path, rel: str, private: Path, index: int) -> None:
    """Undo :func:`mount`: the env's own files back where they were (a clone that failed
    after mounting, before the env was anyone's)."""
    import ctypes

    target = env_path / rel
    base = private / OVERLAY_DIR / str(index)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(str(target).encode(), 0) != 0:
        libc.umount2(str(target).encode(), 2)  # MNT_DETACH: busy; never deleted through
    os.rmdir(target)
    os.rename(base / "upper", target)
    for leftover in (base / "work" / "work", base / "work", base):
        with contextlib.suppress(OSError):
            os.rmdir(leftover)


def lowers_in_use(mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    """The lower dirs of the overlays mounted here (in this mount namespace)."""
    found: set[str] = set()
    try:
        with open(mountinfo) as f:
            lines = f.readlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if fields[sep + 1] != "overlay" or len(fields) < sep + 4:
            continue
        for opt in fields[sep + 3].split(","):
            if opt.startswith("lowerdir="):
                found.update(unescape_mountinfo(p) for p in opt[len("lowerdir="):].split(":"))
    return found


def in_use(snapshot: Path, lowers: set[str]) -> bool:
    """Whether ``snapshot`` (or a dir in it) is the lower layer of a live overlay."""
    prefix = str(snapshot).rstrip("/") + "/"
    return any(low == str(snapshot) or low.startswith(prefix) for low in lowers)
