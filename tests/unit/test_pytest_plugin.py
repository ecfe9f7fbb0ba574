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
