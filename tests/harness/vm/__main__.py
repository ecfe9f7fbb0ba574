"""Driver of the VM test tier: ``python -m tests.harness.vm run [options] -- CMD...``.

One run:
  1. host tools (apt-get, only the missing ones);
  2. the image (build-image.sh; cached under BASE/image-<hash of the script and knobs>,
     built under a lock so parallel runs build it once);
  3. qemu started (TCG) as OUR child, in its own session (a terminal's Ctrl-C reaches the
     driver only, which then tears down in order) and with PR_SET_PDEATHSIG=SIGKILL, so it
     dies with the driver even if the driver is SIGKILLed;
  4. while the guest boots (~25 s of TCG): wheels for the guest's Python (pip download, pip
     wheel of the checkout), a copy of tests/ + pyproject.toml and the uv binary are put in the
     9p share;
  5. setup job in the guest (root): copy the tree to /home/tester/gestvenv, create
     /home/tester/venv as tester and install gestvenv + pytest offline from the wheels;
  6. CMD as tester in /home/tester/gestvenv with the venv on PATH, output streamed;
  7. always (finally, also on Ctrl-C, SIGTERM, SIGHUP): SIGTERM then SIGKILL to exactly that
     qemu (our unreaped child: its PID cannot have been reused), then the run dir is removed.

Jobs go through the 9p share: BASE/run-*/share/jobs/<id>.sh in, <id>.out/.err (streamed while
they grow) and <id>.rc back; gv-runner.service in the guest (see build-image.sh) runs them.

Exit status: CMD's, else 124 (timeout), 125 (the harness failed: tools, image, boot, setup),
128+N (interrupted by signal N).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import hashlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
BUILD_SCRIPT = HERE / "build-image.sh"
BASE = Path(os.environ.get("GESTVENV_VM_BASE", "/var/tmp/gestvenv-vm"))  # NOT /tmp: ~1 GB

# Debian packages the host needs: qemu to boot; the rest to build the image. (The initramfs
# takes its static busybox from the guest's own packages, so busybox-static is not needed here.)
HOST_PACKAGES = ["qemu-system-x86", "debootstrap", "cpio", "e2fsprogs", "zstd", "xz-utils"]
# Build knobs of build-image.sh that change the image: part of the cache key.
BUILD_KNOBS = ["SUITE", "MIRROR", "SIZE", "EXTRA_PKGS"]

# Runtime deps come from pyproject's [project] dependencies; of the `test` extra only what is
# needed to RUN pytest (not ruff/mypy/types-*).
TEST_EXTRA_NEEDED = {"pytest"}

GUEST_SHARE = "/mnt/host"
GUEST_HOME = "/home/tester"
GUEST_TREE = f"{GUEST_HOME}/gestvenv"
GUEST_VENV = f"{GUEST_HOME}/venv"
GUEST_USER_ENV = {
    "HOME": GUEST_HOME,
    "USER": "tester",
    "LOGNAME": "tester",
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
    # What a login session of a lingering user has: the manager's runtime dir and user bus.
    "XDG_RUNTIME_DIR": "/run/user/1000",
    "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus",
}
# CMD runs with the venv "activated", so `python -m pytest ...` is the venv's.
CMD_ENV = GUEST_USER_ENV | {
    "PATH": f"{GUEST_VENV}/bin:/usr/local/bin:/usr/bin:/bin",
    "VIRTUAL_ENV": GUEST_VENV,
}
SETUP_ENV = GUEST_USER_ENV | {"PATH": "/usr/local/bin:/usr/bin:/bin"}

# TCG: on the CI machine /dev/kvm is backed by PVM (no VMX/SVM): stock Debian kernels crawl or
# die with "KVM internal error ... emulation failure" there. TCG boots in 20-30 s.
# mitigations=off: no speculative-execution workarounds to emulate.
KERNEL_CMDLINE = "console=ttyS0 root=/dev/vda rw panic=-1 loglevel=4 mitigations=off"

EXIT_TIMEOUT = 124
EXIT_HARNESS = 125


class HarnessError(Exception):
    """The tier itself failed (not CMD)."""


class JobTimeout(Exception):
    pass


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, raised like KeyboardInterrupt so that `finally` tears down."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def log(msg: str) -> None:
    print(f"[vm] {msg}", file=sys.stderr, flush=True)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = time.monotonic() - start

    def summary(self) -> str:
        parts = [f"{k}={v:.1f}s" for k, v in self.phases.items()]
        return " ".join([*parts, f"total={time.monotonic() - self.t0:.1f}s"])


# ---------------------------------------------------------------------------------- host tools


def ensure_host_tools() -> None:
    missing = []
    for pkg in HOST_PACKAGES:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                                capture_output=True, text=True).stdout
        if status != "install ok installed":
            missing.append(pkg)
    if not missing:
        return
    if os.geteuid() != 0:
        raise HarnessError(f"missing host packages {missing}; install them or run as root")
    log(f"installing host packages: {' '.join(missing)}")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        rc, out = run_group(argv, env=env)
        if rc != 0:
            raise HarnessError(f"{' '.join(argv)} failed:\n{out}")


def run_group(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ARGV in its own process group; returns (status, stdout+stderr).

    When the driver is interrupted, the whole group gets SIGTERM and a minute to finish: dpkg
    must not be cut mid-way, and build-image.sh's EXIT trap unmounts proc/sys in the target
    before it removes its work dir. (subprocess.run would SIGKILL the direct child alone.)
    """
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate()
    except BaseException:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a 2nd ^C: don't cut this
            signal.signal(sig, signal.SIG_IGN)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace")


