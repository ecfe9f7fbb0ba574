"""The plan: limits, isolation and lifetime turned into unit properties. Pure: no I/O, no bus.

An environment is three kinds of units (names in :class:`UnitNames`):

- its **slice** ``gestvenv-<name>.slice`` (``-`` escaped, as systemd does) holds the limits of
  all its processes together: MemoryMax, CPUQuota, TasksMax, the IP firewall. It has
  StopWhenUnneeded=yes, so it goes as soon as nothing of the environment runs;
- its **own unit** ``gestvenv-<name>.service`` runs gestvenv's holder in the parent slice
  (outside the env's limits, so it costs the env nothing), carries RuntimeMaxSec = TTL, and keeps
  the slice up (BindsTo=). When it ends (TTL, idle, its creator died, ``systemctl stop``) the
  slice is no longer needed and systemd stops everything in it;
- one unit per command, ``gestvenv-<name>@<id>.service``, in the slice, bound to the env's unit.

Every property used is in :data:`SIGNATURES` (as pystemd does): the unit tests check each plan
against it, so a typo or a wrong type fails there and not on a live bus.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ... import reaper
from ...models import (
    NOT_HELD,
    Enforcement,
    IsolationLevel,
    LimitStatus,
    ResourceLimits,
    in_threat_order,
    network_held,
)
from ...names import RESERVED_NAMES
from ...sandbox import SHARED_FILES_COPIES, SHARED_FILES_OWN_UID, is_hidden

PARENT_SLICE = "gestvenv.slice"
# In the env unit's environment: which env it is, and where its state file is (a name is reused
# after destroy, and several registries, one per runtime dir, may share one manager).
UNIT_ENV_ID = "GESTVENV_UNIT_ENV_ID"
UNIT_STATE_FILE = "GESTVENV_UNIT_STATE_FILE"
UNIT_NAME_MAX = 255  # systemd's UNIT_NAME_MAX (256) with its NUL
MB = 1 << 20
USEC = 1_000_000
# How long a command's unit may take to stop after SIGTERM before SIGKILL: the TTL is a deadline.
STOP_TIMEOUT_USEC = 500_000
# The env's own unit: its holder exits at once on SIGTERM, but its stop action (the reaper,
# which deletes the env's files) shares this timeout, and a large tree on a slow disk takes time.
ENV_STOP_TIMEOUT_USEC = 120 * 1_000_000

SIGNATURES: Mapping[str, str] = {
    "Description": "s",
    "Slice": "s",
    # The plain forms, not ExecStartEx= (flags): systemd 252 writes "ExecStartEx=" into the
    # transient unit file, a key its own parser rejects, so after any daemon-reload or
    # daemon-reexec the unit became "bad-setting": no new command could join the env and its
    # stop action was lost (seen in tests/harness/systemd_host).
    "ExecStart": "a(sasb)",
    "ExecStopPost": "a(sasb)",
    "Type": "s",
    "WorkingDirectory": "s",
    "Environment": "as",
    "StandardInput": "s",
    "StandardInputFileDescriptor": "h",
    "StandardOutputFileDescriptor": "h",
    "StandardErrorFileDescriptor": "h",
    "BindsTo": "as",
    "After": "as",
    "JoinsNamespaceOf": "as",
    "AddRef": "b",
    "CollectMode": "s",
    "StopWhenUnneeded": "b",
    "StartLimitBurst": "u",
    "StartLimitIntervalUSec": "t",
    "RuntimeMaxUSec": "t",
    "TimeoutStopUSec": "t",
    "KillMode": "s",
    "SendSIGKILL": "b",
    "MemoryAccounting": "b",
    "CPUAccounting": "b",
    "TasksAccounting": "b",
    "IPAccounting": "b",
    "MemoryMax": "t",
    "MemorySwapMax": "t",
    "CPUQuotaPerSecUSec": "t",
    "TasksMax": "t",
    "IPAddressDeny": "a(iayu)",
    "IPAddressAllow": "a(iayu)",
    "PrivateNetwork": "b",
    "PrivateUsers": "b",
    "PrivateTmp": "b",
    "PrivateDevices": "b",
    "ProtectSystem": "s",
    "ProtectHome": "s",
    "ProtectKernelTunables": "b",
    "ProtectKernelModules": "b",
    "ProtectControlGroups": "b",
    "NoNewPrivileges": "b",
    "RestrictSUIDSGID": "b",
    "ReadWritePaths": "as",
    "BindPaths": "a(ssbt)",
    "BindReadOnlyPaths": "a(ssbt)",
    "ReadOnlyPaths": "as",
    "InaccessiblePaths": "as",
    "TemporaryFileSystem": "a(ss)",
    "CapabilityBoundingSet": "t",
    "AmbientCapabilities": "t",
    "ProtectProc": "s",
    "PrivateIPC": "b",
    "PrivatePIDs": "s",  # (257: "yes" | "no")
    "ProtectHostname": "b",
    "ProtectKernelLogs": "b",
    "ProtectClock": "b",
    "RestrictNamespaces": "t",
    "LockPersonality": "b",
    "RestrictRealtime": "b",
    "SystemCallFilter": "(bas)",
    "SystemCallArchitectures": "as",
    "SystemCallErrorNumber": "i",
}

# The sandboxing that creates namespaces an env's units share (JoinsNamespaceOf= its own unit).
SHARED_NAMESPACES = ("PrivateNetwork", "PrivateTmp", "PrivateUsers", "PrivateIPC")

Property = tuple[str, str, Any]


def prop(name: str, value: Any) -> Property:
    return (name, SIGNATURES[name], value)


def escape_slice_part(name: str) -> str:
    """``-`` means nesting in a slice name, so it is escaped the way systemd-escape does."""
    return reaper.escape_slice_part(name)


@dataclass(frozen=True)
class UnitNames:
    env: str
    slice: str

    @classmethod
    def of(cls, stem: str) -> UnitNames:
        """The units of an env whose units run under ``stem``: its name, or for a pooled env
        its pool unit's (``EnvRecord.stem``). (The slice's rule is the reaper's, which finds
        the slice without this module.)"""
        return cls(env=f"gestvenv-{stem}.service", slice=reaper.env_slice_name(stem))

    def command(self, exec_id: str) -> str:
        return self.env.removesuffix(".service") + f"@{exec_id}.service"


LIVE_UNIT_STATES = ("active", "activating", "reloading", "deactivating")

_ENV_UNIT_RE = re.compile(r"gestvenv-([A-Za-z0-9][A-Za-z0-9_.-]*)\.service")


def env_name_of_unit(unit: str) -> str | None:
    """The environment an env unit belongs to (None for command units and others)."""
    match = _ENV_UNIT_RE.fullmatch(unit)
    if match is None or match.group(1) in RESERVED_NAMES:  # gestvenv-cleanup.service
        return None
    return match.group(1)


def pool_description(stem: str, description: str, env_id: str) -> str:
    """An unclaimed pool unit's Description (ends like :func:`env_description`)."""
    return f"gestvenv pool unit {stem}, unclaimed ({description}; id {env_id})"


