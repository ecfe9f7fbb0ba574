"""Value types: limits validate themselves, enums list what is allowed, results explain."""

from __future__ import annotations

import signal

import pytest

from gestvenv import (
    Enforcement,
    ExecResult,
    IsolationLevel,
    LimitStatus,
    ResourceLimits,
    StorageBackend,
    ValidationError,
)

# --- ResourceLimits ---

@pytest.mark.parametrize("field", ["max_memory", "max_disk", "max_processes"])
@pytest.mark.parametrize("value", [-1, 0, True, False, 1.5, 256.0, "256", [256]])
def test_integer_limits_reject_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        ResourceLimits(**{field: value})


@pytest.mark.parametrize("field", ["max_memory", "max_disk", "max_processes"])
def test_integer_limits_accept_positive_ints(field: str) -> None:
    limits = ResourceLimits(**{field: 1})
    assert getattr(limits, field) == 1
    assert ResourceLimits(**{field: 1 << 20}).requested() == {field: 1 << 20}


@pytest.mark.parametrize("value", [0, -5, 0.0, 100_000.5, 100_001, True, "50", float("nan")])
def test_cpu_percent_out_of_bounds_or_wrong_type_is_rejected(value: object) -> None:
    with pytest.raises(ValidationError, match="max_cpu_percent"):
        ResourceLimits(max_cpu_percent=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.5, 1, 50, 99.9, 200, 100_000])
def test_cpu_percent_within_bounds_is_accepted(value: float) -> None:
    assert ResourceLimits(max_cpu_percent=value).max_cpu_percent == value


@pytest.mark.parametrize("value", [0, 1, "no", None])
def test_network_access_must_be_a_bool(value: object) -> None:
    with pytest.raises(ValidationError, match="network_access"):
        ResourceLimits(network_access=value)  # type: ignore[arg-type]


def test_limits_are_frozen() -> None:
    limits = ResourceLimits(max_memory=10)
    with pytest.raises(AttributeError):
        limits.max_memory = 20  # type: ignore[misc]


def test_requested_lists_only_restricting_limits() -> None:
    assert ResourceLimits().requested() == {}
    assert ResourceLimits(network_access=True).requested() == {}
    limits = ResourceLimits(max_memory=200, max_processes=5, network_access=False)
    assert limits.requested() == {"max_memory": 200, "max_processes": 5, "network_access": False}
    assert ResourceLimits(max_cpu_percent=12.5).requested() == {"max_cpu_percent": 12.5}


@pytest.mark.parametrize("limits", [
    ResourceLimits(),
    ResourceLimits(max_memory=200),
    ResourceLimits(max_memory=1, max_disk=2, max_processes=3, max_cpu_percent=4.5,
                   network_access=False),
])
def test_limits_round_trip_through_dicts(limits: ResourceLimits) -> None:
    data = limits.to_dict()
    assert set(data) == {"max_memory", "max_disk", "max_processes", "max_cpu_percent",
                         "network_access"}
    assert ResourceLimits.from_dict(data) == limits
    # from_dict validates like the constructor (a tampered state file is not trusted)
    with pytest.raises(ValidationError):
        ResourceLimits.from_dict({**data, "max_memory": -1})


def test_from_dict_fills_missing_keys_with_defaults() -> None:
    assert ResourceLimits.from_dict({}) == ResourceLimits()
    assert ResourceLimits.from_dict({"max_disk": 7}) == ResourceLimits(max_disk=7)


# --- enums ---

@pytest.mark.parametrize(("cls", "what"), [
    (IsolationLevel, "isolation level"),
    (StorageBackend, "storage backend"),
])
def test_enum_parse_error_lists_allowed_values(cls: type, what: str) -> None:
    with pytest.raises(ValidationError) as info:
        cls.parse("bogus")
    message = str(info.value)
    assert what in message
    assert "'bogus'" in message
    for member in cls:
        assert member.value in message


@pytest.mark.parametrize("cls", [IsolationLevel, StorageBackend])
def test_enum_parse_accepts_members_and_any_case(cls: type) -> None:
    for member in cls:
        assert cls.parse(member) is member
        assert cls.parse(member.value) is member
        assert cls.parse(member.value.upper()) is member


def test_isolation_levels_are_ordered_by_strength() -> None:
    ranks = [level.rank for level in IsolationLevel]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == len(ranks)
    assert IsolationLevel.PROCESS.rank < IsolationLevel.NAMESPACE.rank < IsolationLevel.CHROOT.rank


def test_enforcement_round_trip_and_unenforced() -> None:
    enforcement = Enforcement(
        runtime="local",
        isolation_requested=IsolationLevel.NAMESPACE,
        isolation_applied=IsolationLevel.PROCESS,
        limits={"max_memory": LimitStatus(200, True, "RLIMIT_AS"),
                "max_cpu_percent": LimitStatus(50, False, "needs a cgroup")},
        notes=("a note",),
    )
    assert set(enforcement.unenforced) == {"max_cpu_percent"}
    assert Enforcement.from_dict(enforcement.to_dict()) == enforcement


# --- ExecResult ---

def _result(returncode: int = 0, killed_by: str | None = None,
            duration: float = 1.25) -> ExecResult:
    return ExecResult(argv=("python", "-c", "pass"), returncode=returncode, stdout="out",
                      stderr="err", duration=duration, killed_by=killed_by)


def test_ok_needs_status_zero_and_no_killer() -> None:
    assert _result(0).ok
    assert not _result(1).ok
    assert not _result(-9).ok
    assert not _result(0, killed_by="ttl").ok
    assert not _result(-9, killed_by="timeout").ok


def test_timed_out_only_for_timeouts() -> None:
    assert _result(-9, killed_by="timeout").timed_out
    assert not _result(-9, killed_by="ttl").timed_out
    assert not _result(-9).timed_out
    assert not _result(0).timed_out


@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_describe_exit_status(code: int) -> None:
    assert _result(code).describe() == f"exited with status {code}"


def test_describe_killers() -> None:
    assert _result(-9, killed_by="timeout", duration=2.04).describe() == \
        "timed out after 2.0s and was killed"
    assert "TTL" in _result(-9, killed_by="ttl").describe()
    assert "memory limit" in _result(-9, killed_by="memory").describe()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_describe_signal_by_name(sig: signal.Signals) -> None:
    assert _result(-int(sig)).describe() == f"was killed by {sig.name}"


def test_describe_unknown_signal_number() -> None:
    assert _result(-200).describe() == "was killed by signal 200"


def test_exec_result_to_dict_is_json_ready() -> None:
    data = _result(3).to_dict()
    assert data["argv"] == ["python", "-c", "pass"]
    assert data["returncode"] == 3
    assert data["killed_by"] is None


@pytest.mark.parametrize("field", ["max_memory", "max_disk", "max_processes"])
def test_absurd_limits_are_refused_with_a_clear_error(field: str) -> None:
    with pytest.raises(ValidationError, match=f"{field} must be at most"):
        ResourceLimits(**{field: 10**20})


def test_isolation_levels_order_by_strength_not_alphabetically() -> None:
    from gestvenv import IsolationLevel as Level

    assert Level.PROCESS < Level.NAMESPACE < Level.CONTAINER < Level.CHROOT
    assert Level.CONTAINER >= Level.NAMESPACE and not Level.PROCESS >= Level.NAMESPACE
    assert Level.CONTAINER > "namespace" and Level.PROCESS <= "process"
    assert max([Level.CONTAINER, Level.NAMESPACE]) is Level.CONTAINER
    with pytest.raises(TypeError):
        assert Level.PROCESS < 3  # type: ignore[operator]