# --------------------------------------------------------------------------------------- image


def image_dir() -> Path:
    """BASE/image-<key>: the key hashes build-image.sh and its knobs, so any change rebuilds."""
    h = hashlib.sha256(BUILD_SCRIPT.read_bytes())
    for knob in BUILD_KNOBS:
        h.update(f"\0{knob}={os.environ.get(knob, '')}".encode())
    return BASE / f"image-{h.hexdigest()[:16]}"


def image_complete(img: Path) -> bool:
    return all((img / f).is_file() for f in ("rootfs.raw", "vmlinuz", "initrd.img", "build-info"))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "w") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield


def ensure_image(rebuild: bool = False) -> Path:
    img = image_dir()
    if image_complete(img) and not rebuild:
        return img
    BASE.mkdir(parents=True, exist_ok=True)
    with locked(BASE / "build.lock"):
        if image_complete(img) and not rebuild:  # built by a parallel run meanwhile
            return img
        if os.geteuid() != 0:
            raise HarnessError("building the image needs root (debootstrap, chroot)")
        tmp = img.with_name(img.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"building the guest image in {img} (~1.5 min)")
        try:
            rc, out = run_group(["bash", str(BUILD_SCRIPT), str(tmp)])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if rc != 0 or not image_complete(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            raise HarnessError(f"build-image.sh failed ({rc}):\n{out[-4000:]}")
        shutil.rmtree(img, ignore_errors=True)
        tmp.rename(img)
        # Older images (other keys) are garbage now. Deleting is safe even while another run
        # boots from one: qemu keeps its open files.
        for old in BASE.glob("image-*"):
            if old != img:
                shutil.rmtree(old, ignore_errors=True)
        for line in out.splitlines()[-2:]:
            log(f"image: {line}")
    return img


def guest_python_version(img: Path) -> str:
    """'3.13' from build-info's `dpkg-query -W python3` line ('python3\t3.13.5-1')."""
    m = re.search(r"^python3\t(\d+)\.(\d+)", (img / "build-info").read_text(), re.M)
    if not m:
        raise HarnessError(f"no python3 version in {img / 'build-info'}")
    return f"{m[1]}.{m[2]}"


# ----------------------------------------------------------------------------- project to 9p


def requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = project.get("optional-dependencies", {}).get("test", [])
    needed = [r for r in extra if re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0] in TEST_EXTRA_NEEDED]
    return [*project["dependencies"], *needed]


def pip(*args: str) -> None:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} failed:\n{proc.stdout}{proc.stderr}")