def claimed_description(env_name: str, stem: str, description: str, env_id: str) -> str:
    """A pool unit's Description once an env has claimed it: the env's, saying the unit."""
    return env_description(env_name, f"pooled unit {stem}, {description}", env_id)


def env_description(env_name: str, description: str, env_id: str) -> str:
    """The env unit's Description: what ``systemctl`` shows, ending with the env's id, so that
    one ListUnitsByPatterns tells every env unit's state and env (its rows carry each unit's
    Description), where reading each unit's Environment took two calls per unit."""
    return f"gestvenv environment {env_name} ({description}; id {env_id})"


_DESCRIBED_ID_RE = re.compile(r"; id ([0-9a-f]{32})\)\Z")


def env_id_of_description(description: str) -> str | None:
    """The env id an env unit's Description ends with (:func:`env_description`); None for a
    unit that does not say it (started by a gestvenv before it did, or not gestvenv's): its
    Environment (``UNIT_ENV_ID``) must then be read."""
    match = _DESCRIBED_ID_RE.search(description)
    return match.group(1) if match else None


def described_as_known(env_name: str, description: str,
                       known: Mapping[str, str] | None) -> str | None:
    """The env id of an env unit whose Description names the env that ``known`` (env name ->
    id, the caller's own registry) has under that name: the unit is that env's, and its state
    file that registry's own. None: the unit must be read (an older unit, another registry's
    env, an orphan), as its state file is needed to tell them apart."""
    env_id = env_id_of_description(description)
    if env_id is None or known is None or known.get(env_name) != env_id:
        return None
    return env_id


