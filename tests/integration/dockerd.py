"""A Docker daemon of the tests' own (Debian's ``docker.io``), for container isolation with
``container_engine = "docker"``.

Started once per session where root finds ``dockerd``, with every root of its own in a temp dir
(data, exec root, socket, pid file), no network of its own (``--bridge=none``, no iptables: the
envs use ``--network none`` or the host's), runc; stopped by its PID at the end, with what it
wrote outside its dir removed. Nothing of a docker the machine may run is touched: the tests talk
to this daemon only (``DOCKER_HOST``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT = 20.0


def missing() -> str | None:
    """Why no daemon can be started here, or None."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        return "docker.io is not installed (dockerd)"
    return None


@contextlib.contextmanager
def daemon() -> Iterator[str]:
    """Start a private dockerd; yield its DOCKER_HOST; stop it and remove what it left."""
    root = Path(tempfile.mkdtemp(prefix="gv-dockerd-", dir="/var/tmp"))
    socket = root / "docker.sock"
    pidfile = root / "dockerd.pid"
    key = Path("/etc/docker/key.json")
    key_existed = key.exists()
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        ["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
         "-H", f"unix://{socket}", "--pidfile", str(pidfile), "--iptables=false",
         "--ip6tables=false", "--ip-forward=false", "--bridge=none", "--default-runtime", "runc",
         "--log-level", "warn"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    host = f"unix://{socket}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            done = subprocess.run(["docker", "-H", host, "version"], capture_output=True,
                                  check=False)
            if done.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dockerd did not start: "
                                   + (root / "dockerd.log").read_text()[-2000:])
            time.sleep(0.1)
        yield host
    finally:
        with contextlib.suppress(Exception):
            ids = subprocess.run(["docker", "-H", host, "ps", "-aq"], capture_output=True,
                                 text=True, timeout=30).stdout.split()
            if ids:
                subprocess.run(["docker", "-H", host, "rm", "--force", *ids],
                               capture_output=True, timeout=60)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
        if not key_existed:
            with contextlib.suppress(OSError):
                key.unlink()
                key.parent.rmdir()
        for leftover in Path("/sys/fs/cgroup").glob("*/docker"):
            with contextlib.suppress(OSError):
                leftover.rmdir()


def _unmount_under(root: Path) -> None:
    prefix = os.path.realpath(root) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
