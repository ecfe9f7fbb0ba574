"""A hostile command: run inside an environment, it tries to get out, and reports each attempt.

Standard library only (it runs under the environment's interpreter). Usage::

    python hostile_probe.py '{"secret": "/root/x", "other_env": "/...", "host_pid": 123, ...}'

It prints one JSON object: attempt -> {"escaped": bool, "detail": str}. "escaped" means the
attempt did what it tried (read the file, wrote the host, signalled the process...). Every
attempt catches its own failure: a held attempt is an ordinary error (EPERM, EACCES, EROFS,
ENOENT) inside the command, and the probe exits 0 whatever happened.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

MARK = f"gv-escape-{uuid.uuid4().hex[:8]}"
results: dict[str, dict[str, Any]] = {}


def attempt(name: str) -> Callable[[Callable[[], str]], None]:
    """Run the decorated attempt now: it returns a detail when it escaped, raises when held."""
    def run(func: Callable[[], str]) -> None:
        try:
            detail = func()
            results[name] = {"escaped": True, "detail": detail}
        except Exception as exc:  # every failure is the sandbox holding
            code = getattr(exc, "errno", None)
            results[name] = {"escaped": False, "detail": f"{type(exc).__name__}: {exc}",
                             "errno": errno.errorcode.get(code, None) if code else None}
    return run


def held(why: str) -> None:
    raise PermissionError(why)


def libc(call: str, *args: object) -> None:
    """A libc call the standard library does not wrap; its errno raised as OSError."""
    lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if getattr(lib, call)(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def main(args: dict[str, Any]) -> None:
    @attempt("capabilities")
    def _caps() -> str:
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        caps = {k: int(status[k].strip(), 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")}
        if not any(caps.values()) and status["NoNewPrivs"].strip() == "1":
            held(f"no capability, NoNewPrivs (uid {os.getuid()})")
        return f"capabilities {caps}, NoNewPrivs {status['NoNewPrivs'].strip()}"

    @attempt("read /etc/shadow")
    def _shadow() -> str:
        with open("/etc/shadow") as f:
            return f"read {len(f.read())} bytes"

    @attempt("list /root")
    def _root() -> str:
        names = [n for n in os.listdir("/root") if n not in args.get("root_exposed", [])]
        if not names:
            held("nothing but what the env was given (a tmpfs over it)")
        return f"/root holds {names[:5]}"

    for path in args.get("secrets", []):
        @attempt(f"read {path}")
        def _secret(path: str = path) -> str:
            with open(path) as f:
                return f"read {f.read()!r}"

    for path in args.get("other_env_files", []):
        @attempt(f"read other env {path}")
        def _other(path: str = path) -> str:
            with open(path) as f:
                return f"read {f.read()!r}"

    for path in args.get("shared_dirs", []):
        @attempt(f"list shared {path}")
        def _shared(path: str = path) -> str:
            names = [n for n in os.listdir(path) if n not in args.get("own_names", [])]
            if not names:
                held("nothing but the env's own dir")
            return f"{path} holds {names[:5]}"

    for directory in ("/usr", "/usr/local", "/etc", "/var/lib", "/var/cache", "/run/lock",
                      "/run"):
        @attempt(f"write {directory}")
        def _write(directory: str = directory) -> str:
            path = os.path.join(directory, MARK)
            with open(path, "w") as f:
                f.write("escaped\n")
            return f"wrote {path}"

    @attempt("remount /usr read-write")
    def _remount() -> str:
        done = subprocess.run(["mount", "-o", "remount,rw", "/usr"], capture_output=True,
                              text=True)
        if done.returncode != 0:
            held(done.stderr.strip() or f"mount exited {done.returncode}")
        return "remounted"

    @attempt("mount(2) a tmpfs over /etc")
    def _mount() -> str:
        libc("mount", b"none", b"/etc", b"tmpfs", 0, None)
        return "mounted"

    @attempt("see the host's init as PID 1")
    def _init() -> str:
        with open("/proc/1/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")[0].decode(errors="replace")
        if os.path.basename(cmdline) not in ("systemd", "init") and "systemd" not in cmdline:
            held(f"PID 1 is {cmdline!r}, not the host's init")
        return f"PID 1 is {cmdline}"

    host_pid = args.get("host_pid")
    if host_pid:
        @attempt("see a host process")
        def _see() -> str:
            os.stat(f"/proc/{host_pid}")
            return f"/proc/{host_pid} is visible"

        @attempt("signal a host process")
        def _signal() -> str:
            os.kill(int(host_pid), 0)
            return f"may signal {host_pid}"

    @attempt("count processes")
    def _count() -> str:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        mine = {os.getpid(), os.getppid()}
        others = [p for p in pids if p not in mine and p > 1]
        if len(others) > args.get("max_own_processes", 3):
            return f"{len(pids)} processes visible"
        held(f"{len(pids)} processes visible")
        return ""

    @attempt("start a unit over the system bus")
    def _unit() -> str:
        unit = f"{MARK}.service"
        done = subprocess.run(["systemd-run", "--quiet", "--unit", unit, "/bin/true"],
                              capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            held(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "refused")
        return f"started {unit}"

    @attempt("start a unit over the user bus")
    def _user_unit() -> str:
        done = subprocess.run(["systemd-run", "--user", "--quiet", "--unit",
                               f"{MARK}-user.service", "/bin/true"],
                              capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            held(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "refused")
        return "started a user unit"

    @attempt("connect to the system bus socket")
    def _bus() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect("/run/dbus/system_bus_socket")
        return "connected"

    @attempt("set the hostname")
    def _hostname() -> str:
        libc("sethostname", b"gv-escaped", len(b"gv-escaped"))
        return "hostname set"

    @attempt("write a sysctl")
    def _sysctl() -> str:
        with open("/proc/sys/kernel/domainname", "w") as f:
            f.write("gv-escaped")
        return "wrote /proc/sys/kernel/domainname"

    @attempt("read the kernel log")
    def _dmesg() -> str:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
        return "opened /dev/kmsg"

    @attempt("write the host's /dev/shm")
    def _shm() -> str:
        path = f"/dev/shm/{MARK}"
        with open(path, "w") as f:
            f.write("escaped\n")
        host_shm = args.get("host_shm_probe")
        if host_shm and not os.path.exists(host_shm):
            held(f"wrote a private /dev/shm ({host_shm} of the host is not here)")
        return f"wrote {path}"

    port = args.get("tcp_port")
    if port:
        @attempt("connect to the host's loopback")
        def _tcp() -> str:
            with socket.create_connection(("127.0.0.1", int(port)), timeout=2):
                return f"connected to 127.0.0.1:{port}"

    for path in args.get("edit_files", []):
        @attempt(f"in-place edit {path}")
        def _edit(path: str = path) -> str:
            with open(path, "a") as f:
                f.write(f"\nGESTVENV_POISON = {MARK!r}\n")
            return "appended (to the env's own copy: checked from outside)"

    if args.get("ptrace_pid"):
        @attempt("ptrace a host process")
        def _ptrace() -> str:
            libc("ptrace", 16, int(args["ptrace_pid"]), None, None)  # PTRACE_ATTACH
            return "attached"

    print(json.dumps({"mark": MARK, "uid": os.getuid(), "results": results}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
