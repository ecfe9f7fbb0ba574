"""The systemd runtime's pure layers: the plan (limits and isolation as unit properties) and the
bus façade's helpers (object paths, error translation). No bus, no systemd."""

from __future__ import annotations

import shlex
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_next.errors import DBusError
from dbus_next.signature import Variant

from gestvenv.exceptions import GestvenvError, RuntimeUnavailableError, SystemdError
from gestvenv.models import NOT_HELD, THREATS, IsolationLevel, ResourceLimits
from gestvenv.names import MAX_NAME_LENGTH, validate_name
from gestvenv.runtime.systemd import bus, plan
from gestvenv.runtime.systemd.plan import (
    PARENT_SLICE,
    SIGNATURES,
    Capabilities,
    HolderArgs,
    Property,
    UnitNames,
)

ENV = "ci-test"
ENV_PATH = "/run/gestvenv/envs/ci-test"
ALL_CONTROLLERS = frozenset({"cpu", "memory", "pids"})

CAPS = {
    "system-v1-hybrid": Capabilities(user=False, controllers=ALL_CONTROLLERS, cgroup_v2=False),
    "user-no-controllers": Capabilities(user=True, controllers=frozenset(), cgroup_v2=True,
                                        bpf_firewall=False),
    "user-v2-full": Capabilities(user=True, controllers=ALL_CONTROLLERS, cgroup_v2=True,
                                 bpf_firewall=False),
    "user-no-userns": Capabilities(user=True, controllers=ALL_CONTROLLERS, cgroup_v2=True,
                                   bpf_firewall=False, user_namespaces=False),
}
SYSTEM = CAPS["system-v1-hybrid"]
USER_FULL = CAPS["user-v2-full"]
USER_BARE = CAPS["user-no-controllers"]
USER_NO_USERNS = CAPS["user-no-userns"]

LIMITS = {
    "none": ResourceLimits(),
    "all-set": ResourceLimits(max_memory=64, max_disk=100, max_processes=5, max_cpu_percent=20,
                              network_access=False),
    "network-off": ResourceLimits(network_access=False),
}

HOLDER = HolderArgs(python="/usr/bin/python3", script="/opt/gestvenv/site/gestvenv/holder.py",
                    state_file="/run/gestvenv/envs/ci-test.json", env_id="abc12345ff",
                    owner_pid=4242, owner_start=1700000000.25, idle_timeout=30,
                    reaper="/opt/gestvenv/site/gestvenv/reaper.py",
                    env_path="/var/cache/gestvenv/envs/ci-test-abc12345",
                    registry_lock="/run/gestvenv/registry.lock")
FDS = {"stdin": 0, "stdout": 1, "stderr": 2}


def as_dict(props: list[Property]) -> dict[str, Any]:
    names = [p[0] for p in props]
    assert len(names) == len(set(names)), f"duplicate properties: {names}"
    return {name: value for name, _sig, value in props}


def sandbox(level: IsolationLevel, caps: Capabilities, network: bool = True) -> list[Property]:
    return plan.sandbox_properties(plan.SandboxSpec(level, network, ENV_PATH), caps)


def command(timeout: float | None = None, fds: dict[str, int] | None = None,
            argv: list[str] | None = None, box: list[Property] | None = None,
            environ: dict[str, str] | None = None) -> dict[str, Any]:
    return as_dict(plan.command_properties(
        UnitNames.of(ENV), ENV, argv or ["python", "-c", "print(1)"], environ or {"A": "1"},
        "/work", timeout, box or [], FDS if fds is None else fds))


def env_unit(ttl: int | None = 60, holder: HolderArgs = HOLDER,
             box: list[Property] | None = None) -> dict[str, Any]:
    return as_dict(plan.env_properties(UnitNames.of(ENV), ENV, "python 3.12, tmpfs storage",
                                       ttl, holder, box or []))


def slice_unit(limits: ResourceLimits, caps: Capabilities) -> dict[str, Any]:
    return as_dict(plan.slice_properties(UnitNames.of(ENV), ENV, limits, caps))


# --- every property is well-typed ---

def every_unit(limits: ResourceLimits, isolation: IsolationLevel,
               caps: Capabilities) -> dict[str, list[Property]]:
    """All the property lists the runtime would send for one environment (as runtime.py does:
    the sandbox follows the isolation applied, not the one requested)."""
    names = UnitNames.of(ENV)
    applied = plan.enforcement(limits, isolation, caps).isolation_applied
    box = plan.sandbox_properties(plan.SandboxSpec(applied, limits.network_access, ENV_PATH), caps)
    bare_holder = HolderArgs(python="py", script="h.py", state_file="s", env_id="e")
    return {
        "parent": plan.parent_slice_properties(1024, caps),
        "parent-unlimited": plan.parent_slice_properties(None, caps),
        "slice": plan.slice_properties(names, ENV, limits, caps),
        "env": plan.env_properties(names, ENV, "desc", 60, HOLDER, box),
        "env-no-ttl": plan.env_properties(names, ENV, "desc", None, bare_holder, box),
        "command": plan.command_properties(names, ENV, ["python", "-V"], {"A": "1"}, "/",
                                           1.5, box, FDS),
        "command-no-fds": plan.command_properties(names, ENV, ["true"], {}, "/", None, box, {}),
    }