@dataclass(frozen=True)
class Capabilities:
    """What the manager can enforce, probed once per process (``SystemdRuntime.prepare``)."""

    user: bool                       # a user manager (systemd --user), not the system's
    controllers: frozenset[str]      # cgroup controllers it can use: cpu, memory, pids
    cgroup_v2: bool                  # pure unified hierarchy
    bpf_firewall: bool = True        # IPAddressDeny works (system manager)
    user_namespaces: bool = True     # PrivateUsers= possible (for sandboxing in user managers)
    swap_uncapped: bool = False      # swap is on and cgroup v1 cannot cap it (no memory.swap.max)
    version: int = 252               # the manager's systemd version (PrivatePIDs= needs 257)

    @property
    def manager(self) -> str:
        return "user manager (systemd --user)" if self.user else "system manager"


def systemd_version(text: str) -> int:
    """The major version in the manager's Version property ("252.38-1~deb12u1", "257")."""
    match = re.match(r"\D*(\d+)", text)
    return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class EnvPlan:
    """Everything the runtime needs to start an environment, decided up front."""

    names: UnitNames
    enforcement: Enforcement
    slice_properties: list[Property]
    env_properties: list[Property]
    sandbox: list[Property] = field(default_factory=list)  # for every unit running processes


_CONTROLLER_FOR = {"max_memory": "memory", "max_cpu_percent": "cpu", "max_processes": "pids"}


def enforcement(limits: ResourceLimits, isolation: IsolationLevel,
                caps: Capabilities) -> Enforcement:
    """What the manager will enforce, honestly: a missing controller is named."""
    status: dict[str, LimitStatus] = {}
    requested = limits.requested()
    where = f"on the {caps.manager}"
    mechanisms = {
        "max_memory": f"MemoryMax={limits.max_memory}M on the env's slice (all its processes)",
        "max_cpu_percent": f"CPUQuota={limits.max_cpu_percent}% on the env's slice",
        "max_processes": f"TasksMax={limits.max_processes} on the env's slice",
    }
    for key, controller in _CONTROLLER_FOR.items():
        if key not in requested:
            continue
        if key == "max_memory" and controller in caps.controllers and caps.swap_uncapped:
            status[key] = LimitStatus(
                requested[key], False, "MemoryMax caps RAM only here: swap is on and cgroup v1 "
                "cannot cap it (MemorySwapMax needs cgroup v2), so the env would swap, not stop")
        elif controller in caps.controllers:
            status[key] = LimitStatus(requested[key], True, mechanisms[key])
        else:
            status[key] = LimitStatus(
                requested[key], False,
                f"the {controller} controller is not available {where} (not delegated)")
    # max_disk is not a unit property: the storage's own filesystem holds it (gestvenv.diskcap).
    if not limits.network_access:
        if not caps.user:
            status["network_access"] = LimitStatus(
                False, True, "PrivateNetwork=yes (only the env's own lo, shared by its units) and "
                "IPAddressDeny=any (but loopback) on the env's slice")
        elif caps.user_namespaces:
            status["network_access"] = LimitStatus(
                False, True, "PrivateNetwork=yes with PrivateUsers=yes (each command has a "
                "network namespace of its own, with only lo)")
        else:
            status["network_access"] = LimitStatus(
                False, False, f"needs user namespaces {where}, which this host does not allow")
    applied, notes = _isolation_applied(isolation, caps)
    held = protections(applied, caps, status.get("network_access"))
    return Enforcement("systemd", isolation, applied, status, tuple(notes), held)


