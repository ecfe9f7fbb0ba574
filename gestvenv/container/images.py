"""The images an env's container runs: a base made of the host interpreter's own files, and
one layer per package set on top of it.

**Base** (``localhost/gestvenv-python:3.11-<key>``): not a distribution, but the interpreter
gestvenv builds venvs with, at its own absolute path: its executable (and the symlinks from the
path it was named by), its stdlib (without test/, idlelib, tkinter, turtledemo, ensurepip, the
build config and anything in site-packages; with its own .pyc files), lib-dynload, every shared
library ``ldd`` lists for them, the libraries any manylinux wheel may use unbundled
(libstdc++...), the dynamic loader and its cache, /bin/sh, the CA bundle and OpenSSL's config,
and a skeleton (/tmp, /etc/passwd...). The host's /bin, /lib, /lib64 and /sbin are reproduced
as they are (symlinks on a usrmerged host). Written as one tar (read where the files are, no
staging copy) and ``podman import``-ed (``docker import`` takes the same options), it needs
nothing but the host: no registry, no Debian mirror, no network at all; and the interpreter
inside is the very one an env's venv was made for, so the venv's ``pyvenv.cfg`` ``home``
resolves in the container as on the host. A distribution base made with mmdebstrap would need
the mirror at run time, take minutes, and hold a different Python. Measured on this host
(podman 4.3.1, overlay, runc, under load from other work): Debian's /usr/bin/python3 2.0-2.2 s
and 53 MB; pyenv's 3.11.7 (its unstripped libpython is 23 MB) 1.9-3.4 s and 79 MB; a call that
finds the image, 0.03 s.

**Packages** (``localhost/gestvenv-env:<template key>``): the package set's snapshot (see
:mod:`gestvenv.templates`) as a venv at :data:`VENV`, its scripts pointing at
:data:`VENV_PYTHON`, added over the base with ``podman build`` (a generated Containerfile that
ADDs one tar, ``--pull=never``, no network, no intermediate images): 0.3-0.4 s for a small set,
2.4-4.9 s for numpy (73 MB). Back to back on the same tar, build took 0.27 s and 2.2-2.9 s,
create + cp + commit (the alternative: four engine commands) 0.30 s and 3.4-4.1 s. Reused when
it exists: one ``image exists``, 0.03 s.

Every image carries :data:`~.engine.LABEL_IMAGE` ("base" or "packages") and
:data:`~.engine.LABEL_KEY`; a package image also :data:`LABEL_BASE`, its base's key.
:func:`list_images` and :func:`prune` select by those labels only, and remove by id, never with
``--force``: an image a container uses is refused by the engine, and kept; a base is kept while
a package image built on it is (by its label: podman would remove a parent image).

Everything here is synchronous (callers use :func:`asyncio.to_thread`) and raises
:class:`~.engine.EngineError`, one line, on failure.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .. import overlay, templates
from ..diskcap import TEMP_NAMES
from .engine import LABEL_IMAGE, LABEL_KEY, Engine, EngineError, last_line

VENV = "/opt/gestvenv/venv"
VENV_PYTHON = f"{VENV}/bin/python"
PATH = "/usr/local/bin:/usr/bin:/bin"
BASE_REPO = "localhost/gestvenv-python"
PACKAGES_REPO = "localhost/gestvenv-env"
# On package images: the key of the base they were built on (prune keeps that base).
LABEL_BASE = "io.gestvenv.base"
# On a package image: the snapshots dir of the config that made it (a sweep prunes only its
# own config's images: another config's snapshots are not in its list of live keys).
LABEL_SNAPSHOTS = "io.gestvenv.snapshots"
# Part of the base key: bump it when what goes into a base changes, so old images are not
# reused for the new layout.
_LAYOUT = 2
BUILD_TIMEOUT = 600.0
# Stdlib dirs no env's command needs (tests, GUIs, the pip bootstrapper) and the build config
# (a static libpython among it); site-packages/dist-packages are the host's installs.
STDLIB_SKIP_DIRS = frozenset({"test", "idlelib", "tkinter", "turtledemo", "ensurepip",
                              "site-packages", "dist-packages"})
# What a manylinux wheel may link against without bundling it (auditwheel's policy, minus
# the X11/GL/GLib ones: an env's commands have no display), plus libz.
MANYLINUX_LIBS = ("libgcc_s.so.1", "libstdc++.so.6", "libm.so.6", "libdl.so.2", "librt.so.1",
                  "libc.so.6", "libnsl.so.1", "libutil.so.1", "libpthread.so.0",
                  "libresolv.so.2", "libz.so.1")
# The host's top-level layout, reproduced (usrmerge: symlinks into /usr).
TOP_LEVEL = ("/bin", "/lib", "/lib64", "/sbin")
SHELL = "/bin/sh"
# Host files worth having as they are, when present: the CA bundle (also for programs that do
# not ask Python's ssl where it is), the dynamic loader's cache (libraries in
# the host's ld.so.conf dirs are found inside too; an entry for a library left out just fails
# over to the default dirs) and the C.UTF-8 locale (LANG=C.UTF-8 works for every program).
HOST_EXTRAS = ("/etc/ssl/certs/ca-certificates.crt", "/etc/ld.so.cache", "/usr/lib/locale/C.utf8")
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
GROUP = "root:x:0:\nnogroup:x:65534:\n"
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"

# What ensure_base asks the interpreter (-I -S: nothing of the user's or the site's).
_QUERY = r"""
import json, os, sys, sysconfig
paths = sysconfig.get_paths()
dynload = [p for p in sys.path if os.path.basename(p) == "lib-dynload"]
ssl_files = []
try:
    import ssl
    found = ssl.get_default_verify_paths()
    ssl_files = [found.cafile, found.openssl_cafile]
    if found.openssl_cafile:
        ssl_files.append(os.path.join(os.path.dirname(found.openssl_cafile), "openssl.cnf"))
