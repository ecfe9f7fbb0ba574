"""An env's container as command lines: pure functions from the env's plan to the engine's
arguments (tested without an engine).

One long-lived container per environment (``podman ps`` shows it, with gestvenv's labels, for
as long as the env lives); each command of the env is a ``podman exec`` into it. Its root
filesystem is the image, read-only; the env's own dir is bound read-write at its own path (its
storage backend and its max_disk hold there, and ``install`` writes there), and /tmp, /var/tmp
are a private tmpfs, or the env's capped temp dirs when it has max_disk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..models import (
    NOT_HELD,
    Enforcement,
    IsolationLevel,
    LimitStatus,
    ResourceLimits,
    in_threat_order,
)
from .engine import LABEL_ENV, LABEL_ID, LABEL_OWNER, LABEL_STATE

# The container's init holds it open; the env's commands are exec'd beside it.
HOLD = ("-I", "-S", "-B", "-c", "import signal\nwhile True: signal.pause()")
# Variables of the caller's environment a container command keeps (the others are the host's:
# its paths, its sockets, its secrets); gestvenv's own and the caller's explicit ones are added.
PASSED_THROUGH = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TERM", "TZ",
                  "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")
_NAME_RE = re.compile(r"[^a-zA-Z0-9_.-]")
# Tasks of gestvenv's own that a container env's task limit (--pids-limit, on the container's
# cgroup) also counts, added to it: its init, the interpreter holding it, a command's status
# reporter. Under systemd the env's slice holds the container's scope and conmon's, and runc
# runs there while a command starts (a Go program: a dozen threads, each a task): its
# TasksMax leaves them room.
CONTAINER_TASKS = 3
SLICE_TASKS = 64


def container_name(env_name: str, env_id: str) -> str:
    """``gestvenv-<name>-<id8>``: what ``podman ps`` shows (an env name is already safe)."""
    return f"gestvenv-{_NAME_RE.sub('_', env_name)}-{env_id[:8]}"


@dataclass(frozen=True)
class ContainerSpec:
    """What an env's container is: everything :func:`run_args` needs."""

    engine: str                      # "podman" or "docker"
    image: str
    env_name: str
    env_id: str
    owner: int                       # the creator's uid
    state_file: str
    env_path: str                    # bound read-write at its own path
    interpreter: str                 # the image's python (the same path as the host's)
    network: bool                    # the host's network, or none at all
    user: str | None = None          # "uid:gid" the commands run as; None: the engine's default
    keep_id: bool = False            # rootless podman: the creator's uid is its own inside
    # Engine limits: where no systemd slice holds them (the local runtime).
    memory_mb: int | None = None
    processes: int | None = None
    cpu_percent: float | None = None
    # Under systemd: the env's slice holds the container (and its limits).
    cgroup_parent: str | None = None
    temp: tuple[tuple[str, str], ...] = ()   # /tmp, /var/tmp -> the env's capped dirs
    # The size of the private tmpfs mounts (/tmp, /var/tmp, /run): max_memory, whose pages
    # they are (a write past it fails with ENOSPC rather than an OOM kill of whoever runs).
    tmpfs_mb: int | None = None
    shm_mb: int | None = None
    expose: tuple[str, ...] = ()     # host files bound read-only at their path (uv, for pip)


def labels(spec: ContainerSpec) -> dict[str, str]:
    return {LABEL_ID: spec.env_id, LABEL_ENV: spec.env_name, LABEL_OWNER: str(spec.owner),
            LABEL_STATE: spec.state_file}


