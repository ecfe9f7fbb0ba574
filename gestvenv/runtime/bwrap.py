"""The local runtime's sandbox: bubblewrap's command line (a pure function) and its probe.

Without systemd, namespace isolation comes from unprivileged user namespaces through
bubblewrap (``bwrap``): each command runs in new user, PID, IPC, UTS, cgroup and mount
namespaces (and a network namespace with only ``lo`` when the env has no network), with no
capability, a read-only host, a fresh /proc, /dev, /tmp, /var/tmp and /dev/shm, no home
directories, no user bus, and none of gestvenv's storage but the env's own dir, bound
read-write at its own path. A root creator's commands are first dropped to the env's own
unprivileged uid by setpriv (``EnvRecord.sandbox_uid``), so that bwrap itself runs unprivileged.

Inside, a small init (:data:`INIT`, the env's interpreter with ``-I -S``) runs the command and
writes its wait status to a pipe: bwrap reports a death by signal N as exit status 128+N, which
would make ``-N`` and a real ``exit(128+N)`` look alike. The same init applies the rlimits just
before exec, so that neither bwrap nor the init count against them.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..models import IsolationLevel

SETPRIV = "/usr/bin/setpriv"
# Trees every sandboxed command gets empty (tmpfs) at namespace isolation: private temp dirs,
# homes (the user bus and the user manager's sockets live in /run/user), the system bus.
PRIVATE_TMP = ("/tmp", "/var/tmp")
HIDDEN = ("/home", "/root", "/run/user", "/run/dbus")
DEV = "/dev"  # replaced by bwrap's own (null, zero, random, tty...; a private /dev/shm)
PROBE_TIMEOUT = 10.0

# Runs inside the sandbox as ``python -I -S -B -c INIT STATUS_FD LIMITS PROGRAM ARGV...``. It
# ignores Ctrl-C itself (the command, in the same process group, takes it), forks the command
# with the signals Python changed put back to default, and reports through STATUS_FD either
# "E<errno>" (exec failed) or "S<returncode>" (the command's, -N for a signal). With STATUS_FD
# -1 (no channel: ``docker exec`` passes no fd) it says an exec failure on stderr instead
# (:data:`EXEC_FAILED`), and its own exit status is the report: 128+N for a signal N.
EXEC_FAILED = "gestvenv: cannot run "
INIT = """\
import ctypes, os, resource, signal, sys
fd = int(sys.argv[1])
if fd >= 0:
    os.set_inheritable(fd, False)
    # Not dumpable: the command, of the same uid, can neither ptrace this process nor take its
    # status fd (pidfd_getfd) to forge a report. (execve makes the command dumpable again.)
    ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
limits = [tuple(int(v) for v in x.split(':')) for x in sys.argv[2].split(',') if x]
program, argv = sys.argv[3], sys.argv[4:]
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGQUIT, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(s, signal.SIG_DFL)
    try:
        for which, value in limits:
            resource.setrlimit(which, (value, value))
    except (OSError, ValueError) as exc:
        os.write(2, f'gestvenv: cannot set resource limits: {exc}\\n'.encode())
        os._exit(126)
    try:
        os.execv(program, argv)
    except OSError as exc:
        if fd >= 0:
            os.write(fd, b'E%d' % exc.errno)
        else:
            message = f'gestvenv: cannot run {program}: [Errno {exc.errno}] {exc.strerror}'
            os.write(2, message.encode() + b'\\n')
    os._exit(127)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
if fd >= 0:
    os.write(fd, b'S%d' % code)
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class Sandbox:
    """One env's sandbox, as the local runtime applies it to each command."""

    level: IsolationLevel            # applied: PROCESS (a private network only) or NAMESPACE
    network: bool
    env_path: str                    # bound read-write at its own path
    hide: tuple[str, ...] = ()       # more trees to hide (the env's storage root, gestvenv's dirs)
    expose: tuple[str, ...] = ()     # paths under hidden trees the command needs: read-only
    uid: int | None = None           # run as this uid/gid (setpriv), for root creators
    root: bool = False               # the creator is root: bwrap runs as root, no user namespace
    # /tmp, /var/tmp -> a dir of the env's own filesystem to bind there instead of an empty
    # tmpfs (an env with max_disk: what it writes there counts against its cap).
    temp: tuple[tuple[str, str], ...] = ()
    shm_mb: int | None = None        # a size for its private /dev/shm (max_disk), else none

    @property
    def namespaced(self) -> bool:
        return self.level.sandboxed

    @property
    def wrapped(self) -> bool:
        """Whether commands run under bwrap at all."""
        return self.namespaced or not self.network

    def hidden_trees(self) -> list[str]:
        """Every tree replaced or emptied inside, outermost first, without duplicates."""
        if not self.namespaced:
            return []
        trees = [DEV, *PRIVATE_TMP, *HIDDEN]
        for path in sorted(self.hide, key=lambda p: len(os.path.normpath(p))):
            path = os.path.normpath(path)
            if not any(_under(path, t) for t in trees):
                trees.append(path)
        return trees

    def visible(self, path: str) -> bool:
        """Whether ``path`` (absolute, normalised) is the same file inside as outside."""
        path = os.path.normpath(path)
        if _under(path, self.env_path) or any(_under(path, e) for e in self.expose):
            return True
        return not any(_under(path, t) for t in self.hidden_trees())