def protections(applied: IsolationLevel, caps: Capabilities,
                network: LimitStatus | None) -> dict[str, str]:
    """What the applied isolation holds against each threat (``models.THREATS``), and by what
    unit setting; what it does not hold says so."""
    boxed = applied.sandboxed
    own_uid = boxed and not caps.user  # root's envs: see gestvenv.sandbox
    who = "the creator's uid, unprivileged" if caps.user else "root, as the creator"
    out = {
        "shared_files": SHARED_FILES_OWN_UID if own_uid else
                        SHARED_FILES_COPIES + ("; the cache and snapshots are hidden" if boxed
                                               else ""),
        "builds": "package code (sdist builds) runs as a command of the env: its unit, limits, "
                  "isolation and network",
    }
    out["network"] = network_held(network)
    if not boxed:
        for threat in ("privileges", "secrets", "host_writes", "processes", "units",
                       "other_envs", "ipc_uts", "kernel"):
            out[threat] = f"{NOT_HELD}process isolation: commands run as {who}, on the host"
        if caps.user:
            out["privileges"] = "commands run as the creator's unprivileged uid"
        return in_threat_order(out)
    if own_uid:
        out["privileges"] = ("an unprivileged uid of the env's own (setpriv), empty capability "
                             "bounding set, NoNewPrivileges=yes, RestrictSUIDSGID=yes")
        out["secrets"] = ("ProtectHome=tmpfs (/root, /home hidden); root-only files such as "
                          "/etc/shadow are unreadable to the env's uid; world-readable files "
                          "stay readable")
    else:
        out["privileges"] = ("the creator's unprivileged uid in a user namespace "
                             "(PrivateUsers=yes), no capability, NoNewPrivileges=yes")
        out["secrets"] = ("ProtectHome=tmpfs (the creator's home and /run/user hidden); files "
                          "readable by the creator elsewhere stay readable")
    out["host_writes"] = ("ProtectSystem=strict, /run read-only, private /tmp, /dev/shm and "
                          "/dev: only the env's dir is writable; no capability to remount")
    if caps.version >= 257:
        out["processes"] = "PrivatePIDs=yes: a PID namespace of its own"
    elif own_uid:
        out["processes"] = ("ProtectProc=invisible and a uid of its own: other processes are "
                            "neither visible nor signalable (no PID namespace before systemd 257)")
    else:
        out["processes"] = (f"{NOT_HELD}the creator's other processes stay visible and "
                            f"signalable (PrivatePIDs= needs systemd 257, this is {caps.version})")
    out["units"] = ("the system bus socket is inaccessible and /run/user (the user bus) hidden"
                    + ("; the env's uid has no right to manage units" if own_uid else ""))
    out["other_envs"] = ("gestvenv's dirs hidden (TemporaryFileSystem=), the env's own dir "
                         "bound back" + ("; a uid per env" if own_uid else ""))
    out["ipc_uts"] = "PrivateIPC=yes, ProtectHostname=yes"
    out["kernel"] = ("ProtectKernelTunables=, ProtectKernelModules=, ProtectKernelLogs=, "
                     "ProtectClock=, ProtectControlGroups=, RestrictNamespaces=yes")
    if applied is IsolationLevel.CONTAINER:
        out["kernel"] += ", SystemCallFilter=@system-service"
    return in_threat_order(out)


def _isolation_applied(isolation: IsolationLevel,
                       caps: Capabilities) -> tuple[IsolationLevel, list[str]]:
    notes = []
    applied = isolation
    if isolation is IsolationLevel.CHROOT:
        applied = IsolationLevel.CONTAINER
        notes.append("isolation chroot requested; the systemd runtime applies container "
                     "isolation (read-only system, private /tmp and devices, only the env's dir "
                     "writable): it does not change the root directory")
    if applied.rank > IsolationLevel.PROCESS.rank and caps.user and not caps.user_namespaces:
        notes.append(f"isolation {isolation.value} requested; a user manager needs user "
                     "namespaces for it, which this host does not allow: process isolation "
                     "applied")
        applied = IsolationLevel.PROCESS
    return applied, notes


# Capability bits (linux/capability.h) the unit keeps only for setpriv, which drops them all
# (and the bounding set) before the command runs: CAP_SETGID, CAP_SETUID, CAP_SETPCAP.
_SETPRIV_CAPS = (1 << 6) | (1 << 7) | (1 << 8)
SETPRIV = "/usr/bin/setpriv"
# World-writable host mounts that ProtectSystem=strict leaves writable (API file systems), or
# that systemd 252 makes writable again under ProtectProc=invisible (/run, and so the
# world-writable /run/lock: seen in tests/harness/systemd_host). (It also makes ProtectHome's
# empty tmpfs writable, which is private to the unit and harmless; ReadOnlyPaths=/home would
# undo ProtectHome altogether: the hostile probe read the home through it.)
_READ_ONLY = ("/run", "-/dev/mqueue", "-/dev/hugepages")
_SYSTEM_BUS = "-/run/dbus/system_bus_socket"


@dataclass(frozen=True)
class SandboxSpec:
    """What one env's sandbox is made of, decided by the runtime (which looks at the host)."""

    level: IsolationLevel   # applied
    network: bool
    env_path: str
    hide: tuple[str, ...] = ()     # gestvenv's own dirs (cache, snapshots, roots, state): tmpfs
    expose: tuple[str, ...] = ()   # paths under a hidden tree the command needs: read-only binds
    uid: int | None = None         # the command's own uid (root creators), set by setpriv
    # /tmp, /var/tmp -> dirs of the env's own filesystem bound there instead of PrivateTmp
    # (an env with max_disk: what it writes there counts against its cap; diskcap.temp_dirs)
    temp: tuple[tuple[str, str], ...] = ()
    shm_mb: int | None = None      # a size for its private /dev/shm (max_disk), else none