except Exception:
    pass
print(json.dumps({
    "executable": os.path.realpath(sys.executable),
    "version": sys.version.split()[0],
    "base_prefix": sys.base_prefix,
    "in_venv": sys.prefix != sys.base_prefix,
    "stdlib": paths["stdlib"],
    "platstdlib": paths["platstdlib"],
    "dynload": dynload[0] if dynload else sysconfig.get_config_var("DESTSHARED") or "",
    "cache_tag": sys.implementation.cache_tag or "",
    "bits64": sys.maxsize > 2**32,
    "ssl_files": [f for f in ssl_files if f],
}))
"""


# --- the interpreter ----------------------------------------------------------------------

@dataclass(frozen=True)
class Facts:
    """What an interpreter says about itself (:data:`_QUERY`)."""

    given: str                  # the path it was named by (absolute, maybe a symlink)
    executable: str             # its real path
    version: str                # "3.11.7"
    base_prefix: str
    stdlib: str
    platstdlib: str
    dynload: str
    cache_tag: str              # "cpython-311": its own .pyc files are kept
    bits64: bool
    ssl_files: tuple[str, ...]  # CA bundle(s), OpenSSL's config

    @property
    def short_version(self) -> str:
        return ".".join(self.version.split(".")[:2])


def parse_facts(given: str, text: str) -> Facts:
    """The interpreter's answer to :data:`_QUERY` (pure)."""
    data = json.loads(text)
    if data["in_venv"]:
        raise EngineError(f"{given} is a virtual environment's python, not a base interpreter")
    return Facts(given=given, executable=data["executable"], version=data["version"],
                 base_prefix=data["base_prefix"], stdlib=data["stdlib"],
                 platstdlib=data["platstdlib"], dynload=data["dynload"],
                 cache_tag=data["cache_tag"], bits64=bool(data["bits64"]),
                 ssl_files=tuple(data["ssl_files"]))


def interpreter_facts(interpreter: str) -> Facts:
    """Ask ``interpreter`` about itself (cached while its binary is unchanged)."""
    given = _absolute(interpreter)
    try:
        st = os.stat(given)
    except OSError as exc:
        raise EngineError(f"python {interpreter}: {exc.strerror}") from None
    return _facts(given, st.st_size, st.st_mtime_ns)


def _absolute(interpreter: str) -> str:
    if os.sep not in interpreter:
        found = shutil.which(interpreter)
        if found is None:
            raise EngineError(f"python {interpreter}: not found on PATH")
        interpreter = found
    return os.path.abspath(interpreter)


@functools.lru_cache(maxsize=16)
def _facts(given: str, size: int, mtime_ns: int) -> Facts:
    try:
        done = subprocess.run([given, "-I", "-S", "-c", _QUERY], capture_output=True,
                              timeout=60, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(f"python {given} does not run: {exc}") from None
    if done.returncode != 0:
        raise EngineError(f"python {given} does not run: {last_line(done.stderr)}")
    try:
        return parse_facts(given, done.stdout.decode(errors="replace"))
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"python {given} gave no usable answer about itself: {exc}") from None


