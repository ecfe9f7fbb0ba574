"""The plugin's pure rules: what a test's environment is, and its name."""

from __future__ import annotations

import pytest

from gestvenv import ResourceLimits, ValidationError
from gestvenv.names import validate_name
from gestvenv.pytest_plugin import env_name, from_ini, merge, parse_limits


def test_closest_marker_wins_over_farther_ones_and_the_ini() -> None:
    ini = {"packages": ["six"], "ttl": 300, "isolation": "namespace"}
    module, klass, function = {"ttl": 200, "storage": "tmpfs"}, {"ttl": 100}, {"ttl": 50}
    options = merge(ini, [function, klass, module])  # closest first, as iter_markers gives
    assert options == {"packages": ["six"], "ttl": 50, "isolation_level": "namespace",
                       "storage_backend": "tmpfs"}


def test_single_limits_refine_the_limits_they_come_with() -> None:
    ini = {"limits": ResourceLimits(max_memory=512, network_access=False)}
    options = merge(ini, [{"max_processes": 10}, {"max_memory": 256}])
    assert options["resource_limits"] == ResourceLimits(max_memory=256, max_processes=10,
                                                        network_access=False)
    assert merge({}, [{"limits": {"max_disk": 64}}])["resource_limits"] == \
        ResourceLimits(max_disk=64)
    assert "resource_limits" not in merge({"ttl": 5}, [])


@pytest.mark.parametrize(("marker", "message"), [
    ({"memory": 512}, "unknown keyword 'memory'; valid ones: packages"),
    ({"limits": 512}, "limits must be a ResourceLimits or a dict"),
    ({"max_memory": -1}, "max_memory must be a positive integer"),
])
def test_bad_markers_say_what_is_wrong(marker: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        merge({}, [marker])


def test_ini_values_are_read() -> None:
    assert from_ini({"gestvenv_packages": ["six", "requests>=2"], "gestvenv_ttl": "90",
                     "gestvenv_limits": ["max_memory=512", "max_cpu_percent=50",
                                         "network_access=no"],
                     "gestvenv_isolation": ""}) == {
        "packages": ["six", "requests>=2"], "ttl": 90,
        "limits": ResourceLimits(max_memory=512, max_cpu_percent=50.0, network_access=False)}
    with pytest.raises(ValidationError, match="gestvenv_ttl: 'soon'"):
        from_ini({"gestvenv_ttl": "soon"})


@pytest.mark.parametrize(("words", "message"), [
    (["memory=512"], "'memory=512' is not KEY=VALUE with KEY one of max_memory"),
    (["max_memory"], "is not KEY=VALUE"),
    (["max_memory=lots"], "max_memory='lots' is not a number"),
    (["network_access=maybe"], "network_access='maybe': true or false"),
])
def test_bad_ini_limits(words: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse_limits(words)


@pytest.mark.parametrize("test_name", [
    "test_one", "test_x[param-1/2 ü]", "[weird]", "test_" + "long" * 40, "-.-",
])
def test_env_names_are_valid_unique_and_readable(test_name: str) -> None:
    names = {env_name(test_name) for _ in range(20)}
    assert len(names) > 1
    for name in names:
        assert validate_name(name) == name and name.startswith("pytest-")
    assert env_name("test_one").startswith("pytest-test_one-")


def test_a_closer_limits_replaces_farther_single_limits_and_the_ini() -> None:
    ini = {"limits": ResourceLimits(network_access=False)}
    function, module = {"limits": ResourceLimits(max_memory=1024)}, {"max_memory": 256}
    assert merge(ini, [function, module])["resource_limits"] == ResourceLimits(max_memory=1024)
    # A single limit refines its own marker's limits, and a farther one's.
    own = {"limits": {"max_memory": 1024}, "max_processes": 8}
    assert merge(ini, [own])["resource_limits"] == ResourceLimits(max_memory=1024,
                                                                  max_processes=8)
    assert merge({}, [{"max_processes": 8}, {"limits": {"max_memory": 64}}])[
        "resource_limits"] == ResourceLimits(max_memory=64, max_processes=8)


@pytest.mark.parametrize(("marker", "message"), [
    ({"limits": {"bad": 1}}, "limits: unknown field 'bad'; fields: max_memory"),
    ({"packages": 6}, "packages must be a list of specs, not 6"),
    ({"packages": ["six", 1]}, "packages must be a list of specs"),
])
def test_bad_marker_values_are_validation_errors(marker: dict[str, object],
                                                 message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        merge({}, [marker])


def test_the_kept_line_says_every_end_it_has() -> None:
    from gestvenv.pytest_plugin import kept_line

    line = kept_line("t.py::test_x", "pytest-test_x-1", "/p", 2_000_000_000.0, 30)
    assert line.startswith("t.py::test_x: environment 'pytest-test_x-1' at /p, kept until ")
    assert "(its TTL) or until idle for 30s; inspect: gestvenv ephemeral show pytest-test_x-1;" \
        " remove: gestvenv ephemeral cleanup pytest-test_x-1" in line
    assert ", kept until idle for 5s;" in kept_line("t", "n", "/p", None, 5)