def sandbox_properties(spec: SandboxSpec, caps: Capabilities) -> list[Property]:
    """Namespacing for every unit of the env that runs processes (the holder and commands).

    At namespace isolation and above the command keeps no capability, sees only its own
    processes, its own /tmp, /dev/shm, IPC and hostname, no home directory, none of gestvenv's
    dirs but its env's, a read-only host, and cannot reach the system bus; a root creator's
    command also runs under an unprivileged uid of its own (``spec.uid``, see setpriv_argv).
    """
    props: list[Property] = []
    if caps.user and not caps.user_namespaces:
        # A user manager cannot create namespaces without them (the plan says so); asking
        # would only make every unit of the env fail to start.
        return props
    level, env_path = spec.level, spec.env_path
    needs_userns = caps.user and (level.rank > IsolationLevel.PROCESS.rank or not spec.network)
    if needs_userns:
        props.append(prop("PrivateUsers", True))
    if not spec.network:
        props.append(prop("PrivateNetwork", True))
    if not level.sandboxed:
        return props
    hide = [h for h in dict.fromkeys(spec.hide) if not is_hidden(h)]  # (ProtectHome, PrivateTmp)
    temp = dict(spec.temp)
    props += [
        *([] if temp else [prop("PrivateTmp", True)]),
        prop("PrivateDevices", True), prop("PrivateIPC", True),
        prop("ProtectSystem", "strict"), prop("ProtectHome", "tmpfs"),
        prop("ReadOnlyPaths", list(_READ_ONLY)),
        prop("InaccessiblePaths", [_SYSTEM_BUS]),
        # A private /dev/shm (multiprocessing needs one), then gestvenv's dirs hidden.
        prop("TemporaryFileSystem", [["/dev/shm", "mode=1777" + (
            f",size={spec.shm_mb}M" if spec.shm_mb is not None else "")]] +
            [[h, "mode=0755"] for h in hide]),
        # The env's dir, at its own path (its scripts and pyvenv.cfg name it), over all that.
        prop("BindPaths", [[env_path, env_path, False, 0],
                           *([src, tree, False, 0] for tree, src in temp.items())]),
        prop("ReadWritePaths", [env_path, *temp]),
        prop("ProtectProc", "invisible"),
        prop("ProtectKernelTunables", True), prop("ProtectKernelModules", True),
        prop("ProtectKernelLogs", True), prop("ProtectControlGroups", True),
        prop("ProtectClock", True), prop("ProtectHostname", True),
        prop("NoNewPrivileges", True), prop("RestrictSUIDSGID", True),
        prop("RestrictNamespaces", 0), prop("LockPersonality", True),
        prop("RestrictRealtime", True),
        prop("CapabilityBoundingSet", _SETPRIV_CAPS if spec.uid is not None else 0),
        prop("AmbientCapabilities", 0),
    ]
    if spec.expose:
        props.append(prop("BindReadOnlyPaths",
                          [[p, p, True, 0] for p in dict.fromkeys(spec.expose)]))
    if caps.version >= 257:
        props.append(prop("PrivatePIDs", "yes"))
    if level.rank >= IsolationLevel.CONTAINER.rank:
        # The system calls of an ordinary service only (no mount, swap, reboot, modules, raw
        # I/O, clock, kexec...): what a container runtime's default seccomp profile also does.
        # A call outside it fails with EPERM, as a container runtime's profile does: the
        # command sees an ordinary error, not a SIGSYS death.
        props += [prop("SystemCallFilter", [True, ["@system-service"]]),
                  prop("SystemCallErrorNumber", 1),
                  prop("SystemCallArchitectures", ["native"])]
    return props


def setpriv_argv(uid: int) -> list[str]:
    """The prefix that runs a command as ``uid`` (and gid ``uid``), with no supplementary group,
    no capability (effective, inheritable, ambient or bounding) and no way to regain one."""
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]