def prepare_share(share: Path, scratch: Path, pyver: str) -> None:
    """Wheels for the guest's Python + the test tree + the uv binary, into the 9p share."""
    wheels = share / "wheels"
    wheels.mkdir()
    # Binary wheels only, for the guest's interpreter (not the host's): pure-Python wheels
    # match any target; psutil has abi3 manylinux wheels and uv a manylinux2014 one.
    pip("download", "--only-binary=:all:", "--implementation", "cp", "--python-version", pyver,
        "--platform", "manylinux2014_x86_64", "-d", str(wheels), *requirements())
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = scratch / "gestvenv-src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    shutil.copytree(REPO / "gestvenv", src / "gestvenv", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    pip("wheel", "--no-deps", "-w", str(wheels), str(src))
    # Tests run from a copy of tests/ (imported as the package `tests`) beside pyproject.toml
    # (the pytest config), against the INSTALLED gestvenv: no gestvenv/ in the tree.
    shutil.copytree(REPO / "tests", share / "src" / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
    shutil.copy2(REPO / "pyproject.toml", share / "src" / "pyproject.toml")
    # uv's binary out of its wheel, to fill the guest's venv (see SETUP_UV).
    uv_wheel = next(wheels.glob("uv-*.whl"))
    with zipfile.ZipFile(uv_wheel) as zf:
        member = next(n for n in zf.namelist() if re.fullmatch(r"uv-[^/]+\.data/scripts/uv", n))
        (share / "bin").mkdir()
        (share / "bin" / "uv").write_bytes(zf.read(member))
    (share / "bin" / "uv").chmod(0o755)


def env_args(env: dict[str, str]) -> str:
    return " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())


# The guest's venv: created by tester, filled offline from the wheels in the share. Measured
# under TCG (cold, same guest, 3 rounds): `python -m venv --without-pip` + uv from the share
# 15-27 s; copying the wheels to the guest's disk first, or `uv venv`, no faster (the time is
# TCG CPU, not 9p); `python -m venv` (ensurepip) + pip ~60 s.
SETUP_COMMON = f"""\
set -euo pipefail
S={GUEST_SHARE}
as_tester() {{ runuser -u tester -- env -i {env_args(SETUP_ENV)} "$@"; }}
step() {{  # step LABEL CMD...: run CMD, print how long it took
  local label=$1 t=${{EPOCHREALTIME/./}}; shift; "$@"
  local us=$(( ${{EPOCHREALTIME/./}} - t ))
  printf '  %-22s %d.%01ds\\n' "$label" $((us/1000000)) $((us/100000%10))
}}
rm -rf --one-file-system {GUEST_TREE} {GUEST_VENV}
step "copy tests/ tree" cp -r "$S/src" {GUEST_TREE}
chown -R tester:tester {GUEST_TREE}
cd {GUEST_TREE}   # not /root: tester can't read it (uv looks for uv.toml in the cwd)
# The lingering user's manager is started by logind at boot; wait until it is up.
step "user manager up" as_tester systemctl --user is-system-running --wait || true
cg=/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service
echo "delegated to user@1000: $(cat $cg/cgroup.controllers)"
failed=$(systemctl --failed --no-legend --plain | awk '{{print $1}}' | tr '\\n' ' ')
[ -z "$failed" ] || echo "WARNING: failed units in the guest: $failed"
"""
SETUP_UV = SETUP_COMMON + f"""\
step "venv (no pip)" as_tester /usr/bin/python3 -m venv --without-pip {GUEST_VENV}
step "install (uv)" as_tester "$S/bin/uv" pip install --quiet --offline --no-index \\
  --find-links "$S/wheels" --python {GUEST_VENV}/bin/python gestvenv pytest
"""
SETUP_PIP = SETUP_COMMON + f"""\
step "venv (python -m venv)" as_tester /usr/bin/python3 -m venv {GUEST_VENV}
step "install (pip)" as_tester {GUEST_VENV}/bin/pip install --quiet --disable-pip-version-check \\
  --no-index --find-links "$S/wheels" gestvenv pytest
"""


# --------------------------------------------------------------------------------------- guest


def _die_with(parent: int) -> Callable[[], None]:
    def setup() -> None:
        """In the qemu child before exec: SIGKILL when the driver dies, however it dies."""
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the driver died before prctl
            os._exit(1)

    return setup


class Guest:
    def __init__(self, img: Path, run: Path, mem: int, smp: int) -> None:
        self.img, self.run, self.mem, self.smp = img, run, mem, smp
        self.share = run / "share"
        self.jobs = self.share / "jobs"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._n = 0

    def start(self) -> None:
        self.jobs.mkdir(parents=True)
        argv = [
            "qemu-system-x86_64", "-name", "gestvenv-vm",
            # -cpu max: every feature TCG can emulate; multi-threaded TCG: a host thread per vCPU.
            "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(self.mem), "-smp", str(self.smp),
            "-kernel", str(self.img / "vmlinuz"), "-initrd", str(self.img / "initrd.img"),
            "-append", KERNEL_CMDLINE,
            # snapshot=on: every boot starts from the pristine image; guest writes go to a
            # throw-away overlay in TMPDIR (= the run dir) that dies with qemu.
            "-drive",
            f"file={self.img / 'rootfs.raw'},format=raw,if=virtio,snapshot=on,cache=unsafe",
            "-virtfs",
            f"local,path={self.share},mount_tag=hostshare,security_model=none,id=hostshare",
            # No network: everything comes in over 9p (CI only reaches package registries).
            "-nic", "none", "-display", "none", "-monitor", "none",
            "-serial", f"file:{self.run / 'serial.log'}", "-no-reboot",
        ]
        self.started = time.monotonic()
        with open(self.run / "qemu.log", "wb") as qlog:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                                         env=os.environ | {"TMPDIR": str(self.run)},
                                         start_new_session=True, preexec_fn=_die_with(os.getpid()))
        (self.run / "qemu.pid").write_text(f"{self.proc.pid}\n")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self, what: str) -> None:
        if not self.alive():
            raise GuestCrashed(f"qemu exited during {what}:\n{self.tail()}")

    def tail(self) -> str:
        parts = []
        for name in ("qemu.log", "serial.log"):
            path = self.run / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-40:]
                parts.append(f"--- {name} (tail)\n" + "\n".join(lines))
        return "\n".join(parts)

    def wait_ready(self, timeout: float) -> str:
        ready = self.share / "ready"
        while not ready.exists():
            self._check_alive("boot")
            if time.monotonic() - self.started > timeout:
                raise HarnessError(f"guest not ready after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.2)
        return ready.read_text()

    def job(self, body: str, out: BinaryIO, err: BinaryIO, timeout: float) -> int:
        """Run BODY (bash, as root) in the guest; copy its stdout/stderr while it runs."""
        self._n += 1
        jid = f"{self._n:03d}-{time.time_ns()}"
        tmp = self.jobs / f"{jid}.tmp"
        tmp.write_text(body)
        tmp.rename(self.jobs / f"{jid}.sh")  # the runner only picks up *.sh
        streams = [(self.jobs / f"{jid}.out", out), (self.jobs / f"{jid}.err", err)]
        offsets = [0, 0]
        rc_file = self.jobs / f"{jid}.rc"
        deadline = time.monotonic() + timeout
        while True:
            done = rc_file.exists()  # .rc is written after .out/.err are closed
            for i, (path, sink) in enumerate(streams):
                try:
                    with open(path, "rb") as f:
                        f.seek(offsets[i])
                        data = f.read()
                except FileNotFoundError:
                    continue
                if data:
                    sink.write(data)
                    sink.flush()
                    offsets[i] += len(data)
            if done:
                return int(rc_file.read_text().strip())
            self._check_alive(f"job {jid}")
            if time.monotonic() > deadline:
                raise JobTimeout(f"job {jid} still running after {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (qemu exits at once: the disk is a throw-away snapshot), then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------------------------- commands


def _alive_with(pid_file: Path, needle: str) -> bool:
    """The process in PID_FILE is alive and its command line contains NEEDLE."""
    try:
        pid = int(pid_file.read_text())
        return needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def reap_stale_runs() -> None:
    """Remove run dirs left by runs that were killed (their qemu died with them)."""
    for run in BASE.glob("run-*"):
        if _alive_with(run / "driver.pid", "tests.harness.vm"):
            continue  # a parallel run
        if _alive_with(run / "qemu.pid", str(run)):
            log(f"stale {run}: its qemu still runs (pid file {run / 'qemu.pid'}); left alone")
            continue
        shutil.rmtree(run, ignore_errors=True)


def new_run_dir() -> Path:
    BASE.mkdir(parents=True, exist_ok=True)
    reap_stale_runs()
    run = BASE / f"run-{os.getpid()}-{time.time_ns() % 10**9}"
    run.mkdir(mode=0o755)
    (run / "driver.pid").write_text(f"{os.getpid()}\n")
    return run


class GuestCrashed(HarnessError):
    """qemu exited under us: under TCG the guest kernel has been seen to panic at random (once,
    in the scheduler, with nothing of ours in the trace). An infrastructure failure, not a
    test's: ``--retries`` runs the whole tier again."""


def cmd_run(args: argparse.Namespace) -> int:
    for attempt in range(args.retries + 1):
        try:
            return _run_once(args)
        except GuestCrashed as exc:
            if attempt == args.retries:
                raise
            log(f"the guest crashed ({str(exc).splitlines()[0]}); running the tier again")
    raise AssertionError("unreachable")


def _run_once(args: argparse.Namespace) -> int:
    if not args.cmd:
        raise HarnessError("no command given: run [options] -- CMD...")
    timer = Timer()
    with timer.phase("tools"):
        ensure_host_tools()
    with timer.phase("image"):
        img = ensure_image(args.rebuild)
    pyver = guest_python_version(img)
    run = new_run_dir()
    guest = Guest(img, run, args.mem, args.smp)
    rc = EXIT_HARNESS
    try:
        guest.start()
        # Host work overlaps the guest's boot (which waits on TCG, not on us).
        with timer.phase("wheels(overlaps boot)"):
            prepare_share(guest.share, run, pyver)
        with timer.phase("boot(rest)"):
            ready = guest.wait_ready(args.boot_timeout)
        log(f"guest ready after {time.monotonic() - guest.started:.1f}s: "
            + " ".join(ready.split()))
        setup_log = io.BytesIO()
        sink: BinaryIO = sys.stderr.buffer if args.verbose else setup_log
        script = SETUP_UV if args.installer == "uv" else SETUP_PIP
        with timer.phase(f"setup({args.installer})"):
            setup_rc = guest.job(script, sink, sink, args.setup_timeout)
        if setup_rc != 0:
            raise HarnessError(f"guest setup failed ({setup_rc}):\n"
                               + setup_log.getvalue().decode(errors="replace"))
        env = CMD_ENV
        user = ["runuser", "-u", "tester", "--"]
        if args.as_root:
            user = []
            env = env | {"HOME": "/root", "USER": "root", "LOGNAME": "root", "PATH":
                         f"{GUEST_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"}
        env = env | dict(e.split("=", 1) if "=" in e else (e, os.environ.get(e, ""))
                         for e in args.env)
        body = f"cd {GUEST_TREE}\nexec {shlex.join(user)} env -i {env_args(env)} " \
               f"{shlex.join(args.cmd)}\n"
        log(f"running as {'root' if args.as_root else 'tester'}: {shlex.join(args.cmd)}")
        with timer.phase("cmd"):
            rc = guest.job(body, sys.stdout.buffer, sys.stderr.buffer, args.timeout)
    except JobTimeout as exc:
        log(f"timeout: {exc}")
        rc = EXIT_TIMEOUT
    finally:
        # Teardown must not be cut short by a second Ctrl-C/SIGTERM.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        with timer.phase("stop"):
            guest.stop()
            if args.keep_run:
                log(f"kept {run}")
            else:
                shutil.rmtree(run, ignore_errors=True)
        log(f"timings: {timer.summary()}")
    log(f"exit status {rc}")
    return rc


def cmd_build(args: argparse.Namespace) -> int:
    timer = Timer()
    with timer.phase("tools"):
        ensure_host_tools()
    with timer.phase("image"):
        img = ensure_image(args.rebuild)
    print((img / "build-info").read_text(), end="")
    log(f"image {img}; timings: {timer.summary()}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    if BASE.exists():
        reap_stale_runs()
        if args.all:
            with locked(BASE / "build.lock"):
                for path in [*BASE.glob("image-*"), BASE / "deb-cache"]:
                    shutil.rmtree(path, ignore_errors=True)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.vm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot the guest, run CMD as tester, stop the guest")
    run.add_argument("--timeout", type=float, default=1200, help="for CMD (s; default 1200)")
    run.add_argument("--retries", type=int, default=1,
                     help="run the tier again when the guest crashes (default 1)")
    run.add_argument("--boot-timeout", type=float, default=300)
    run.add_argument("--setup-timeout", type=float, default=300)
    run.add_argument("--mem", type=int, default=2048, help="guest RAM, MiB")
    run.add_argument("--smp", type=int, default=2, help="guest vCPUs")
    run.add_argument("--installer", choices=["uv", "pip"], default="uv",
                     help="what fills the guest venv (default uv: faster under TCG)")
    run.add_argument("-e", "--env", action="append", default=[], metavar="NAME[=VALUE]",
                     help="extra variable for CMD (NAME alone: the host's value)")
    run.add_argument("--as-root", action="store_true", help="run CMD as root (debugging)")
    run.add_argument("--rebuild", action="store_true", help="rebuild the image first")
    run.add_argument("--keep-run", action="store_true", help="keep the run dir (serial.log)")
    run.add_argument("-v", "--verbose", action="store_true", help="show the setup job's output")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...")
    build = sub.add_parser("build", help="install host tools, build/cache the image")
    build.add_argument("--rebuild", action="store_true")
    clean = sub.add_parser("clean", help="remove leftovers of killed runs")
    clean.add_argument("--all", action="store_true", help="also the image cache")
    args = parser.parse_args(argv)
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    # Also when started with SIGINT ignored (a background job of a non-interactive shell):
    # Python then keeps SIG_IGN and Ctrl-C would not stop the guest.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    commands = {"run": cmd_run, "build": cmd_build, "clean": cmd_clean}
    try:
        return commands[args.command](args)
    except HarnessError as exc:
        log(f"error: {exc}")
        return EXIT_HARNESS
    except KeyboardInterrupt:
        log("interrupted")
        return 128 + signal.SIGINT
    except Interrupted as exc:
        log(f"terminated by signal {exc.signum}")
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