def _between(tree: str, path: str) -> list[str]:
    """The directories strictly between ``tree`` and ``path`` (below it), outermost first."""
    out = []
    parent = os.path.dirname(path)
    while parent != tree and _under(parent, tree):
        out.append(parent)
        parent = os.path.dirname(parent)
    return out[::-1]


def _under(path: str, tree: str) -> bool:
    tree = os.path.normpath(tree)
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def bwrap_argv(sandbox: Sandbox, *, bwrap: str, python: str, status_fd: int,
               limits: Sequence[tuple[int, int]], argv: Sequence[str], cwd: str,
               new_session: bool, exists: Callable[[str], bool] = os.path.lexists) -> list[str]:
    """The full command line: bwrap OPTIONS -- [setpriv ...] python INIT ARGS argv.

    A non-root creator's bwrap runs unprivileged, in a user namespace of its own. A root
    creator's bwrap runs as root without one (its mounts must reach root-only dirs such as
    /root/.pyenv or /var/cache/gestvenv, which the env's uid cannot even traverse), then
    setpriv drops the command to the env's uid (``sandbox.uid``) with nothing left, or, without
    one, bwrap drops every capability (bounding set included). ``exists`` says which host
    paths exist: bwrap cannot mount over a missing path on a read-only root."""
    out = [bwrap, "--die-with-parent"]
    if new_session:
        out.append("--new-session")
    if not sandbox.namespaced:
        # Process isolation with no network: only a network namespace (a user namespace too for
        # a non-root creator: bwrap adds it), the host's file system as it is.
        out += ["--unshare-net", "--dev-bind", "/", "/"]
    else:
        if not sandbox.root:
            out.append("--unshare-user")
        out += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not sandbox.network:
            out.append("--unshare-net")
        if sandbox.uid is None:
            out += ["--cap-drop", "ALL"]
        out += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", DEV, "--perms", "1777"]
        if sandbox.shm_mb is not None:
            out += ["--size", str(sandbox.shm_mb << 20)]
        out += ["--tmpfs", "/dev/shm"]
        trees = sandbox.hidden_trees()
        temp = dict(sandbox.temp)
        for tree in trees:
            if tree == DEV or not exists(tree):
                continue
            if tree in temp:
                out += ["--bind", temp[tree], tree]
                continue
            if tree in PRIVATE_TMP:
                out += ["--perms", "1777"]
            out += ["--tmpfs", tree]
        made: set[str] = set()

        def mount(option: str, path: str) -> None:
            # The dirs leading to a mount point in a hidden tree: bwrap would make them 0700
            # (root's), which the command's uid could not traverse.
            tree = next((t for t in trees if _under(path, t) and path != t), None)
            if tree is not None:
                for parent in _between(tree, path):
                    if parent not in made:
                        made.add(parent)
                        out.extend(["--perms", "0755", "--dir", parent])
            out.extend([option, path, path])

        for path in dict.fromkeys(os.path.normpath(p) for p in sandbox.expose):
            hidden = any(_under(path, t) for t in trees)
            if hidden and not _under(path, sandbox.env_path) and exists(path):
                mount("--ro-bind", path)
        mount("--bind", sandbox.env_path)
    out += ["--chdir", cwd, "--"]
    if sandbox.namespaced and sandbox.uid is not None:
        out += setpriv_prefix(sandbox.uid)
    out += [python, "-I", "-S", "-B", "-c", INIT, str(status_fd),
            ",".join(f"{which}:{value}" for which, value in limits), argv[0], *argv]
    return out


def setpriv_prefix(uid: int) -> list[str]:
    """Run as ``uid`` (and gid ``uid``), no supplementary group, no capability of any kind."""
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=8)
def probe(namespaces: bool = True, user: bool = True) -> str | None:
    """None if bwrap runs here, else why not; once per process and question. ``user``: in a
    user namespace of its own (a non-root creator's way), else as root without one."""
    bwrap = find_bwrap()
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    argv = [bwrap, "--die-with-parent"]
    if namespaces:
        argv += ["--unshare-user"] if user else []
        argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
                 "--unshare-cgroup-try", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", DEV]
    else:
        argv += ["--unshare-net", "--dev-bind", "/", "/"]
    argv.append("true")
    if namespaces and not user and not os.access(SETPRIV, os.X_OK):
        return f"{SETPRIV} (util-linux) is missing: it drops root to the env's own uid"
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT, cwd="/", check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bwrap does not run: {exc}"
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        why = "user namespaces not allowed?" if user else "not allowed in this container?"
        return f"bwrap cannot create namespaces here ({why}): {detail[0]}"
    return None


def probe_for(creator_uid: int, namespaces: bool) -> str | None:
    """The probe for a creator's commands: root's bwrap needs no user namespace."""
    return probe(namespaces, user=creator_uid != 0)
