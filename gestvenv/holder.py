"""The process of an environment's own systemd unit (``gestvenv-<name>.service``).

systemd holds the environment's lifetime: RuntimeMaxSec is the TTL, and while this unit is up
its slice is kept (BindsTo=); when it ends, for any reason, systemd stops everything in the slice.
This process only decides the two ends systemd cannot see by itself, and exits for them:

- the creator of an environment it owns died (``--owner-pid``; a pidfd, so no polling of a
  recycled PID: the start time is checked once, when the pidfd is opened);
- the environment has been idle for ``--idle-timeout`` seconds: no process in its slice, no
  build or install running (processes carrying its marker), and no command or install
  recorded in its state file for that long. A running command is never idle.

It lives in the parent slice, outside the environment's limits: it costs the environment nothing.

A pool unit's holder (``--pool``: ``--state-file`` is its pool file, see
``gestvenv.runtime.systemd.pool``) first waits for a claim: it reads its pool file every PERIOD,
ends when the file is gone or after its idle lifetime unclaimed (``idle_until``), and once
claimed holds the env the claim names: its owner, its idle timeout, and its TTL
(``expires_at``: exact, as under the local runtime; the unit's RuntimeMaxSec, which cannot be
changed once it runs, is only systemd's backstop). An env made with ``max_ttl`` has its TTL
held so too (``--expires-at``, RuntimeMaxSec being max_ttl). A held TTL follows the state file,
where an extension writes it (gestvenv.ttl).

Whenever it ends (one of those, or SIGTERM: the TTL, a cleanup, ``systemctl stop``, a shutdown,
all of which stop the env's commands first), it reaps the environment on its way out
(``gestvenv.reaper``): the files go without starting another Python.
The unit's stop action runs the reaper again only if something is left (this process was
killed, or failed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import select
import signal
import sys
import time
from pathlib import Path

PERIOD = 0.5


def _own_cgroup() -> str:
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for prefix in ("0::", "1:name=systemd:"):
        for line in lines:
            if line.startswith(prefix):
                return line[len(prefix):]
    for line in lines:
        if ":name=systemd:" in line:
            return line.split(":", 2)[2]
    return ""


# A container env's container and its conmon are scopes in its slice, alive for as long as the
# env: not a sign of use. (Its commands, exec'd into it, carry the env's marker.)
_CONTAINER_SCOPES = ("libpod-", "docker-")


def _slice_busy(slice_dir: Path) -> bool:
    for dirpath, dirs, files in os.walk(slice_dir):
        dirs[:] = [d for d in dirs if not d.startswith(_CONTAINER_SCOPES)]
        if "cgroup.procs" in files:
            try:
                if Path(dirpath, "cgroup.procs").read_text().strip():
                    return True
            except OSError:
                continue
    return False


def _slice_dir(slice_unit: str) -> Path:
    parent = os.path.dirname(_own_cgroup()).lstrip("/")
    for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"),
                 Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").exists() and (root / parent).is_dir():
            if root == Path("/sys/fs/cgroup") and not (root / "cgroup.controllers").exists():
                continue
            return root / parent / slice_unit
    return Path("/nonexistent")


def _marked_process(env_id: str) -> bool:
    """A process of the env outside its slice: the builder during create and ``install``
    (gestvenv runs them with the env's marker, GESTVENV_ENV_ID, in their environment)."""
    needle = f"GESTVENV_ENV_ID={env_id}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    return True
        except OSError:
            continue
    return False


def _read_state(state_file: str, env_id: str) -> dict[str, object] | None:
    """The env's state; None when the file is gone or names another env."""
    try:
        data = json.loads(Path(state_file).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("id") != env_id:
        return None
    return data


def _expires_at(state: dict[str, object], held: float) -> float:
    """The end the state file gives (``created_at + ttl``: an extended TTL is written there,
    gestvenv.ttl), else the one held so far."""
    created, ttl = state.get("created_at"), state.get("ttl")
    if isinstance(created, int | float) and isinstance(ttl, int) and not isinstance(ttl, bool) \
            and ttl > 0:
        return float(created) + ttl
    return held


def _state_gone(state_file: str, env_id: str) -> bool:
    """The env's state file is missing, or now another env's (an unreadable one is not
    judged here: the orphan sweep is)."""
    try:
        data = json.loads(Path(state_file).read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("id") != env_id


def _released(state: dict[str, object] | None) -> bool:
    """Built and kept (``ephemeral create``): the env no longer belongs to its creator."""
    return state is not None and state.get("status") == "ready" and state.get("owner_pid") is None


def _owner_fd(pid: int, started: float) -> int | None:
    """A pidfd on the owner, or None when it is already gone (or the PID was recycled)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        begun = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        os.close(fd)
        return None
    if started and abs(begun - started) > 1.0:
        os.close(fd)
        return None
    return fd


def _load_reaper() -> object:
    """gestvenv/reaper.py, beside this file, as a module (run as a file: no package here)."""
    spec = importlib.util.spec_from_file_location("gestvenv_reaper",
                                                  Path(__file__).with_name("reaper.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reap(args: argparse.Namespace, reaper: object | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut it short
    try:
        reaper = reaper or _load_reaper()
        # (A pool unit's reaper gets its pool file, whose claim names the env's state file.)
        done = reaper.reap(Path(args.env_path), args.env_id,  # type: ignore[attr-defined]
                           Path(args.pool_file or args.state_file), Path(args.registry_lock))
    except Exception as exc:  # the unit's stop action tries again, and says why
        print(f"gestvenv reaper: {exc}", file=sys.stderr, flush=True)
        return
    print(f"gestvenv reaper: {'; '.join(done) or 'nothing left to remove'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # first: a stop may come this early
    parser = argparse.ArgumentParser(prog="gestvenv.holder")
    parser.add_argument("--env-path", help="reap the env on the way out: its dir")
    parser.add_argument("--registry-lock", default="")
    parser.add_argument("--slice", default="", help="the env's slice (systemd runtime)")
    parser.add_argument("--expires-at", type=float, default=0.0,
                        help="end at this time (local runtime; systemd has RuntimeMaxSec)")
    parser.add_argument("--state-file", required=True)
    parser.add_argument("--env-id", required=True)
    parser.add_argument("--owner-pid", type=int)
    parser.add_argument("--owner-start", type=float, default=0.0)
    parser.add_argument("--idle-timeout", type=float, default=0.0)
    parser.add_argument("--pool", action="store_true",
                        help="a pool unit: --state-file is its pool file; wait for a claim")
    args = parser.parse_args(argv)
    args.pool_file = args.state_file if args.pool else ""
    # An env unit's holder loads the reaper now: a destroy waits for its stop. A local one
    # (no slice) only when it reaps: it starts on its creator's heels, on the same CPUs, and
    # its own end is rarely waited for.
    reaper = _load_reaper() if args.env_path and args.slice else None
    try:
        return _hold(args)
    finally:
        if args.env_path:
            _reap(args, reaper)


def _await_claim(args: argparse.Namespace) -> bool:
    """A pool unit's wait: True once claimed (``args`` then name the env), False when it must
    end unclaimed (its pool file gone, or its idle lifetime over)."""
    while True:
        try:
            data = json.loads(Path(args.pool_file).read_text())
        except FileNotFoundError:
            data = None
        except (OSError, ValueError):
            data = {"id": args.env_id}  # (being replaced this instant: looked at again)
        if not isinstance(data, dict) or data.get("id") != args.env_id:
            print("pool file gone: ending the pool unit", flush=True)
            return False
        claim = data.get("claim")
        if isinstance(claim, dict):
            try:
                args.state_file = str(claim["state_file"])
                args.owner_pid = int(claim["owner_pid"]) if claim.get("owner_pid") else None
                args.owner_start = float(claim.get("owner_start") or 0.0)
                args.idle_timeout = float(claim.get("idle_timeout") or 0.0)
                args.expires_at = float(claim.get("expires_at") or 0.0)
            except (KeyError, TypeError, ValueError):
                print("unreadable claim: ending the pool unit", flush=True)
                return False
            print(f"claimed by environment {claim.get('name')} (owner {args.owner_pid})",
                  flush=True)
            return True
        if "idle_until" in data and time.time() >= float(data["idle_until"]) \
                and _retire(args):
            print("unclaimed for its pool_idle: ending the pool unit", flush=True)
            return False
        time.sleep(PERIOD)


def _retire(args: argparse.Namespace) -> bool:
    """End unclaimed, unless a claim landed: under the registry lock, which every claim is
    written under, the pool file is looked at once more and, still unclaimed, removed (no
    create can take this unit any more). False: claimed meanwhile (the caller looks again)."""
    import fcntl

    fd = os.open(args.registry_lock, os.O_RDWR | os.O_CREAT, 0o600) \
        if args.registry_lock else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            data = json.loads(Path(args.pool_file).read_text())
        except (OSError, ValueError):
            return True
        if isinstance(data, dict) and data.get("id") == args.env_id:
            if isinstance(data.get("claim"), dict):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.pool_file)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _hold(args: argparse.Namespace) -> int:
    if args.pool and not _await_claim(args):
        return 0

    # The state file goes when the env is destroyed. Its dir is always visible here (bound in
    # under a private /tmp): a state file already missing when this (late, under load) start
    # looks means the env was destroyed meanwhile, not that the file cannot be seen.
    watch_state = Path(args.state_file).parent.is_dir()
    owner = None
    if args.owner_pid:
        owner = _owner_fd(args.owner_pid, args.owner_start)
        released = _released(_read_state(args.state_file, args.env_id))
        if owner is None and not released:
            print(f"owner {args.owner_pid} is gone: ending the environment", flush=True)
            return 0
    slice_dir = _slice_dir(args.slice) if args.slice else None
    busy_seen = time.time()
    while True:
        wait = PERIOD
        if args.expires_at:
            if time.time() >= args.expires_at:
                print("TTL reached: ending the environment", flush=True)
                return 0
            wait = min(PERIOD, args.expires_at - time.time())
        owner_exited = False
        if owner is not None:
            ready, _, _ = select.select([owner], [], [], max(wait, 0.0))
            owner_exited = bool(ready)
        else:
            time.sleep(max(wait, 0.0))
        state = _read_state(args.state_file, args.env_id) if watch_state else None
        if owner_exited and not _released(state):
            print(f"owner {args.owner_pid} exited: ending the environment", flush=True)
            return 0
        if watch_state and state is None and _state_gone(args.state_file, args.env_id):
            # Destroyed (or never committed and undone, or the name already reused): whoever
            # did it stops this unit too; leaving first only makes that quicker.
            print("state file gone: ending the environment", flush=True)
            return 0
        if owner is not None and _released(state):
            os.close(owner)  # built and kept (``ephemeral create``): it outlives its creator
            owner = None
        if args.expires_at and state is not None:
            args.expires_at = _expires_at(state, args.expires_at)
        last = float(str(state.get("last_activity") or 0.0)) if state else None
        if args.idle_timeout:
            now = time.time()
            building = state is not None and state.get("status") == "creating"
            busy = slice_dir is not None and _slice_busy(slice_dir)
            if building or busy or _marked_process(args.env_id):
                busy_seen = now
            elif now - max(busy_seen, last or 0.0) >= args.idle_timeout:
                print(f"idle for {args.idle_timeout:g}s: ending the environment", flush=True)
                return 0


if __name__ == "__main__":
    try:
        status = main()
    except SystemExit as stop:  # SIGTERM
        status = stop.code if isinstance(stop.code, int) else 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # no interpreter teardown: the unit's stop waits for this exit