def key_of(facts: Facts, stats: Mapping[str, tuple[int, int] | None]) -> str:
    """The base's key (pure): the interpreter's identity, with ``stats`` (size, mtime_ns) of
    its binary and its stdlib dir, so that an upgrade in place makes a new base."""
    data = [_LAYOUT, facts.given, facts.executable, facts.version,
            stats.get(facts.executable), stats.get(facts.stdlib)]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def _size_mtime(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _key(facts: Facts) -> str:
    return key_of(facts, {p: _size_mtime(p) for p in (facts.executable, facts.stdlib)})


def base_key(interpreter: str) -> str:
    """A short hex key for ``interpreter``'s identity (path, version, binary, stdlib)."""
    return _key(interpreter_facts(interpreter))


def ref_for(facts: Facts, key: str) -> str:
    return f"{BASE_REPO}:{facts.short_version}-{key[:12]}"


def base_ref(interpreter: str) -> str:
    """``localhost/gestvenv-python:3.11-<key12>``: the base image for ``interpreter``."""
    facts = interpreter_facts(interpreter)
    return ref_for(facts, _key(facts))


# --- what goes into a base (pure) ----------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One path of the image: a dir, a host file, a symlink, or a file written from data."""

    kind: str                    # "dir", "file", "link", "data"
    mode: int = 0o755
    source: str = ""             # file: the host file
    target: str = ""             # link: what it points to, as on the host
    data: bytes = b""            # data: its content


def resolution(path: str, readlink: Callable[[str], str | None]) -> list[tuple[str, str]]:
    """How ``path`` resolves (pure, given ``readlink``: a link's target, None for anything
    else): each symlink met on the way, as (its path, its target), then (the real path, "").

    Recreating those links and the real file makes the same path resolve the same way in the
    image: /usr/bin/python3 -> python3.11, /lib -> usr/lib (usrmerge) for ldd's paths.
    """
    steps: list[tuple[str, str]] = []
    todo = [c for c in reversed(path.split("/")) if c]
    done = "/"
    hops = 0
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            done = posixpath.dirname(done)  # done is resolved: its parent is real
            continue
        candidate = posixpath.join(done, part)
        target = readlink(candidate)
        if target is None:
            done = candidate
            continue
        hops += 1
        if hops > 40:
            raise EngineError(f"{path}: too many levels of symbolic links")
        steps.append((candidate, target))
        if target.startswith("/"):
            done = "/"
        todo.extend(c for c in reversed(target.split("/")) if c)
    steps.append((done, ""))
    return steps


def stdlib_skip(rel: str, is_dir: bool, cache_tag: str) -> bool:
    """True for what a stdlib copy leaves out (pure); ``rel`` is relative to the stdlib dir.

    Left out: test suites, GUIs and the pip bootstrapper, the build config (a static libpython
    among it), the host's installs (site-packages stays, empty), and .pyc files of other
    interpreters or optimization levels (the interpreter's own are kept: the image is read-only
    in a container, where a missing .pyc would be compiled again on every start).
    """
    parts = rel.split("/")
    name = parts[-1]
    top = parts[0]
    if top in ("site-packages", "dist-packages"):
        return len(parts) > 1
    if top in STDLIB_SKIP_DIRS or top.startswith("config-"):
        return True
    if is_dir:
        return name in ("test", "tests", "idle_test")
    if name.startswith("_tkinter."):
        return True
    if len(parts) > 1 and parts[-2] == "__pycache__":
        return not cache_tag or not name.endswith(f".{cache_tag}.pyc")
    return False


def tree_roots(facts: Facts) -> list[str]:
    """The dirs a base copies whole (minus :func:`stdlib_skip`), each once (pure)."""
    roots: list[str] = []
    for path in (facts.stdlib, facts.platstdlib, facts.dynload):
        if path and not any(path == r or path.startswith(r + "/") for r in roots):
            roots.append(path)
    return roots


def single_paths(facts: Facts) -> list[str]:
    """The files a base copies one by one, before the libraries ldd names (pure)."""
    paths = [facts.given, facts.executable, SHELL, *facts.ssl_files, *HOST_EXTRAS]
    return list(dict.fromkeys(paths))


def libpython_pattern(facts: Facts) -> str:
    """A prefix's own libpython (pyenv, python-build-standalone): ldd finds the one the
    executable links; the stable-ABI libpython3.so beside it goes too (pure)."""
    return posixpath.join(facts.base_prefix, "lib", "libpython*.so*")


def parse_ldd(text: str) -> list[str]:
    """The absolute paths of the libraries (and the loader) in ``ldd``'s output (pure).

    Headers (one per file when several are given) are not indented and are left out; so are
    "not found" (a module that cannot load on the host either) and the vDSO.
    """
    found: list[str] = []
    for raw in text.splitlines():
        if not raw[:1].isspace():
            continue
        line = raw.strip()
        if "=>" in line:
            line = line.partition("=>")[2].strip()
        path = line.split(" (", 1)[0].strip()
        if path.startswith("/") and path not in found:
            found.append(path)
    return found


def wheel_baseline(libs: Sequence[str]) -> list[str]:
    """Where the libraries every manylinux wheel may link without bundling would be, in the
    dirs the interpreter's own libraries come from (pure): numpy needs libstdc++ and
    libgcc_s, which no stdlib module loads. The caller keeps those present on the host."""
    dirs = list(dict.fromkeys(posixpath.dirname(lib) for lib in libs))
    return [posixpath.join(d, name) for name in MANYLINUX_LIBS for d in dirs]


def top_level(links: Mapping[str, str | None]) -> list[tuple[str, Entry]]:
    """The host's /bin, /lib, /lib64, /sbin as they are (pure): ``links`` holds each one
    present on the host, with its symlink target (usrmerge) or None (a real dir)."""
    out: list[tuple[str, Entry]] = []
    for path, target in links.items():
        if target is None:
            out.append((path, Entry("dir")))
        else:
            out.append((path, Entry("link", target=target)))
            out.append((posixpath.normpath(posixpath.join("/", target)), Entry("dir")))
    return out


def skeleton() -> list[tuple[str, Entry]]:
    """What every base has besides the interpreter's files (pure): mount points, temp dirs,
    root's home and the minimal /etc that programs expect (users, groups, name services)."""
    dirs = {"/tmp": 0o1777, "/var": 0o755, "/var/tmp": 0o1777, "/dev": 0o755, "/proc": 0o555,
            "/sys": 0o555, "/run": 0o755, "/root": 0o700, "/etc": 0o755, "/usr": 0o755,
            "/usr/local": 0o755, "/usr/local/bin": 0o755}
    files = {"/etc/passwd": PASSWD, "/etc/group": GROUP, "/etc/nsswitch.conf": NSSWITCH}
    return [*((p, Entry("dir", mode=m)) for p, m in dirs.items()),
            *((p, Entry("data", mode=0o644, data=t.encode())) for p, t in files.items())]


def file_mode(mode: int) -> int:
    """A host file's mode in an image (pure): readable by all, executable by all if by its
    owner (a container's commands may run as any uid); never setuid, setgid or sticky."""
    perm = stat.S_IMODE(mode) & 0o777 | 0o444
    return perm | 0o111 if perm & 0o111 else perm


def dir_mode(mode: int) -> int:
    """A host dir's mode in an image (pure): traversable by all (/root, on the way to a
    pyenv interpreter, is 0700 on the host)."""
    return stat.S_IMODE(mode) & 0o777 | 0o555


def import_changes(key: str, interpreter: str) -> list[str]:
    """``import --change`` arguments for a base (pure)."""
    changes = [f"LABEL {LABEL_IMAGE}=base", f"LABEL {LABEL_KEY}={key}", f"ENV PATH={PATH}",
               f"CMD {json.dumps([interpreter])}"]
    return [arg for change in changes for arg in ("--change", change)]


# --- collecting and writing a base ---------------------------------------------------------

def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # not a link, or absent
        return None


class _Collector:
    """The entries of a base, by absolute path: the first entry of a path wins (the layout
    and the resolutions agree with the host, so a later one could only repeat it)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.shared: list[str] = []      # .so files met in trees: their libraries go too
        self._walked: set[str] = set()

    def put(self, path: str, entry: Entry) -> None:
        if path in self.entries:
            return
        parent = posixpath.dirname(path)
        if parent != path and parent != "/" and parent not in self.entries:
            self.put(parent, self._host_dir(parent))
        self.entries[path] = entry

    def _host_dir(self, path: str) -> Entry:
        try:
            st = os.lstat(path)
        except OSError:
            return Entry("dir")
        return Entry("dir", mode=dir_mode(st.st_mode) if stat.S_ISDIR(st.st_mode) else 0o755)

    def add_path(self, path: str, skip: Callable[[str, bool], bool] | None = None, *,
                 trees: bool = True) -> None:
        """``path`` as it resolves: its links, then the real file (or dir, walked, if
        ``trees``); nothing if it is absent on this host."""
        steps = resolution(path, _readlink)
        real = steps[-1][0]
        try:
            st = os.lstat(real)
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode) and not trees:
            return
        for link, target in steps[:-1]:
            self.put(link, Entry("link", target=target))
        if stat.S_ISDIR(st.st_mode):
            self._walk(real, skip)
        elif stat.S_ISREG(st.st_mode):
            self._file(real, st)

    def _file(self, path: str, st: os.stat_result) -> None:
        self.put(path, Entry("file", mode=file_mode(st.st_mode), source=path))
        name = posixpath.basename(path)
        if name.endswith(".so") or ".so." in name:
            self.shared.append(path)

    def _walk(self, root: str, skip: Callable[[str, bool], bool] | None) -> None:
        if root in self._walked:
            return
        self._walked.add(root)
        self.put(root, self._host_dir(root))
        stack = [root]
        while stack:
            current = stack.pop()
            with os.scandir(current) as it:
                children = sorted(it, key=lambda e: e.name)
            for child in children:
                rel = posixpath.relpath(child.path, root)
                is_dir = child.is_dir(follow_symlinks=False)
                if skip is not None and skip(rel, is_dir):
                    continue
                if child.is_symlink():
                    self.put(child.path, Entry("link", target=os.readlink(child.path)))
                    # What it points to goes too, if a file (a dir would pull in a tree).
                    target = posixpath.join(current, os.readlink(child.path))
                    self.add_path(target, trees=False)
                elif is_dir:
                    self.put(child.path, self._host_dir(child.path))
                    stack.append(child.path)
                elif child.is_file(follow_symlinks=False):
                    self._file(child.path, child.stat(follow_symlinks=False))


def ldd(paths: Sequence[str]) -> list[str]:
    """The libraries (and the loader) these executables and modules load, transitively."""
    try:
        done = subprocess.run(["ldd", *paths], capture_output=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(f"ldd does not run: {exc}") from None
    # Non-zero also when one module is not dynamic: its output is still right for the rest.
    return parse_ldd(done.stdout.decode(errors="replace"))


def collect_base(facts: Facts) -> dict[str, Entry]:
    """Every entry of the base for ``facts``'s interpreter, read from this host."""
    c = _Collector()
    for path, entry in top_level({p: _readlink(p) for p in TOP_LEVEL if os.path.lexists(p)}):
        c.put(path, entry)
    for root in tree_roots(facts):
        c.add_path(root, functools.partial(_skip, cache_tag=facts.cache_tag))
    for path in [*single_paths(facts), *sorted(glob.glob(libpython_pattern(facts)))]:
        c.add_path(path)
    libs = ldd([facts.executable, os.path.realpath(SHELL), *c.shared])
    baseline = [path for path in wheel_baseline(libs) if os.path.exists(path)]
    # (ldd lists what a library loads, not the library itself.)
    for lib in [*libs, *baseline, *ldd(baseline)] if baseline else libs:
        c.add_path(lib)
    for path, entry in skeleton():
        c.put(path, entry)
    return c.entries


def _skip(rel: str, is_dir: bool, *, cache_tag: str) -> bool:
    return stdlib_skip(rel, is_dir, cache_tag)


def _path_key(path: str) -> list[str]:
    return path.split("/")  # parents before their children


def write_tar(entries: Mapping[str, Entry], out: io.BufferedIOBase) -> int:
    """``entries`` as an uncompressed tar, all owned by root; the bytes of file data written.
    Files keep their mtimes: the stdlib's .pyc files record their source's."""
    now = int(time.time())
    total = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries, key=_path_key):
            entry = entries[path]
            info = tarfile.TarInfo(path.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = entry.mode
            info.mtime = now
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "link":
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target
                tar.addfile(info)
            elif entry.kind == "data":
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
                total += info.size
            else:
                total += _add_file(tar, info, entry.source)
    return total


def _add_file(tar: tarfile.TarFile, info: tarfile.TarInfo, source: str) -> int:
    with open(source, "rb", opener=_nofollow) as f:
        st = os.fstat(f.fileno())
        info.size = st.st_size
        info.mtime = int(st.st_mtime)  # floored, as a .pyc records it
        tar.addfile(info, f)
    return info.size


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


# --- base images ---------------------------------------------------------------------------

def image_exists(engine: Engine, ref: str) -> bool:
    """Whether the engine has image ``ref`` (locally: nothing is pulled)."""
    if engine.name == "podman":
        done = engine.run("image", "exists", ref, check=False, timeout=60.0)
        if done.returncode not in (0, 1):
            raise EngineError(f"podman image exists failed: {last_line(done.stderr)}")
        return done.returncode == 0
    done = engine.run("image", "inspect", "--format", "{{.Id}}", ref, check=False, timeout=60.0)
    return done.returncode == 0


def ensure_base(engine: Engine, interpreter: str) -> str:
    """The base image for ``interpreter``, built from its own files if it is missing.

    Concurrent callers may both build it; the second to finish sees the first's and imports
    nothing (were both to import, the tag would move to the later, identical, image and
    :func:`prune` would remove the untagged one).
    """
    facts = interpreter_facts(interpreter)
    key = _key(facts)
    ref = ref_for(facts, key)
    if image_exists(engine, ref):
        return ref
    with tempfile.TemporaryDirectory(prefix="gestvenv-base-") as tmp:
        tar_path = os.path.join(tmp, "base.tar")
        try:
            entries = collect_base(facts)
            with open(tar_path, "wb") as out:
                write_tar(entries, out)
        except OSError as exc:
            raise EngineError(f"base image for {facts.given}: {exc}") from None
        if image_exists(engine, ref):
            return ref
        engine.run("import", *import_changes(key, facts.given), tar_path, ref,
                   timeout=BUILD_TIMEOUT)
    return ref


# --- package images ------------------------------------------------------------------------

def packages_ref(template_key: str) -> str:
    return f"{PACKAGES_REPO}:{template_key}"


def find_packages(engine: Engine, key: str) -> str | None:
    """The package image for snapshot ``key``, if the engine has it."""
    ref = packages_ref(key)
    return ref if image_exists(engine, ref) else None


def pyvenv_cfg(facts: Facts) -> str:
    """The image venv's pyvenv.cfg (pure): what builder.write_venv writes, for :data:`VENV`."""
    return (f"home = {posixpath.dirname(facts.executable)}\n"
            "include-system-site-packages = false\n"
            f"version = {facts.version}\n"
            f"executable = {facts.executable}\n"
            f"command = gestvenv (venv written for an image) {VENV}\n")


def containerfile(base: str, key: str, base_key: str, snapshots: str = "") -> str:
    """The package layer's Containerfile (pure): the venv, activated, and its labels.

    ADD of a tar (unpacked as it is), not COPY of a dir: buildah's COPY rounds mtimes to the
    nearest second, and a .pyc records its source's mtime floored; half of them would be
    stale, compiled again on every start in a read-only container.
    """
    return (f"FROM {base}\n"
            f"ADD venv.tar {posixpath.dirname(VENV)}/\n"
            f"ENV VIRTUAL_ENV={VENV} PATH={VENV}/bin:{PATH}\n"
            f"LABEL {LABEL_IMAGE}=packages {LABEL_KEY}={key} {LABEL_BASE}={base_key}"
            + (f" {LABEL_SNAPSHOTS}={json.dumps(snapshots)}" if snapshots else "") + "\n"
            f"CMD {json.dumps([VENV_PYTHON])}\n")


def build_args(engine_name: str, ref: str, context: str) -> list[str]:
    """``build`` arguments for the package layer (pure): never pull (no registry is asked,
    the base is local), no network, and (podman) one commit, no intermediate images left."""
    args = ["build", "--network", "none", "--tag", ref,
            "--file", posixpath.join(context, "Containerfile")]
    if engine_name == "podman":
        args += ["--pull=never", "--layers=false"]
    else:
        args += ["--pull=false"]
    return [*args, context]


# What a snapshot holds besides the venv's files: its completion mark, and (never stored, but
# pruned as TemplateCache.clone does) an env's private and temp dirs.
_SNAPSHOT_MARK = templates.COMPLETE_MARK
_SNAPSHOT_PRUNE = frozenset({templates.PRIVATE_DIR, overlay.LEASES, *TEMP_NAMES.values()})


def venv_skeleton(facts: Facts) -> dict[str, Entry]:
    """The venv of :data:`VENV` before the snapshot's files, as tar entries under ``venv/``
    (pure): what builder.write_venv makes, ``bin/python`` linking to the interpreter at its
    path in the base."""
    site = f"venv/lib/python{facts.short_version}/site-packages"
    out = {path: Entry("dir") for path in ("venv", "venv/bin", "venv/lib",
                                           posixpath.dirname(site), site)}
    if facts.bits64:
        out["venv/lib64"] = Entry("link", target="lib")
    out["venv/pyvenv.cfg"] = Entry("data", mode=0o644, data=pyvenv_cfg(facts).encode())
    for name in ("python", "python3", f"python{facts.short_version}"):
        out[f"venv/bin/{name}"] = Entry("link", target=facts.executable)
    return out


def snapshot_entry(rel: str, path: str, st: os.stat_result, *, target: str = "",
                   script: bytes = b"") -> Entry | None:
    """One file of a snapshot as a tar entry of the venv (pure, given its stat, a link's
    ``target`` and a script's content, if in bin/): scripts re-headed for :data:`VENV_PYTHON`, as
    TemplateCache.clone does for an env's own path; None for what is neither a dir, a link nor
    a regular file."""
    if stat.S_ISDIR(st.st_mode):
        return Entry("dir", mode=dir_mode(st.st_mode))
    if stat.S_ISLNK(st.st_mode):
        return Entry("link", target=target)
    if not stat.S_ISREG(st.st_mode):
        return None
    if script:
        data = templates.retarget(script, templates.PLACEHOLDER, VENV_PYTHON.encode())
        if data is not None:
            return Entry("data", mode=file_mode(st.st_mode), data=data)
    return Entry("file", mode=file_mode(st.st_mode), source=path)


def venv_entries(facts: Facts, template: Path) -> dict[str, Entry]:
    """The image's venv: :func:`venv_skeleton`, then the snapshot ``template``'s files read
    where they are (no staging copy)."""
    out = venv_skeleton(facts)
    for rel, path, _ in templates.walk(template, prune=_SNAPSHOT_PRUNE):
        if rel == _SNAPSHOT_MARK:
            continue
        st = os.lstat(path)
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        script = b""
        if rel.startswith("bin/") and stat.S_ISREG(st.st_mode) and _is_script(path):
            script = Path(path).read_bytes()
        entry = snapshot_entry(rel, path, st, target=target, script=script)
        if entry is not None:
            out.setdefault(f"venv/{rel}", entry)
    return out


def _is_script(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"#!"


def _labels(item: Mapping[str, object]) -> dict[str, str]:
    config = item.get("Config")
    labels = config.get("Labels") if isinstance(config, dict) else None
    if not labels:
        labels = item.get("Labels")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _image_labels(engine: Engine, ref: str) -> dict[str, str] | None:
    """The labels of image ``ref``; None if the engine has no such image."""
    done = engine.run("image", "inspect", ref, check=False, timeout=60.0)
    if done.returncode != 0:
        return None
    items = json.loads(done.stdout.decode() or "[]")
    return _labels(items[0]) if isinstance(items, list) and items else {}


def _inspect(engine: Engine, refs: Sequence[str]) -> list[dict[str, object]]:
    done = engine.run("image", "inspect", *refs, timeout=60.0)
    data = json.loads(done.stdout.decode() or "[]")
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def ensure_packages(engine: Engine, base: str, key: str, template: Path,
                    interpreter: str) -> str:
    """The package image for snapshot ``key`` (the dir ``template``), built over ``base``
    (made for ``interpreter``) if it is missing; concurrent callers: see ensure_base."""
    ref = packages_ref(key)
    if image_exists(engine, ref):
        return ref
    if not template.is_dir():
        raise EngineError(f"package image {key}: no snapshot at {template}")
    labels = _image_labels(engine, base)
    if labels is None:
        raise EngineError(f"package image {key}: base image {base} is missing")
    facts = interpreter_facts(interpreter)
    with tempfile.TemporaryDirectory(prefix="gestvenv-packages-") as tmp:
        try:
            # (Read whole: an image of a snapshot being pruned would be partial, and kept.)
            with templates.reading(template), open(os.path.join(tmp, "venv.tar"), "wb") as out:
                write_tar(venv_entries(facts, template), out)
            Path(tmp, "Containerfile").write_text(
                containerfile(base, key, labels.get(LABEL_KEY, ""), str(template.parent)))
        except OSError as exc:
            raise EngineError(f"package image {key}: {exc}") from None
        if image_exists(engine, ref):
            return ref
        engine.run(*build_args(engine.name, ref, tmp), timeout=BUILD_TIMEOUT)
    return ref


# --- listing, pruning, moving --------------------------------------------------------------

@dataclass(frozen=True)
class ImageInfo:
    ref: str             # "" for an image whose tag went to a newer twin
    id: str
    kind: str            # "base" or "packages"
    key: str
    size_bytes: int
    created: float       # seconds since the epoch
    base: str = ""       # a package image's base's key
    snapshots: str = ""  # a package image's snapshots dir (LABEL_SNAPSHOTS)


def parse_time(text: str) -> float:
    """An engine's RFC 3339 time (nanoseconds and all) as seconds since the epoch (pure)."""
    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", text.strip())
    if match is None:
        return 0.0
    whole, fraction, zone = match.groups()
    micros = (fraction or ".0")[:7]
    try:
        moment = datetime.fromisoformat(whole + micros + ("+00:00" if zone in (None, "Z")
                                                          else zone))
    except ValueError:
        return 0.0
    return moment.timestamp()


def image_info(item: Mapping[str, object]) -> ImageInfo | None:
    """One ``image inspect`` record as an ImageInfo (pure); None if not gestvenv's."""
    labels = _labels(item)
    kind = labels.get(LABEL_IMAGE)
    if kind is None:
        return None
    tags = item.get("RepoTags")
    ref = str(tags[0]) if isinstance(tags, list) and tags else ""
    if not ref.startswith((f"{BASE_REPO}:", f"{PACKAGES_REPO}:")):
        # Not one of gestvenv's names: an image someone built FROM one of ours inherits its
        # labels, and is theirs (an untagged one too: nobody's to judge).
        return None
    size = item.get("Size")
    created = item.get("Created")
    return ImageInfo(ref=ref, id=str(item.get("Id") or "").removeprefix("sha256:"),
                     kind=kind, key=labels.get(LABEL_KEY, ""),
                     size_bytes=size if isinstance(size, int) else 0,
                     created=parse_time(created) if isinstance(created, str) else 0.0,
                     base=labels.get(LABEL_BASE, ""),
                     snapshots=labels.get(LABEL_SNAPSHOTS, ""))


def list_images(engine: Engine) -> list[ImageInfo]:
    """gestvenv's images (those with :data:`~.engine.LABEL_IMAGE`), bases first."""
    done = engine.run("images", "--quiet", "--no-trunc", "--filter", f"label={LABEL_IMAGE}",
                      timeout=60.0)
    ids = list(dict.fromkeys(done.stdout.decode().split()))
    if not ids:
        return []
    # (``image inspect`` rather than ``images --format json``: docker's list has no labels.)
    try:
        items = _inspect(engine, ids)
    except EngineError:  # one removed meanwhile: the others one by one
        items = [i for one in ids for i in _inspect_or_none(engine, one)]
    infos = [info for item in items if (info := image_info(item)) is not None]
    return sorted(infos, key=lambda i: (i.kind != "base", i.ref, i.id))


def _inspect_or_none(engine: Engine, ref: str) -> list[dict[str, object]]:
    try:
        return _inspect(engine, [ref])
    except EngineError:
        return []


def doomed_packages(images: Iterable[ImageInfo], keep_keys: set[str], *,
                    everything: bool, snapshots: str | None = None) -> list[ImageInfo]:
    """The package images a prune removes (pure): those of snapshots gone, untagged ones
    (superseded by a twin), or all with ``everything``; with ``snapshots``, only those of
    that snapshots dir (``keep_keys`` are its live keys)."""
    return [i for i in images if i.kind == "packages"
            and (snapshots is None or i.snapshots == snapshots)
            and (everything or not i.ref or i.key not in keep_keys)]


def doomed_bases(images: Iterable[ImageInfo]) -> list[ImageInfo]:
    """The base images a prune removes (pure), given the images left once the package images
    went: those no package image left is built on, and untagged ones (superseded by a twin).
    (Podman removes a parent image whose child stays, so the label decides, not the engine.)"""
    images = list(images)
    used = {i.base for i in images if i.kind == "packages"}
    return [i for i in images if i.kind == "base" and (not i.ref or i.key not in used)]


def prune(engine: Engine, keep_keys: set[str], *, everything: bool = False,
          bases: bool = True, snapshots: str | None = None) -> list[str]:
    """Remove the package images of snapshots not in ``keep_keys`` (all, with
    ``everything``; only ``snapshots``' own, with it), then (``bases``) the bases no package
    image left uses. An image a container uses is refused by the engine and kept (with its
    base); an image without gestvenv's label is never looked at. Returns what went (refs, or
    ids for untagged images)."""
    removed = _remove(engine, doomed_packages(list_images(engine), keep_keys,
                                              everything=everything, snapshots=snapshots))
    if bases:
        removed += _remove(engine, doomed_bases(list_images(engine)))
    return removed


def _remove(engine: Engine, images: Iterable[ImageInfo]) -> list[str]:
    removed = []
    for image in images:
        # By id and never forced: an image in use, or with several tags, is refused.
        if engine.run("rmi", image.id, check=False, timeout=120.0).returncode == 0:
            removed.append(image.ref or image.id)
    return removed


def save(engine: Engine, ref: str, dest: Path) -> None:
    """``ref`` into the archive ``dest`` (the engine's default format: ``load`` reads it),
    replacing it whole (podman refuses to write over an archive)."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        engine.run("save", "-o", str(tmp), ref, timeout=BUILD_TIMEOUT)
        os.replace(tmp, dest)
    except OSError as exc:
        raise EngineError(f"save {ref} to {dest}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def parse_loaded(text: str) -> list[str]:
    """The refs (or ids) ``load`` reports (pure): podman's "Loaded image: a" or "Loaded
    image(s): a,b", docker's "Loaded image: a" or "Loaded image ID: sha256:...". """
    refs: list[str] = []
    for line in text.splitlines():
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().startswith("Loaded image"):
            continue
        for ref in rest.split(","):
            ref = ref.strip()
            if ref and ref not in refs:
                refs.append(ref)
    return refs


def archive_refs(src: Path) -> list[str]:
    """The names a docker-archive (what ``save`` writes) gives its images."""
    try:
        with tarfile.open(src) as tar:
            member = tar.extractfile("manifest.json")
            manifest = json.loads(member.read()) if member is not None else None
    except (OSError, KeyError, ValueError, tarfile.TarError) as exc:
        raise EngineError(f"{src} is not an image archive that `images save` writes: "
                          f"{exc}") from None
    if not isinstance(manifest, list):
        raise EngineError(f"{src}: its manifest.json is not a list of images")
    return [str(tag) for entry in manifest if isinstance(entry, dict)
            for tag in entry.get("RepoTags") or []]


def load(engine: Engine, src: Path) -> list[str]:
    """Load the archive ``src``; the refs it held. An archive that would name a base image
    is refused: every env of that interpreter would run it (a package-set image is never run
    by gestvenv, only taken elsewhere)."""
    bases = [ref for ref in archive_refs(src)
             if ref.removeprefix("docker.io/").startswith(f"{BASE_REPO}:")]
    if bases:
        raise EngineError(f"{src} would replace gestvenv's base image {bases[0]}, which every "
                          "env of its interpreter runs: refused (base images are made here, "
                          "from the interpreter's own files)")
    done = engine.run("load", "-i", str(src), timeout=BUILD_TIMEOUT)
    return parse_loaded(done.stdout.decode(errors="replace") + "\n"
                        + done.stderr.decode(errors="replace"))
