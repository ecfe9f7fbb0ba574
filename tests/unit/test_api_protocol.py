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


def test_who_may_do_what() -> None:
    pytest.importorskip("aiohttp")
    from gestvenv.api.server import access

    assert access(1000, 1000) == access(0, 1000) == access(0, 0) == "service"
    assert access(1000, 0) == access(4242, 0) == "user"  # root's service: their own envs
    assert access(1001, 1000) is None  # a user's service is that user's


def test_a_user_of_root_s_service_has_names_of_its_own() -> None:
    assert protocol.scoped_name(4242, "job") == "u4242-job"
    assert protocol.unscoped_name(4242, "u4242-job") == "job"
    assert protocol.scoped_name(1, "job") != protocol.scoped_name(11, "job")
    gestvenv.names.validate_name(protocol.scoped_name(4242, "a" * 50))  # still a name


def test_the_openapi_document_names_every_route_and_refuses_extra_fields() -> None:
    document = protocol.openapi()
    assert document["openapi"] == "3.1.0"
    for route in ("/v1/envs", "/v1/envs/{name}", "/v1/envs/{name}/exec",
                  "/v1/envs/{name}/files/{path}", "/v1/envs/{name}/usage"):
        assert route in document["paths"]
    schemas = document["components"]["schemas"]
    assert schemas["CreateRequest"]["additionalProperties"] is False
    assert set(schemas["CreateRequest"]["properties"]) == set(protocol._CREATE)


@pytest.mark.parametrize("body", [
    {"command": ["echo", "a\0b"]},
    {"command": "echo \0", "shell": True},
    {"command": ["true"], "env": {"A": "x\0y"}},
    {"command": ["true"], "env": {"A=B": "x"}},
    {"command": ["true"], "env": {"": "x"}},
])
def test_what_no_process_can_take_is_refused_before_it_runs(body: object) -> None:
    with pytest.raises(ApiError) as caught:
        protocol.exec_request(body)
    assert caught.value.status == 400


@pytest.mark.parametrize("specs", [
    ["-r /etc/shadow"], ["--index-url https://evil.example/simple"], ["-e ."],
    ["/root/secret.whl"], ["./local"], ["~/pkg"], ["pkg @ file:///etc/passwd"],
    ["six\0"], ["secret @ /root/x.whl"], ["secret@/root/x.whl"], ["x @ ../../tmp/x.whl"],
    ["tmp/pytest-of-root/x.whl"], ["x.whl"], ["x @ ${SECRET}"], ["six==${V}"],
    ["pkg @ http://example.org/p.whl"], ["pkg\\x"],
])
def test_installer_options_and_local_paths_are_not_taken(specs: list[str]) -> None:
    with pytest.raises(ApiError):
        protocol.create_request({"packages": specs})
    with pytest.raises(ApiError):
        protocol.create_request({"requirements": "\n".join(["six", *specs])})
    with pytest.raises(ApiError):
        protocol.install_request({"packages": specs})


def test_ordinary_specs_and_comments_are_taken() -> None:
    request = protocol.create_request({
        "packages": ["six>=1.0", "requests[socks]==2.32.3", "pkg @ https://example.org/p.whl"],
        "requirements": "# pinned\nsix==1.16.0\n\nattrs ; python_version >= '3.8'\n"})
    assert request.kwargs["packages"][0] == "six>=1.0"


def test_deep_json_is_malformed_not_a_crash() -> None:
    with pytest.raises(ApiError) as caught:
        protocol.json_body(b"[" * 100_000)
    assert caught.value.status == 400
