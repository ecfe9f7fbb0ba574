"""The REST API's rules without a socket (gestvenv.api.protocol, server.may_act)."""

from __future__ import annotations

import json

import pytest

import gestvenv
from gestvenv.api import protocol
from gestvenv.api.protocol import ApiError


def test_a_create_request_maps_to_ephemeral_s_parameters() -> None:
    request = protocol.create_request({
        "name": "job", "packages": ["six>=1.0"], "python": "3.11", "ttl": 60,
        "resource_limits": {"max_memory": 256, "network_access": False},
        "isolation_level": "namespace", "storage_backend": "tmpfs", "env": {"A": "1"},
        "requirements": "six\n", "hold": True})
    assert request.hold and request.requirements == "six\n"
    assert request.kwargs["resource_limits"] == gestvenv.ResourceLimits(
        max_memory=256, network_access=False)
    assert request.kwargs["python"] == "3.11" and request.kwargs["env"] == {"A": "1"}


@pytest.mark.parametrize(("body", "kind"), [
    ({"name": "x", "ExecStartPre": "/bin/sh -c id"}, "unknown-fields"),     # a unit property
    ({"properties": [["User", "root"]]}, "unknown-fields"),
    ({"config": {"storage_root": "/"}}, "unknown-fields"),
    ({"runtime": "local"}, "unknown-fields"),
    ({"resource_limits": {"MemoryMax": "infinity"}}, "unknown-fields"),
    ({"python": "/usr/bin/python3"}, "invalid-request"),                    # a path: run by us
    ({"python": "3.11; rm -rf /"}, "invalid-request"),
    ({"packages": "six"}, "invalid-request"),
    ({"packages": [1]}, "invalid-request"),
    ({"ttl": "60"}, "invalid-request"),
    ({"ttl": True}, "invalid-request"),                                    # a bool is no int
    ({"resource_limits": {"max_memory": -1}}, "invalid-request"),
    ({"env": {"A": 1}}, "invalid-request"),
    ({"requirements": "six\0"}, "invalid-request"),
    ([], "invalid-request"),
])
def test_what_a_create_request_may_not_say(body: object, kind: str) -> None:
    with pytest.raises(ApiError) as caught:
        protocol.create_request(body)
    assert caught.value.status == 400
    assert caught.value.problem()["type"] == f"urn:gestvenv:problem:{kind}"


def test_an_exec_request() -> None:
    request = protocol.exec_request({"command": ["python", "-V"], "timeout": 5,
                                     "stdin_base64": "aGk=", "cwd": "sub"})
    assert request.stdin == b"hi" and request.timeout == 5.0 and request.cwd == "sub"
    for bad in ({}, {"command": 3}, {"command": ["a", 1]}, {"command": "x", "timeout": 0},
                {"command": "x", "stdin": "a", "stdin_base64": "YQ=="},
                {"command": "x", "stdin_base64": "***"}, {"command": "x", "user": "root"}):
        with pytest.raises(ApiError):
            protocol.exec_request(bad)
    with pytest.raises(ApiError) as caught:
        protocol.exec_request({"command": "x", "stdin": "a" * (protocol.MAX_STDIN + 1)})
    assert caught.value.status == 413


@pytest.mark.parametrize("path", ["", "/etc/passwd", "..", "a/../b", "a/./b", "a//b", "a/",
                                  "a\\b", "a\0b", "x/" * 70 + "y", "a" * 256])
def test_paths_that_could_leave_the_env_are_refused(path: str) -> None:
    with pytest.raises(ApiError):
        protocol.relative_parts(path)


def test_a_relative_path_is_its_parts() -> None:
    assert protocol.relative_parts("job/out.txt") == ["job", "out.txt"]
    assert protocol.relative_parts(".hidden") == [".hidden"]


def test_library_errors_round_trip_through_problem_documents() -> None:
    for error in (gestvenv.EnvironmentNotFoundError("no environment named 'x'"),
                  gestvenv.EnvironmentExistsError("exists"), gestvenv.ValidationError("bad"),
                  gestvenv.QuotaExceededError("full"), gestvenv.BuildError("failed")):
        document = json.loads(json.dumps(protocol.error_of(error).problem()))
        back = protocol.library_error(document)
        assert type(back) is type(error) and str(back) == str(error)
    unknown = protocol.library_error({"status": 413, "detail": "too big", "error": "os"})
    assert isinstance(unknown, protocol.RemoteError) and unknown.status == 413


def test_only_the_service_s_user_and_root_may_act() -> None:
    pytest.importorskip("aiohttp")
    from gestvenv.api.server import may_act

    assert may_act(1000, 1000) and may_act(0, 1000) and may_act(0, 0)
    assert not may_act(1001, 1000) and not may_act(1000, 0)


def test_the_openapi_document_names_every_route_and_refuses_extra_fields() -> None:
    document = protocol.openapi()
    assert document["openapi"] == "3.1.0"
    for route in ("/v1/envs", "/v1/envs/{name}", "/v1/envs/{name}/exec",
                  "/v1/envs/{name}/files/{path}", "/v1/envs/{name}/usage"):
        assert route in document["paths"]
    schemas = document["components"]["schemas"]
    assert schemas["CreateRequest"]["additionalProperties"] is False
    assert set(schemas["CreateRequest"]["properties"]) == set(protocol._CREATE)