@pytest.mark.parametrize("caps_key", CAPS)
@pytest.mark.parametrize("isolation", list(IsolationLevel))
@pytest.mark.parametrize("limits_key", LIMITS)
def test_every_property_has_its_declared_signature_and_a_matching_value(
        limits_key: str, isolation: IsolationLevel, caps_key: str) -> None:
    units = every_unit(LIMITS[limits_key], isolation, CAPS[caps_key])
    for unit, props in units.items():
        as_dict(props)  # no property twice in one unit
        for entry in props:
            assert len(entry) == 3, (unit, entry)
            name, sig, value = entry
            assert name in SIGNATURES, (unit, name)
            assert sig == SIGNATURES[name], (unit, name, sig)
            Variant(sig, value)  # raises if the value does not fit the signature
        assert len(bus.variants(props)) == len(props)


def test_variant_check_is_live() -> None:
    """The matrix above relies on Variant validating; make sure it does."""
    for sig, value in [("t", 1.5), ("t", -1), ("b", 1), ("as", "x"), ("a(ssbt)", [["a", "b"]])]:
        with pytest.raises(Exception):  # noqa: B017, PT011 - dbus-next's own mismatch error
            Variant(sig, value)


def test_prop_uses_the_declared_signature_and_refuses_unknown_names() -> None:
    assert plan.prop("MemoryMax", 5) == ("MemoryMax", "t", 5)
    assert plan.prop("ExecStart", []) == ("ExecStart", "a(sasb)", [])
    with pytest.raises(KeyError):
        plan.prop("MemoryLimit", 5)