def slice_properties(names: UnitNames, env_name: str, limits: ResourceLimits,
                     caps: Capabilities) -> list[Property]:
    props = [prop("Description", f"gestvenv environment {env_name}: all its processes"),
             prop("StopWhenUnneeded", True),
             prop("MemoryAccounting", True), prop("TasksAccounting", True),
             prop("CPUAccounting", True)]
    if limits.max_memory is not None and "memory" in caps.controllers:
        # Swap off for the env: a memory limit that spills to swap is no limit.
        props += [prop("MemoryMax", limits.max_memory * MB), prop("MemorySwapMax", 0)]
    if limits.max_cpu_percent is not None and "cpu" in caps.controllers:
        props.append(prop("CPUQuotaPerSecUSec",
                          max(1000, round(limits.max_cpu_percent * USEC / 100))))
    if limits.max_processes is not None and "pids" in caps.controllers:
        props.append(prop("TasksMax", limits.max_processes))
    if not limits.network_access and not caps.user:
        # A BPF filter on the slice's cgroup: every address but loopback. The env's units have
        # a network namespace of their own (PrivateNetwork), so loopback is the env's own lo:
        # its commands reach each other, never the host's.
        props += [prop("IPAddressDeny", [[2, bytes(4), 0], [10, bytes(16), 0]]),
                  prop("IPAddressAllow", [[2, bytes([127, 0, 0, 0]), 8],
                                          [10, bytes(15) + b"\x01", 128]])]
    return props


# What a claim may change on a running pool unit's slice (SetUnitProperties, runtime): its
# Description and the cgroup limits, which systemd applies live. Nothing of the env's own unit
# but its Description can change once it runs (RuntimeMaxSec included): see pool_key.
LIVE_SLICE_PROPERTIES = frozenset({"Description", "MemoryMax", "MemorySwapMax",
                                   "CPUQuotaPerSecUSec", "TasksMax", "IPAddressDeny",
                                   "IPAddressAllow"})


def live_slice_properties(names: UnitNames, env_name: str, limits: ResourceLimits,
                          caps: Capabilities) -> list[Property]:
    """What claiming a pool unit sets on its slice: the env's limits, and its name."""
    return [p for p in slice_properties(names, env_name, limits, caps)
            if p[0] in LIVE_SLICE_PROPERTIES]


POOL_PATH = "/gestvenv-pool-env"  # (stands for the env's dir in pool_key: each unit has its own)