def run_args(spec: ContainerSpec) -> list[str]:
    """``<engine> run`` arguments that start the env's container, detached."""
    out = ["run", "--detach", "--rm", "--init", "--name",
           container_name(spec.env_name, spec.env_id)]
    for key, value in labels(spec).items():
        out += ["--label", f"{key}={value}"]
    out += ["--pull", "never", "--log-driver", "none"]
    if spec.engine == "podman":
        # Not the creator's proxy variables (credentials, often), which podman copies in.
        out += ["--http-proxy=false"]
    out += ["--network", "host" if spec.network else "none"]
    # Nothing of the host's privileges: no capability, no setuid gain, the engine's default
    # system call filter (seccomp) kept.
    out += ["--cap-drop", "all", "--security-opt", "no-new-privileges"]
    if spec.user is not None:
        out += ["--user", spec.user]
    if spec.keep_id:
        out += ["--userns", "keep-id"]
    # Only the env is writable: the image is read-only, /tmp and /var/tmp its own.
    out += ["--read-only"]
    temp = dict(spec.temp)
    size = f",size={spec.tmpfs_mb}m" if spec.tmpfs_mb is not None else ""
    for tree in ("/tmp", "/var/tmp"):
        if tree in temp:
            out += ["--volume", f"{temp[tree]}:{tree}:rw"]
        else:
            out += ["--tmpfs", f"{tree}:rw,nosuid,nodev,mode=1777{size}"]
    if spec.engine == "podman":
        out += ["--read-only-tmpfs=false"]  # (podman's own would be unbounded, and on /run)
    out += ["--tmpfs", f"/run:rw,nosuid,nodev,mode=755{size}"]
    if spec.shm_mb is not None:
        out += ["--shm-size", f"{spec.shm_mb}m"]
    out += ["--volume", f"{spec.env_path}:{spec.env_path}:rw"]
    for path in dict.fromkeys(spec.expose):
        out += ["--volume", f"{path}:{path}:ro"]
    out += ["--workdir", spec.env_path]
    if spec.memory_mb is not None:
        out += ["--memory", f"{spec.memory_mb}m", "--memory-swap", f"{spec.memory_mb}m"]
    if spec.processes is not None:
        out += ["--pids-limit", str(spec.processes + CONTAINER_TASKS)]
    if spec.cpu_percent is not None:
        out += ["--cpus", f"{spec.cpu_percent / 100:.2f}"]
    if spec.cgroup_parent is not None:
        out += ["--cgroup-parent", spec.cgroup_parent]
    out += ["--env", f"VIRTUAL_ENV={spec.env_path}",
            "--env", f"PATH={spec.env_path}/bin:/usr/local/bin:/usr/bin:/bin",
            "--env", f"HOME={spec.env_path}"]
    out += [spec.image, spec.interpreter, *HOLD]
    return out


def global_args(engine: str, cgroup_manager: str | None) -> list[str]:
    """Options before the subcommand: podman's cgroup manager under systemd."""
    if engine == "podman" and cgroup_manager is not None:
        return ["--cgroup-manager", cgroup_manager]
    return []


def command_environ(environ: Mapping[str, str], inherited: Mapping[str, str],
                    env_path: str, passed: Sequence[str] = ()) -> dict[str, str]:
    """A container command's environment: the few variables of the caller's that describe
    the terminal and locale, every one that gestvenv or the caller set for the command (those
    not ``inherited`` from our own process as they are, and those ``passed`` by name), and the
    env's own paths."""
    out = {k: environ[k] for k in PASSED_THROUGH if k in environ}
    out.update({k: v for k, v in environ.items() if inherited.get(k) != v or k in passed})
    out.update({"VIRTUAL_ENV": env_path, "PATH": f"{env_path}/bin:/usr/local/bin:/usr/bin:/bin",
                "HOME": env_path})
    return out


# Variables the engine's CLI itself reads (where it keeps its storage, which daemon, its
# config): given to a command on the command line, never through the CLI's own environment.
_ENGINE_READS = ("HOME", "PATH", "TMPDIR", "XDG_", "CONTAINERS_", "CONTAINER_", "DOCKER_",
                 "PODMAN_", "BUILDAH_", "STORAGE_", "REGISTRY_AUTH_FILE", "LD_", "GODEBUG")