# The types systemd itself declares for these properties (org.freedesktop.systemd1(5)); a
# signature changed by mistake in SIGNATURES would pass the matrix above but fail on the bus.
SYSTEMD_TYPES = {
    "s": ["Description", "Slice", "Type", "WorkingDirectory", "StandardInput", "CollectMode",
          "KillMode", "ProtectSystem", "ProtectHome", "ProtectProc", "PrivatePIDs"],
    "b": ["AddRef", "StopWhenUnneeded", "SendSIGKILL", "MemoryAccounting", "CPUAccounting",
          "TasksAccounting", "IPAccounting", "PrivateNetwork", "PrivateUsers", "PrivateTmp",
          "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
          "ProtectControlGroups", "NoNewPrivileges", "RestrictSUIDSGID", "PrivateIPC",
          "ProtectHostname", "ProtectKernelLogs", "ProtectClock",
          "LockPersonality", "RestrictRealtime"],
    "t": ["RuntimeMaxUSec", "TimeoutStopUSec", "MemoryMax", "MemorySwapMax",
          "CPUQuotaPerSecUSec", "TasksMax", "StartLimitIntervalUSec", "CapabilityBoundingSet",
          "AmbientCapabilities", "RestrictNamespaces"],
    "i": ["SystemCallErrorNumber"],
    "u": ["StartLimitBurst"],
    "h": ["StandardInputFileDescriptor", "StandardOutputFileDescriptor",
          "StandardErrorFileDescriptor"],
    "as": ["Environment", "BindsTo", "After", "JoinsNamespaceOf", "ReadWritePaths",
           "ReadOnlyPaths", "InaccessiblePaths", "SystemCallArchitectures"],
    "a(ss)": ["TemporaryFileSystem"],
    "(bas)": ["SystemCallFilter"],
    "a(sasb)": ["ExecStart", "ExecStopPost"],
    "a(iayu)": ["IPAddressDeny", "IPAddressAllow"],
    "a(ssbt)": ["BindPaths", "BindReadOnlyPaths"],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signatures_match_systemds_property_types(name: str) -> None:
    declared = {prop: sig for sig, props in SYSTEMD_TYPES.items() for prop in props}
    assert SIGNATURES[name] == declared[name]


def test_signatures_are_valid_dbus_signatures() -> None:
    from dbus_next.signature import SignatureTree

    for name, sig in SIGNATURES.items():
        tree = SignatureTree(sig)
        assert len(tree.types) == 1, name  # one complete type each: a variant holds one value


# --- limits -> slice properties ---

def test_memory_limit_caps_memory_and_disables_swap() -> None:
    props = slice_unit(ResourceLimits(max_memory=64), SYSTEM)
    assert props["MemoryMax"] == 64 * 2**20
    assert props["MemorySwapMax"] == 0
    assert props["MemoryAccounting"] is True


@pytest.mark.parametrize(("percent", "usec"), [(20, 200_000), (150, 1_500_000), (100, 1_000_000),
                                               (0.5, 5_000), (12.5, 125_000)])
def test_cpu_percent_becomes_quota_per_second(percent: float, usec: int) -> None:
    props = slice_unit(ResourceLimits(max_cpu_percent=percent), SYSTEM)
    assert props["CPUQuotaPerSecUSec"] == usec
    assert isinstance(props["CPUQuotaPerSecUSec"], int)


def test_process_limit_becomes_tasks_max() -> None:
    assert slice_unit(ResourceLimits(max_processes=5), USER_FULL)["TasksMax"] == 5


def test_no_limits_no_limit_properties() -> None:
    props = slice_unit(ResourceLimits(), SYSTEM)
    for name in ("MemoryMax", "MemorySwapMax", "CPUQuotaPerSecUSec", "TasksMax", "IPAddressDeny"):
        assert name not in props
    assert props["StopWhenUnneeded"] is True
    assert ENV in props["Description"]


@pytest.mark.parametrize(("limits", "missing", "controllers"), [
    (ResourceLimits(max_memory=64), ("MemoryMax", "MemorySwapMax"), {"cpu", "pids"}),
    (ResourceLimits(max_cpu_percent=20), ("CPUQuotaPerSecUSec",), {"memory", "pids"}),
    (ResourceLimits(max_processes=5), ("TasksMax",), {"cpu", "memory"}),
])
def test_no_limit_property_without_its_controller(limits: ResourceLimits, missing: tuple[str, ...],
                                                  controllers: set[str]) -> None:
    caps = Capabilities(user=True, controllers=frozenset(controllers), cgroup_v2=True)
    props = slice_unit(limits, caps)
    for name in missing:
        assert name not in props
    assert set(missing) <= set(slice_unit(limits, USER_FULL))  # and there with the controller


def test_no_network_on_the_system_manager_firewalls_the_slice_and_privatizes_the_units() -> None:
    limits = ResourceLimits(network_access=False)
    deny = slice_unit(limits, SYSTEM)["IPAddressDeny"]
    assert sorted((family, bytes(addr), prefix) for family, addr, prefix in deny) == sorted(
        [(socket.AF_INET, bytes(4), 0), (socket.AF_INET6, bytes(16), 0)])  # 0.0.0.0/0 and ::/0
    box = sandbox(IsolationLevel.PROCESS, SYSTEM, network=False)
    assert env_unit(box=box)["PrivateNetwork"] is True
    cmd = command(box=box)
    assert cmd["PrivateNetwork"] is True
    assert cmd["JoinsNamespaceOf"] == [UnitNames.of(ENV).env]
    assert "PrivateUsers" not in cmd  # the system manager needs no user namespace


def test_no_network_on_a_user_manager_uses_user_namespaces_and_no_firewall() -> None:
    limits = ResourceLimits(network_access=False)
    assert "IPAddressDeny" not in slice_unit(limits, USER_FULL)
    box = sandbox(IsolationLevel.PROCESS, USER_FULL, network=False)
    cmd = command(box=box)
    assert cmd["PrivateUsers"] is True
    assert cmd["PrivateNetwork"] is True
    # Each unit has its own user namespace, from which systemd cannot join another unit's
    # network: every command gets its own, and the holder none.
    assert "JoinsNamespaceOf" not in cmd
    assert "PrivateNetwork" not in env_unit(box=box)


def test_network_allowed_no_network_properties() -> None:
    for caps in CAPS.values():
        box = sandbox(IsolationLevel.PROCESS, caps)
        assert box == []
        assert "IPAddressDeny" not in slice_unit(ResourceLimits(), caps)
        assert "JoinsNamespaceOf" not in command(box=box)


def test_parent_slice_memory_cap_needs_a_value_and_the_controller() -> None:
    assert as_dict(plan.parent_slice_properties(512, SYSTEM))["MemoryMax"] == 512 * 2**20
    assert "MemoryMax" not in as_dict(plan.parent_slice_properties(None, SYSTEM))
    assert "MemoryMax" not in as_dict(plan.parent_slice_properties(512, USER_BARE))


# --- enforcement ---

ALL_LIMITS = LIMITS["all-set"]


@pytest.mark.parametrize(("key", "controller"), [("max_memory", "memory"),
                                                 ("max_cpu_percent", "cpu"),
                                                 ("max_processes", "pids")])
def test_a_missing_controller_is_reported_unenforced_by_name(key: str, controller: str) -> None:
    caps = Capabilities(user=True, controllers=ALL_CONTROLLERS - {controller}, cgroup_v2=True)
    status = plan.enforcement(ALL_LIMITS, IsolationLevel.PROCESS, caps).limits[key]
    assert status.enforced is False
    assert f"{controller} controller" in status.mechanism
    assert "user manager" in status.mechanism
    assert status.requested == getattr(ALL_LIMITS, key)
    others = set(plan.enforcement(ALL_LIMITS, IsolationLevel.PROCESS, caps).unenforced)
    assert others == {key}


@pytest.mark.parametrize("caps", [SYSTEM, USER_FULL], ids=["system", "user"])
def test_all_limits_enforced_with_every_controller(caps: Capabilities) -> None:
    result = plan.enforcement(ALL_LIMITS, IsolationLevel.PROCESS, caps)
    assert result.runtime == "systemd"
    assert set(result.limits) == {"max_memory", "max_cpu_percent", "max_processes",
                                  "network_access"}
    assert set(result.unenforced) == set()
    assert "MemoryMax=64M" in result.limits["max_memory"].mechanism
    assert "CPUQuota=20%" in result.limits["max_cpu_percent"].mechanism
    assert "TasksMax=5" in result.limits["max_processes"].mechanism


@pytest.mark.parametrize("caps", list(CAPS.values()), ids=list(CAPS))
def test_the_disk_limit_is_not_a_unit_property(caps: Capabilities) -> None:
    # The storage's own filesystem holds it (gestvenv.diskcap), whatever the runtime.
    status = plan.enforcement(ResourceLimits(max_disk=100), IsolationLevel.PROCESS, caps)
    assert "max_disk" not in status.limits


def test_nothing_requested_nothing_reported() -> None:
    result = plan.enforcement(ResourceLimits(), IsolationLevel.PROCESS, SYSTEM)
    assert result.limits == {}
    assert result.notes == ()
    assert result.isolation_applied is IsolationLevel.PROCESS


def test_network_enforcement_depends_on_the_manager() -> None:
    limits = ResourceLimits(network_access=False)

    def net(caps: Capabilities) -> Any:
        return plan.enforcement(limits, IsolationLevel.PROCESS, caps).limits["network_access"]

    assert net(SYSTEM).enforced is True
    assert "IPAddressDeny" in net(SYSTEM).mechanism
    assert net(USER_FULL).enforced is True
    assert "PrivateUsers" in net(USER_FULL).mechanism
    assert net(USER_NO_USERNS).enforced is False
    assert "user namespaces" in net(USER_NO_USERNS).mechanism


@pytest.mark.parametrize("caps", list(CAPS.values()), ids=list(CAPS))
def test_chroot_is_applied_as_container_with_a_note(caps: Capabilities) -> None:
    result = plan.enforcement(ResourceLimits(), IsolationLevel.CHROOT, caps)
    assert result.isolation_requested is IsolationLevel.CHROOT
    expected = IsolationLevel.PROCESS if caps is USER_NO_USERNS else IsolationLevel.CONTAINER
    assert result.isolation_applied is expected
    assert any("chroot" in note for note in result.notes)


@pytest.mark.parametrize("level", [IsolationLevel.NAMESPACE, IsolationLevel.CONTAINER])
def test_user_manager_without_user_namespaces_falls_back_to_process(
        level: IsolationLevel) -> None:
    result = plan.enforcement(ResourceLimits(), level, USER_NO_USERNS)
    assert result.isolation_requested is level
    assert result.isolation_applied is IsolationLevel.PROCESS
    assert len(result.notes) == 1
    assert "user namespaces" in result.notes[0]
    assert level.value in result.notes[0]


@pytest.mark.parametrize("level", list(IsolationLevel)[:3])
@pytest.mark.parametrize("caps", [SYSTEM, USER_FULL], ids=["system", "user"])
def test_supported_isolation_is_applied_as_requested(level: IsolationLevel,
                                                     caps: Capabilities) -> None:
    result = plan.enforcement(ResourceLimits(), level, caps)
    assert result.isolation_applied is level
    assert result.notes == ()


# --- isolation -> sandbox ---

@pytest.mark.parametrize("caps", list(CAPS.values()), ids=list(CAPS))
def test_process_isolation_has_no_sandbox(caps: Capabilities) -> None:
    assert sandbox(IsolationLevel.PROCESS, caps) == []


@pytest.mark.parametrize("caps", [SYSTEM, USER_FULL], ids=["system", "user"])
def test_namespace_isolation(caps: Capabilities) -> None:
    props = as_dict(sandbox(IsolationLevel.NAMESPACE, caps))
    for name in ("PrivateTmp", "PrivateDevices", "PrivateIPC", "NoNewPrivileges",
                 "RestrictSUIDSGID", "ProtectKernelTunables", "ProtectKernelModules",
                 "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
                 "LockPersonality", "RestrictRealtime"):
        assert props[name] is True, name
    assert props["ProtectSystem"] == "strict"
    assert props["ProtectHome"] == "tmpfs"
    assert props["ProtectProc"] == "invisible"
    assert props["RestrictNamespaces"] == 0  # none allowed
    assert props["CapabilityBoundingSet"] == 0 and props["AmbientCapabilities"] == 0
    # /run read-only again: systemd 252 leaves it writable under ProtectProc=invisible.
    assert "/run" in props["ReadOnlyPaths"]
    assert props["InaccessiblePaths"] == ["-/run/dbus/system_bus_socket"]
    assert props["TemporaryFileSystem"] == [["/dev/shm", "mode=1777"]]
    assert props["BindPaths"] == [[ENV_PATH, ENV_PATH, False, 0]]
    assert props["ReadWritePaths"] == [ENV_PATH]
    assert ("PrivateUsers" in props) is caps.user  # a user manager needs a user namespace
    assert "PrivateNetwork" not in props
    assert "PrivatePIDs" not in props  # systemd 257 only
    assert "SystemCallFilter" not in props


def test_a_root_creators_sandbox_keeps_only_what_setpriv_needs() -> None:
    spec = plan.SandboxSpec(IsolationLevel.NAMESPACE, True, ENV_PATH, uid=1879048200,
                            hide=("/var/cache/gestvenv", "/tmp/x"),
                            expose=("/root/.pyenv/versions/3.11.7",))
    props = as_dict(plan.sandbox_properties(spec, SYSTEM))
    assert props["CapabilityBoundingSet"] == (1 << 6) | (1 << 7) | (1 << 8)
    # gestvenv's dirs hidden, but those under a tree hidden anyway (/tmp: PrivateTmp).
    assert props["TemporaryFileSystem"] == [["/dev/shm", "mode=1777"],
                                            ["/var/cache/gestvenv", "mode=0755"]]
    assert props["BindReadOnlyPaths"] == [["/root/.pyenv/versions/3.11.7"] * 2 + [True, 0]]
    argv = plan.setpriv_argv(1879048200)
    assert argv[0] == plan.SETPRIV and argv[-1] == "--"
    for option in ("--reuid=1879048200", "--regid=1879048200", "--clear-groups",
                   "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"):
        assert option in argv


def test_a_capped_envs_temp_dirs_replace_private_tmp() -> None:
    temp = (("/tmp", f"{ENV_PATH}/.gestvenv-tmp"), ("/var/tmp", f"{ENV_PATH}/.gestvenv-var-tmp"))
    spec = plan.SandboxSpec(IsolationLevel.NAMESPACE, True, ENV_PATH, uid=1879048200, temp=temp,
                            shm_mb=20)
    props = as_dict(plan.sandbox_properties(spec, SYSTEM))
    assert props["TemporaryFileSystem"][0] == ["/dev/shm", "mode=1777,size=20M"]
    # Not PrivateTmp, which would put them on the host's /tmp disk, out of the cap.
    assert "PrivateTmp" not in props
    assert props["BindPaths"] == [[ENV_PATH, ENV_PATH, False, 0],
                                  [f"{ENV_PATH}/.gestvenv-tmp", "/tmp", False, 0],
                                  [f"{ENV_PATH}/.gestvenv-var-tmp", "/var/tmp", False, 0]]
    assert props["ReadWritePaths"] == [ENV_PATH, "/tmp", "/var/tmp"]
    uncapped = as_dict(plan.sandbox_properties(plan.SandboxSpec(
        IsolationLevel.NAMESPACE, True, ENV_PATH, uid=1879048200), SYSTEM))
    assert uncapped["PrivateTmp"] is True and len(uncapped["BindPaths"]) == 1


def test_systemd_257_gives_a_pid_namespace() -> None:
    caps = Capabilities(user=True, controllers=ALL_CONTROLLERS, cgroup_v2=True, version=257)
    props = as_dict(sandbox(IsolationLevel.NAMESPACE, caps))
    assert props["PrivatePIDs"] == "yes"  # a string on 257's bus (seen in the v2 VM)
    held = plan.protections(IsolationLevel.NAMESPACE, caps, None)
    assert held["processes"].startswith("PrivatePIDs=yes")
    old = plan.protections(IsolationLevel.NAMESPACE, USER_FULL, None)
    assert old["processes"].startswith(NOT_HELD)


@pytest.mark.parametrize("caps", [SYSTEM, USER_FULL], ids=["system", "user"])
def test_container_isolation(caps: Capabilities) -> None:
    props = as_dict(sandbox(IsolationLevel.CONTAINER, caps))
    assert props["ProtectSystem"] == "strict"
    assert props["ProtectHome"] == "tmpfs"
    assert props["ReadWritePaths"] == [ENV_PATH]
    assert props["PrivateTmp"] is True
    assert props["BindPaths"] == [[ENV_PATH, ENV_PATH, False, 0]]
    # Calls outside an ordinary service's set fail with EPERM, not a SIGSYS death.
    assert props["SystemCallFilter"] == [True, ["@system-service"]]
    assert props["SystemCallErrorNumber"] == 1


@pytest.mark.parametrize("level", list(IsolationLevel))
@pytest.mark.parametrize("caps", list(CAPS.values()), ids=list(CAPS))
def test_protections_name_every_threat_and_own_up_to_what_is_not_held(
        level: IsolationLevel, caps: Capabilities) -> None:
    held = plan.enforcement(ResourceLimits(), level, caps).protections
    assert list(held) == list(THREATS)
    applied = plan.enforcement(ResourceLimits(), level, caps).isolation_applied
    not_held = {k for k, v in held.items() if v.startswith(NOT_HELD)}
    if applied is IsolationLevel.PROCESS:
        assert {"secrets", "host_writes", "processes", "units", "other_envs"} <= not_held
    elif not caps.user:
        assert not_held == {"network"}  # (network access was not cut off: allowed)
    else:
        assert not_held == {"network", "processes"}  # the user manager's PIDs, before 257
    assert "shared_files" not in not_held


@pytest.mark.parametrize("level", list(IsolationLevel))
@pytest.mark.parametrize("network", [True, False])
@pytest.mark.parametrize("caps", list(CAPS.values()), ids=list(CAPS))
def test_env_unit_gets_only_the_namespace_creating_sandbox(level: IsolationLevel, network: bool,
                                                           caps: Capabilities) -> None:
    box = sandbox(level, caps, network=network)
    props = env_unit(box=box)
    sandboxed = set(props) & {name for name, _, _ in box} - {"BindPaths"}
    shared = {name for name, _, _ in box} & {"PrivateNetwork", "PrivateTmp", "PrivateUsers",
                                             "PrivateIPC"}
    assert sandboxed == (shared if "PrivateUsers" not in shared else set())
    # Its own binds (state, storage root) only: never the commands' view of the system.
    assert ENV_PATH not in [bind[0] for bind in props.get("BindPaths", [])]
    for name in ("ProtectSystem", "ProtectHome", "ReadWritePaths", "PrivateDevices",
                 "NoNewPrivileges"):
        assert name not in props
    cmd = command(box=box)
    for name, _, value in box:  # a command gets all of it
        assert cmd[name] == value
    joins = ("PrivateNetwork" in cmd or "PrivateTmp" in cmd) and "PrivateUsers" not in cmd
    assert ("JoinsNamespaceOf" in cmd) is joins


# --- names ---

def test_unit_names() -> None:
    names = UnitNames.of("ci-test")
    assert names.env == "gestvenv-ci-test.service"
    assert names.slice == "gestvenv-ci\\x2dtest.slice"
    assert names.command("abc") == "gestvenv-ci-test@abc.service"


@pytest.mark.parametrize(("part", "escaped"), [("a", "a"), ("a-b", "a\\x2db"),
                                               ("a.b_c:1", "a.b_c:1"), ("x--y", "x\\x2d\\x2dy"),
                                               ("é", "\\xe9")])
def test_escape_slice_part(part: str, escaped: str) -> None:
    assert plan.escape_slice_part(part) == escaped


@pytest.mark.parametrize("name", ["a", "ci-test", "a.b_c-1", "A9", "env-0123abcd", "x.y.z"])
def test_env_name_of_unit_round_trips(name: str) -> None:
    names = UnitNames.of(name)
    assert names.env.endswith(".service")
    assert names.command("abc").endswith("@abc.service")
    assert plan.env_name_of_unit(names.env) == name
    assert plan.env_name_of_unit(names.command("abc")) is None
    assert plan.env_name_of_unit(names.slice) is None


@pytest.mark.parametrize("unit", ["gestvenv-x@1.service", "gestvenv.slice", "other.service",
                                  "gestvenv-.service", "gestvenv-x.slice", "gestvenv-x.service.x",
                                  "xgestvenv-a.service", "gestvenv-ci\\x2dtest.slice"])
def test_env_name_of_other_units_is_none(unit: str) -> None:
    assert plan.env_name_of_unit(unit) is None


@pytest.mark.parametrize("name", ["a.service", "my.service.v2"])
def test_command_unit_of_a_name_containing_dot_service(name: str) -> None:
    assert UnitNames.of(name).command("abc") == f"gestvenv-{name}@abc.service"


def test_every_valid_name_gives_unit_names_systemd_accepts() -> None:
    name = validate_name("a" + "-" * (MAX_NAME_LENGTH - 1))
    names = UnitNames.of(name)
    for unit in (names.env, names.slice, names.command("0123456789ab")):
        assert len(unit) <= 255, unit


# --- the env's own unit ---

def test_env_unit_properties() -> None:
    names = UnitNames.of(ENV)
    props = env_unit(ttl=90)
    assert props["RuntimeMaxUSec"] == 90 * 1_000_000
    assert props["Slice"] == PARENT_SLICE == "gestvenv.slice"
    assert props["BindsTo"] == [names.slice]
    assert props["CollectMode"] == "inactive-or-failed"
    assert ENV in props["Description"]
    # Which env and which state file (no PYTHONPATH: the holder needs only the stdlib).
    assert props["Environment"] == [f"GESTVENV_UNIT_ENV_ID={HOLDER.env_id}",
                                    f"GESTVENV_UNIT_STATE_FILE={HOLDER.state_file}"]
    ((path, argv, ignore_failure),) = props["ExecStart"]
    assert path == argv[0] == HOLDER.python
    assert ignore_failure is False
    joined = shlex.join(argv)
    assert "-I -S -B /opt/gestvenv/site/gestvenv/holder.py" in joined
    assert f"--slice {shlex.quote(names.slice)}" in joined
    assert f"--state-file {HOLDER.state_file}" in joined
    assert f"--env-id {HOLDER.env_id}" in joined
    assert "--owner-pid 4242" in joined
    assert "--owner-start 1700000000.25" in joined
    assert "--idle-timeout 30" in joined


def test_env_unit_stop_action_is_the_reaper_with_its_own_copy_of_the_path() -> None:
    """The files go with the unit, whoever stops it: the holder reaps on its way out, the stop
    action again if anything is left. The dir to delete is on the unit's own command line (a
    state file edited later cannot redirect it)."""
    props = env_unit(ttl=90)
    argv = props["ExecStart"][0][1]
    assert argv[argv.index("--env-path") + 1] == HOLDER.env_path
    assert argv[argv.index("--registry-lock") + 1] == HOLDER.registry_lock
    ((path, stop_argv, ignore_failure),) = props["ExecStopPost"]
    assert path == stop_argv[0] == "/bin/sh"
    assert ignore_failure is False  # a refusal shows: the unit ends "failed", said in its journal
    # The stop action shares the unit's stop timeout: room to delete a big tree.
    assert props["TimeoutStopUSec"] == plan.ENV_STOP_TIMEOUT_USEC >= 60 * 1_000_000


def test_the_stop_action_runs_the_reaper_only_when_something_is_left(tmp_path: Path) -> None:
    """Run as systemd runs it ($$ back to $), with echo in place of Python."""
    holder = HolderArgs(python="/bin/echo", script="/p/holder.py",
                        state_file=str(tmp_path / "ci.json"), env_id="e" * 32,
                        reaper="/p/reaper.py", env_path=str(tmp_path / "ci-eeeeeeee"),
                        registry_lock="/run/x/registry.lock")
    ((_, argv, _),) = env_unit(holder=holder)["ExecStopPost"]
    as_run = [a.replace("$$", "$") for a in argv]
    nothing = subprocess.run(as_run, capture_output=True, text=True, check=True)
    assert nothing.stdout == ""  # the holder reaped: no second Python
    want = (f"-I -S -B /p/reaper.py {holder.env_path} {holder.env_id} {holder.state_file} "
            f"{holder.registry_lock}\n")
    Path(holder.env_path).mkdir()
    assert subprocess.run(as_run, capture_output=True, text=True).stdout == want
    Path(holder.env_path).rmdir()
    Path(holder.state_file).write_text("{}")
    assert subprocess.run(as_run, capture_output=True, text=True).stdout == want


def test_env_unit_without_a_reaper_has_no_stop_action() -> None:
    bare = HolderArgs(python="py", script="/p/holder.py", state_file="/s", env_id="e")
    assert "ExecStopPost" not in env_unit(holder=bare)


def test_a_private_tmp_still_shows_the_env_unit_its_scripts_state_and_storage_root() -> None:
    """The holder and the reaper run in the env unit's namespaces: a private /tmp must not
    hide what they read or delete (a checkout, state and storage under /tmp in a test run)."""
    holder = HolderArgs(python="py", script="/tmp/co/gestvenv/holder.py",
                        state_file="/tmp/run/envs/x.json", env_id="e" * 32,
                        reaper="/tmp/co/gestvenv/reaper.py", env_path="/tmp/envs/x-eeeeeeee",
                        registry_lock="/tmp/run/registry.lock")
    props = env_unit(holder=holder, box=sandbox(IsolationLevel.NAMESPACE, SYSTEM))
    assert props["PrivateTmp"] is True
    assert props["BindReadOnlyPaths"] == [[p, p, True, 0] for p in
                                          ("/tmp/co/gestvenv/holder.py",
                                           "/tmp/co/gestvenv/reaper.py")]
    assert props["BindPaths"] == [[p, p, True, 0] for p in ("/tmp/run", "/tmp/envs")]
    assert "BindPaths" not in env_unit(holder=holder)  # no private /tmp: nothing to bind


@pytest.mark.parametrize("arg", ["$HOME", "$$", "a$$b", "${X}", "%h", "plain"])
def test_exec_lines_double_every_dollar_so_systemd_passes_them_as_given(arg: str) -> None:
    """systemd expands $VAR in ExecStart= arguments and turns $$ into $ (checked against
    systemd 252 in the test host, also across a daemon-reload)."""
    ((path, argv, _),) = plan.exec_start(["/bin/echo", arg], program="/bin/echo")
    assert path == "/bin/echo"
    assert argv[1].replace("$$", "$") == arg and argv[1].count("$") == 2 * arg.count("$")


@pytest.mark.parametrize("ttl", [None, 0])
def test_env_unit_without_ttl_has_no_runtime_max(ttl: int | None) -> None:
    assert "RuntimeMaxUSec" not in env_unit(ttl=ttl)


def test_memory_with_uncapped_swap_on_v1_is_not_claimed() -> None:
    caps = Capabilities(user=False, controllers=frozenset({"cpu", "memory", "pids"}),
                        cgroup_v2=False, swap_uncapped=True)
    status = plan.enforcement(ResourceLimits(max_memory=64), IsolationLevel.PROCESS, caps)
    assert status.limits["max_memory"].enforced is False
    assert "swap" in status.limits["max_memory"].mechanism


def test_env_unit_starts_once() -> None:
    """A command started just after the TTL must not bring the env back (BindsTo= pulls)."""
    props = env_unit(ttl=5)
    assert props["StartLimitBurst"] == 1
    assert props["StartLimitIntervalUSec"] == 2**64 - 1  # infinity


def test_unit_environment_drops_values_that_are_not_utf8() -> None:
    kept = plan.unit_environment({"OK": "é", "BAD": "\udcff", "ALSO": "x"})
    assert kept == ["OK=é", "ALSO=x"]


def test_env_unit_owner_and_idle_are_optional() -> None:
    holder = HolderArgs(python="py", script="/p/holder.py", state_file="/s", env_id="e")
    argv = env_unit(holder=holder)["ExecStart"][0][1]
    assert "--owner-pid" not in argv
    assert "--owner-start" not in argv
    assert "--idle-timeout" not in argv
    assert argv[argv.index("-I") + 3] == "/p/holder.py"


# --- command units ---

def test_command_unit_properties() -> None:
    names = UnitNames.of(ENV)
    props = command(timeout=1.5, fds={"stdin": 0, "stdout": 1, "stderr": 2},
                    argv=["python", "-c", "print(1)"])
    assert props["StandardInputFileDescriptor"] == 0
    assert props["StandardOutputFileDescriptor"] == 1
    assert props["StandardErrorFileDescriptor"] == 2
    assert "StandardInput" not in props
    assert props["RuntimeMaxUSec"] == 1_500_000
    assert props["AddRef"] is True
    assert props["BindsTo"] == [names.env]
    assert props["After"] == [names.env]
    assert props["Slice"] == names.slice
    assert props["WorkingDirectory"] == "/work"
    assert props["ExecStart"] == [["python", ["python", "-c", "print(1)"], False]]
    assert props["Environment"] == ["A=1"]
    assert props["CollectMode"] == "inactive-or-failed"
    assert ENV in props["Description"]
    assert "print(1)" in props["Description"]


def test_command_fd_indexes_are_passed_through() -> None:
    props = command(fds={"stdout": 0, "stderr": 1})
    assert props["StandardInput"] == "null"
    assert "StandardInputFileDescriptor" not in props
    assert props["StandardOutputFileDescriptor"] == 0
    assert props["StandardErrorFileDescriptor"] == 1


def test_command_without_any_fd() -> None:
    props = command(fds={})
    assert props["StandardInput"] == "null"
    for name in ("StandardInputFileDescriptor", "StandardOutputFileDescriptor",
                 "StandardErrorFileDescriptor"):
        assert name not in props


@pytest.mark.parametrize(("timeout", "usec"), [(1.5, 1_500_000), (10, 10_000_000),
                                               (1e-9, 1), (0.0000015, 2)])
def test_command_timeout(timeout: float, usec: int) -> None:
    assert command(timeout=timeout)["RuntimeMaxUSec"] == usec


def test_command_without_timeout_has_no_runtime_max() -> None:
    assert "RuntimeMaxUSec" not in command(timeout=None)


def test_long_command_description_is_truncated() -> None:
    props = command(argv=["python", "-c", "x = 1; " * 200])
    assert len(props["Description"]) <= 220
    assert props["Description"].endswith("...")
    assert ENV in props["Description"]
    assert props["ExecStart"][0][1][2] == "x = 1; " * 200  # the command itself is whole


# --- environment variables ---

def test_unit_environment_drops_what_systemd_refuses() -> None:
    environ = {"1X": "a", "A-B": "b", "": "c", "A B": "d", "É": "e",
               "CTRL": "a\x01b", "ESC": "\x1b[0m", "DEL": "x\x7f", "NUL": "a\x00",
               "TAB": "a\tb", "NL": "a\nb", "OK": "value", "_under": "", "A1": "x=y",
               "UTF": "héllo"}
    assert plan.unit_environment(environ) == ["TAB=a\tb", "NL=a\nb", "OK=value", "_under=",
                                              "A1=x=y", "UTF=héllo"]


def test_command_environment_is_filtered() -> None:
    assert command(environ={"GOOD": "1", "BAD-NAME": "2", "ESC": "\x1b"})["Environment"] == [
        "GOOD=1"]


# --- exit status ---

@pytest.mark.parametrize(("code", "status", "returncode"), [
    (1, 0, 0), (1, 3, 3), (1, 255, 255), (2, 9, -9), (2, 15, -15), (3, 11, -11), (0, 0, 0)])
def test_exit_status(code: int, status: int, returncode: int) -> None:
    assert plan.exit_status(code, status) == returncode


# --- bus helpers ---

@pytest.mark.parametrize(("unit", "encoded"), [
    ("gestvenv-x-abc.service", "gestvenv_2dx_2dabc_2eservice"),
    ("gv-e1.service", "gv_2de1_2eservice"),
    ("1a.service", "_31a_2eservice"),
    ("gestvenv.slice", "gestvenv_2eslice"),
    ("gestvenv-ci\\x2dtest.slice", "gestvenv_2dci_5cx2dtest_2eslice"),
    ("a_b@c:d.service", "a_5fb_40c_3ad_2eservice"),
    ("é", "_c3_a9"),
    ("", "_"),
])
def test_unit_path_matches_sd_bus_path_encode(unit: str, encoded: str) -> None:
    assert bus.unit_path(unit) == f"/org/freedesktop/systemd1/unit/{encoded}"


def _translate(name: str) -> GestvenvError:
    return bus.translate(DBusError(name, "the text"), "starting x.service")


@pytest.mark.parametrize("name", ["org.freedesktop.systemd1.NoSuchUnit",
                                  "org.freedesktop.DBus.Error.UnknownObject"])
def test_translate_no_such_unit(name: str) -> None:
    exc = _translate(name)
    assert type(exc) is bus.NoSuchUnit
    assert "starting x.service" in str(exc)
    assert "the text" in str(exc)


@pytest.mark.parametrize("name", [
    "org.freedesktop.DBus.Error.AccessDenied",
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
])
def test_translate_unavailable(name: str) -> None:
    exc = _translate(name)
    assert type(exc) is RuntimeUnavailableError
    assert "starting x.service" in str(exc)
    assert "the text" in str(exc)


@pytest.mark.parametrize("name", ["org.freedesktop.systemd1.UnitExists",
                                  "org.freedesktop.DBus.Error.InvalidArgs",
                                  "org.example.Whatever"])
def test_translate_anything_else_is_a_systemd_error(name: str) -> None:
    exc = _translate(name)
    assert type(exc) is SystemdError
    assert isinstance(exc, SystemdError)
    assert exc.dbus_name == name
    assert "starting x.service" in str(exc)
    assert "the text" in str(exc)


def test_variants_wraps_each_property() -> None:
    props = [plan.prop("MemoryMax", 5), plan.prop("Environment", ["A=1"])]
    out = bus.variants(props)
    assert [name for name, _ in out] == ["MemoryMax", "Environment"]
    assert [(v.signature, v.value) for _, v in out] == [("t", 5), ("as", ["A=1"])]


@pytest.mark.parametrize("bad", [("MemoryMax", "t", -1), ("AddRef", "b", 1),
                                 ("Environment", "as", "A=1")])
def test_variants_refuses_a_value_that_does_not_fit(bad: Property) -> None:
    check: Callable[[], Any] = lambda: bus.variants([bad])  # noqa: E731
    with pytest.raises(Exception):  # noqa: B017, PT011 - dbus-next's own mismatch error
        check()


def test_the_cleanup_timers_service_is_not_taken_for_an_env() -> None:
    assert plan.env_name_of_unit("gestvenv-cleanup.service") is None
    assert plan.env_name_of_unit("gestvenv-ci.service") == "ci"


ENV_ID = "0123456789abcdef0123456789abcdef"


def test_the_env_units_description_carries_its_id_for_one_listing_of_all_units() -> None:
    described = env_unit(holder=HolderArgs(python="/usr/bin/python3", script="/h.py",
                                           state_file="/run/gestvenv/envs/ci-test.json",
                                           env_id=ENV_ID))["Description"]
    assert described == f"gestvenv environment {ENV} (python 3.12, tmpfs storage; id {ENV_ID})"
    assert plan.env_id_of_description(described) == ENV_ID


@pytest.mark.parametrize("description", [
    # A unit of a gestvenv before the id was there: its Environment is read instead.
    "gestvenv environment ci-test (python 3.11.7, disk storage, /var/cache/x/ci-test-01234567)",
    "someone's own gestvenv-web.service",
    f"gestvenv environment ci-test (id {ENV_ID}; more)",  # only at the very end
    f"gestvenv environment ci-test (x; id {ENV_ID[:-1]})",  # not a full id
    f"gestvenv environment ci-test (x; id {ENV_ID.upper()})",
    "",
])
def test_a_description_that_does_not_end_with_an_id_names_no_env(description: str) -> None:
    assert plan.env_id_of_description(description) is None


def test_the_id_is_the_last_one_whatever_the_path_says() -> None:
    other = "f" * 32
    described = plan.env_description(ENV, f"disk storage, /srv/x; id {other})", ENV_ID)
    assert plan.env_id_of_description(described) == ENV_ID


def test_a_unit_is_taken_for_a_known_env_only_when_its_description_names_that_env() -> None:
    described = plan.env_description(ENV, "python 3.12", ENV_ID)
    assert plan.described_as_known(ENV, described, {ENV: ENV_ID}) == ENV_ID
    # Another env of the same name (another registry's, or ours before a reuse): read it.
    assert plan.described_as_known(ENV, described, {ENV: "e" * 32}) is None
    assert plan.described_as_known(ENV, described, {}) is None
    assert plan.described_as_known(ENV, described, None) is None
    assert plan.described_as_known(ENV, "gestvenv environment ci-test (old)", {ENV: ENV_ID}) \
        is None