def pool_key(*, interpreter: str, backend: str, root: str, user: bool,
             sandbox: Sequence[Property]) -> str:
    """What a pool unit has that cannot change once it runs, as one string: two requests
    with the same key get the same env unit but for live-settable properties (its slice's
    limits, Descriptions), so one's pool unit can serve the other. ``sandbox``: the env's
    sandbox properties computed for the dir :data:`POOL_PATH` (the holder joins them)."""
    import hashlib
    import json

    text = json.dumps([interpreter, backend, root, user,
                       [[k, s, _plain(v)] for k, s, v in sandbox]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class HolderArgs:
    """How the env's own unit runs gestvenv's holder (``gestvenv.holder``) and, as its stop
    action, gestvenv's reaper (``gestvenv.reaper``)."""

    python: str
    script: str  # gestvenv/holder.py
    state_file: str
    env_id: str
    owner_pid: int | None = None
    owner_start: float | None = None
    idle_timeout: int | None = None
    reaper: str = ""         # gestvenv/reaper.py
    env_path: str = ""       # the env's storage dir, as created: the reaper never reads it
    registry_lock: str = ""  # from the state file
    environ: tuple[str, ...] = ()  # more of the unit's variables (the container engine's)
    pool: bool = False       # a pool unit: ``state_file`` is its pool file (holder --pool)
    # An extendable TTL (gestvenv.ttl): the holder holds it, from the state file.
    expires_at: float | None = None


def env_properties(names: UnitNames, env_name: str, description: str, ttl: int | None,
                   holder: HolderArgs, sandbox: Sequence[Property]) -> list[Property]:
    # Run as a file with -I: the holder needs only the standard library, not gestvenv's
    # dependencies (which the interpreter may not see), nor anyone's PYTHONPATH.
    argv = [holder.python, "-I", "-S", "-B", holder.script, "--slice", names.slice,
            "--state-file", holder.state_file, "--env-id", holder.env_id]
    if holder.owner_pid is not None:
        argv += ["--owner-pid", str(holder.owner_pid),
                 "--owner-start", repr(holder.owner_start or 0.0)]
    if holder.idle_timeout:
        argv += ["--idle-timeout", str(holder.idle_timeout)]
    if holder.expires_at is not None:
        argv += ["--expires-at", repr(holder.expires_at)]
    if holder.pool:
        argv += ["--pool"]
    if holder.reaper:
        argv += ["--env-path", holder.env_path, "--registry-lock", holder.registry_lock]
    props = [
        prop("Description", env_description(env_name, description, holder.env_id)),
        prop("Environment", [f"{UNIT_ENV_ID}={holder.env_id}",
                             f"{UNIT_STATE_FILE}={holder.state_file}", *holder.environ]),
        prop("Slice", PARENT_SLICE),
        prop("BindsTo", [names.slice]),
        prop("ExecStart", exec_start(argv)),
        prop("Type", "exec"),
        prop("CollectMode", "inactive-or-failed"),
        prop("TimeoutStopUSec", ENV_STOP_TIMEOUT_USEC),
        prop("MemoryAccounting", True),
        # Started once: a command started in the instant after the TTL (its BindsTo= would
        # pull the env's unit up again) must not give the env a second life.
        prop("StartLimitBurst", 1),
        prop("StartLimitIntervalUSec", 2**64 - 1),
    ]
    if holder.reaper:
        # Whoever stops the unit (TTL, holder, systemctl, cleanup, shutdown), the files go
        # with it. The holder reaps on its way out; this runs the reaper again only if
        # something is left (the holder was killed, or the start failed), so that the usual
        # stop does not pay for a second Python (-S: no site, only the standard library).
        props.append(prop("ExecStopPost", exec_start(reap_if_left(holder))))
    if ttl:
        props.append(prop("RuntimeMaxUSec", ttl * USEC))
    # The holder carries the env's namespaces (private network, /tmp) for its commands to join.
    shared = [p for p in sandbox if p[0] in SHARED_NAMESPACES] if shares_namespaces(sandbox) \
        else []
    if any(p[0] == "PrivateTmp" for p in shared):
        # Its scripts, the env's state file and storage root may sit under /tmp or /var/tmp
        # (a checkout, a test run), which a private /tmp hides; the reaper runs in there too.
        keep = [p for p in (holder.script, holder.reaper) if p]
        shared.append(prop("BindReadOnlyPaths", [[p, p, True, 0] for p in keep]))
        # The registry (its lock and the state files) and the storage root: the reaper writes
        # there.
        registry = os.path.dirname(holder.registry_lock) if holder.registry_lock \
            else os.path.dirname(holder.state_file)
        writable = [registry]
        if holder.env_path:
            writable.append(os.path.dirname(holder.env_path))
        shared.append(prop("BindPaths", [[p, p, True, 0] for p in dict.fromkeys(writable)]))
    props += shared
    return props


def reap_if_left(holder: HolderArgs) -> list[str]:
    """The env unit's stop action: ``sh`` checks that the env's dir or state file is still
    there, or (a container env: ``$GESTVENV_CONTAINER_ENGINE`` in the unit's environment) a
    container labelled with its id, then runs the reaper (``$`` is doubled for systemd by
    exec_start). (The holder's own reap can be cut short by this very stop: its ``podman rm``
    gets the stop's SIGTERM and leaves the container, stopped, while the dir and state go.)"""
    script = ('if [ -e "$1" ] || [ -e "$2" ] || { [ -n "$GESTVENV_CONTAINER_ENGINE" ] && '
              '[ -n "$("$GESTVENV_CONTAINER_ENGINE" ps -a -q --filter "label='
              f'{reaper.CONTAINER_LABEL}=$5")" ]; }}; '
              'then exec "$3" -I -S -B "$4" "$1" "$5" "$2" "$6"; fi')
    return ["/bin/sh", "-c", script, "gestvenv-reap", holder.env_path, holder.state_file,
            holder.python, holder.reaper, holder.env_id, holder.registry_lock]


def unit_keeps_figures(caps: Capabilities) -> bool:
    """Whether a command's service still tells its peak memory and CPU time once it has
    ended (AddRef holds it): systemd 256 caches both (MemoryPeak, CPUUsageNSec) as it removes
    the cgroup. systemd 252 forgets them with its cgroup (seen in tests/harness/systemd_host):
    there the runtime measures the env's slice around the command (cgroups.Meter)."""
    return caps.version >= 256


def command_properties(names: UnitNames, env_name: str, argv: Sequence[str],
                       environ: Mapping[str, str], cwd: str, timeout: float | None,
                       sandbox: Sequence[Property], fds: Mapping[str, int],
                       program: str | None = None) -> list[Property]:
    """A command's unit. ``fds`` maps stdin/stdout/stderr to indexes in the message's fds;
    ``program`` is the absolute path to execute (default: argv[0])."""
    text = shlex.join(argv)
    if len(text) > 200:
        text = text[:197] + "..."
    props = [
        prop("Description", f"gestvenv {env_name}: {text}"),
        prop("Slice", names.slice),
        prop("BindsTo", [names.env]),
        prop("After", [names.env]),
        prop("ExecStart", exec_start(argv, program)),
        prop("Type", "exec"),
        prop("WorkingDirectory", cwd),
        prop("Environment", unit_environment(environ)),
        prop("AddRef", True),  # results stay readable until we have read them
        prop("CollectMode", "inactive-or-failed"),
        prop("TimeoutStopUSec", STOP_TIMEOUT_USEC),
    ]
    if timeout is not None:
        props.append(prop("RuntimeMaxUSec", max(1, math.ceil(timeout * USEC))))
    if "stdin" in fds:
        props.append(prop("StandardInputFileDescriptor", fds["stdin"]))
    else:
        props.append(prop("StandardInput", "null"))
    if "stdout" in fds:
        props.append(prop("StandardOutputFileDescriptor", fds["stdout"]))
    if "stderr" in fds:
        props.append(prop("StandardErrorFileDescriptor", fds["stderr"]))
    if shares_namespaces(sandbox):
        props.append(prop("JoinsNamespaceOf", [names.env]))  # one network and /tmp per env
    props += sandbox
    return props


def command_time_limit(timeout: float | None, expires_at: float | None,
                       now: float) -> float | None:
    """A command unit's RuntimeMaxSec: the command's own ``timeout`` and, for an env whose
    unit cannot hold its TTL (a pooled env: its unit's RuntimeMaxSec was set before it was
    claimed), the time left to ``expires_at``, whichever ends first. Then systemd ends every
    command at the TTL even if the holder, which ends the env itself, was stopped by one of
    them (its files wait for the pool unit's backstop). None: no limit."""
    left = None if expires_at is None else max(expires_at - now, 0.001)
    if timeout is None:
        return left
    return timeout if left is None else min(timeout, left)


def command_end(expires_at: float | None, pooled: bool,
                extendable_until: float | None) -> float | None:
    """The ``expires_at`` a command unit's limit (:func:`command_time_limit`) is held to: for
    an extendable TTL (max_ttl), its backstop, ``extendable_until``, since the TTL, held by the
    holder, may move later while the command runs; else a pooled env's TTL; else None (the
    env's unit's RuntimeMaxSec ends its commands with it)."""
    if extendable_until is not None:
        return extendable_until
    return expires_at if pooled else None


def shares_namespaces(sandbox: Sequence[Property]) -> bool:
    """Whether the env's units share one network and /tmp (JoinsNamespaceOf= its own unit).

    Not under a user manager: there every unit has a user namespace of its own (PrivateUsers),
    and systemd 257, failing to join another unit's network namespace from it, silently leaves
    the command in the host's (seen in tests/harness/vm). Each command then gets its own.
    """
    names = {p[0] for p in sandbox}
    return "PrivateUsers" not in names and bool(names & {"PrivateNetwork", "PrivateTmp"})


def exec_start(argv: Sequence[str], program: str | None = None) -> list[Any]:
    """An ExecStart=/ExecStopPost= value that runs ``argv`` exactly as given: systemd expands
    ``$VAR`` in arguments at exec time and turns ``$$`` into ``$``, so every ``$`` is doubled.
    ``program`` is the path to execute (default: argv[0]); it is not expanded."""
    return [[program or argv[0], [a.replace("$", "$$") for a in argv], False]]


_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def unit_environment(environ: Mapping[str, str]) -> list[str]:
    """``K=V`` assignments systemd accepts; others (odd names, control characters) are left
    out, as systemd would refuse the whole unit for one of them."""
    out = []
    for key, value in environ.items():
        if not _ENV_NAME_RE.fullmatch(key):
            continue
        if any(ord(c) < 32 and c not in "\t\n" for c in value) or "\x7f" in value:
            continue
        try:
            value.encode()  # undecodable bytes (surrogate escapes): systemd takes UTF-8 only
        except UnicodeEncodeError:
            continue
        out.append(f"{key}={value}")
    return out


def parent_slice_properties(max_total_memory_mb: int | None,
                            caps: Capabilities) -> list[Property]:
    props = [prop("Description", "gestvenv ephemeral environments"),
             prop("MemoryAccounting", True), prop("TasksAccounting", True)]
    if max_total_memory_mb and "memory" in caps.controllers:
        props.append(prop("MemoryMax", max_total_memory_mb * MB))
    return props


def exit_status(exec_main_code: int, exec_main_status: int) -> int:
    """ExecMainCode/ExecMainStatus as a subprocess returncode (-N for signal N)."""
    # CLD_EXITED = 1, CLD_KILLED = 2, CLD_DUMPED = 3
    if exec_main_code in (2, 3):
        return -exec_main_status
    return exec_main_status