def split_environ(environ: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(on the command line, by name through the CLI's environment) (pure). A value on a
    command line can be read by every local user (/proc/PID/cmdline); one in a process's
    environment only by its user. Those the CLI itself would read go on the line."""
    line = {k: v for k, v in environ.items() if k.startswith(_ENGINE_READS)
            or k.startswith("GESTVENV_") or k == "VIRTUAL_ENV"}
    return line, {k: v for k, v in environ.items() if k not in line}


def exec_args(container: str, *, environ: Mapping[str, str], cwd: str,
              argv: Sequence[str], interactive: bool, tty: bool, user: str | None,
              preserve_fds: int = 0) -> list[str]:
    """``<engine> exec`` arguments that run one command of the env in its container: the
    variables of :func:`split_environ`'s first part by value, the others by name."""
    out = ["exec"]
    if interactive:
        out.append("--interactive")
    if tty:
        out.append("--tty")
    if preserve_fds:
        out += ["--preserve-fds", str(preserve_fds)]
    if user is not None:
        out += ["--user", user]
    out += ["--workdir", cwd]
    line, by_name = split_environ(environ)
    for key, value in line.items():
        out += ["--env", f"{key}={value}"]
    # Names only: the engine takes each value from its own environment (the caller puts them
    # there), so that a secret never shows in a command line.
    for key in by_name:
        out += ["--env", key]
    out += [container, *argv]
    return out


def enforcement(base: Enforcement, limits: ResourceLimits, *, engine: str, rootless: bool,
                own_uid: bool, slice_holds: bool, requested: IsolationLevel) -> Enforcement:
    """What an env gets at container isolation: ``base`` is the runtime's plan at process
    isolation (under systemd its slice holds the limits; ``slice_holds``), the engine holds
    what no slice does, and the container holds the isolation."""
    status = dict(base.limits)
    where = "the env's container cgroup"
    if not slice_holds:
        if limits.max_memory is not None:
            status["max_memory"] = LimitStatus(
                limits.max_memory, True,
                f"{engine} --memory (memory cgroup of the env's container: the env's total, "
                "OOM-killed above)")
        if limits.max_cpu_percent is not None:
            status["max_cpu_percent"] = LimitStatus(
                limits.max_cpu_percent, True, f"{engine} --cpus (CFS quota of {where})")
    if limits.max_processes is not None:
        backstop = (f"; the slice's TasksMax={limits.max_processes + SLICE_TASKS} leaves room "
                    "for conmon and runc") if slice_holds else ""
        status["max_processes"] = LimitStatus(
            limits.max_processes, True,
            f"{engine} --pids-limit={limits.max_processes + CONTAINER_TASKS} ({where}): "
            f"max_processes, plus {CONTAINER_TASKS} of gestvenv's own (the container's init, "
            f"the interpreter holding it, a command's status reporter){backstop}")
    if not limits.network_access:
        status["network_access"] = LimitStatus(
            False, True, f"{engine} --network none: a network namespace with only lo")
    notes = [n for n in base.notes if not n.startswith("isolation ")]
    if requested is IsolationLevel.CHROOT:
        notes.append(f"isolation chroot requested; container isolation applied ({engine}): "
                     "the container's root is its image, which is more than a chroot")
    return Enforcement(base.runtime, requested, IsolationLevel.CONTAINER, status,
                       tuple(notes),
                       protections(engine, rootless=rootless, own_uid=own_uid,
                                   network=status.get("network_access")))


def unusable(engine: str, *, rootless: bool, cgroup_version: int) -> str | None:
    """Why this engine cannot hold an env's container with its limits here, or None (pure)."""
    if rootless and cgroup_version < 2:
        return (f"rootless {engine} on a cgroup v1 host has no cgroup of its own to give the "
                "container (neither the env's slice nor the engine's limits would hold)")
    return None


def protections(engine: str, *, rootless: bool, own_uid: bool,
                network: LimitStatus | None) -> dict[str, str]:
    """What a container env holds against each threat (models.THREATS), and by what."""
    if own_uid:
        who = "the env's own unprivileged uid"
    elif rootless:
        who = f"the creator's uid, in rootless {engine}'s user namespace"
    else:
        who = "the creator's uid"
    out = {
        "privileges": f"{who}; every capability dropped, no-new-privileges, the engine's "
                      "default seccomp profile",
        "secrets": "the host's files do not exist inside: the root is the image (the "
                   "interpreter, its libraries, /bin/sh), and only the env's dir is bound in",
        "host_writes": "the image is read-only; /tmp, /var/tmp, /run are the container's own "
                       "(the env's cap with max_disk); only the env's dir is writable",
        "processes": "a PID namespace of its own (the container's; PID 1 is its init)",
        "units": "no bus socket and no /run of the host inside",
        "other_envs": "a container per env; no other env's dir is bound in"
                      + ("; a uid per env" if own_uid else ""),
        "shared_files": "the shared cache and snapshots are not bound in; " + (
            "installed files are hardlinks of theirs that are root's and read-only to the "
            "env's uid (an edit in place: EACCES), else the env's own copies" if own_uid else
            "the env's files are its own copies (or reflinks)"),
        "ipc_uts": "IPC and UTS namespaces of its own",
        "kernel": "/proc/sys and /sys read-only, no capability, the engine's seccomp profile",
        "builds": "package builds run as commands of the env, in its container",
    }
    if network is None or not network.enforced:
        out["network"] = NOT_HELD + "network_access=True: the host's network (--network host)"
    else:
        out["network"] = network.mechanism
    return in_threat_order(out)
