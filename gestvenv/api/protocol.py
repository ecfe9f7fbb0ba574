"""The REST API's rules, without I/O: what a request may say, what an error looks like, which
path inside an environment a file name means, and the OpenAPI document.

The server (:mod:`gestvenv.api.server`) and the client (:mod:`gestvenv.api.client`) share it,
and its unit tests need no socket. A request names gestvenv's own parameters only, each with its
type: an unknown field is refused, never passed on (a caller cannot set a unit property, a
config, an interpreter path or a runtime of its choosing).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..exceptions import (
    BuildError,
    CommandNotExecutableError,
    CommandNotFoundError,
    CommandNotRunningError,
    DiskFullError,
    EnvironmentClosedError,
    EnvironmentExistsError,
    EnvironmentNotFoundError,
    GestvenvError,
    InvalidNameError,
    QuotaExceededError,
    RuntimeUnavailableError,
    UnenforceableLimitError,
    UnsafePathError,
    ValidationError,
)

PREFIX = "/v1"
NDJSON = "application/x-ndjson"
PROBLEM = "application/problem+json"

# Bounds (the service's own; each refusal is a problem document that says which).
MAX_JSON_BODY = 1 << 20          # a create or exec request, requirements and stdin included
MAX_UPLOAD = 256 << 20           # one file sent into an environment
MAX_STDIN = 512 << 10            # an exec's standard input (more: upload a file, redirect it)
MAX_PENDING_OUTPUT = 8 << 20     # output produced but not yet taken by the client
KEPT_OUTPUT = 1 << 20            # of stdout and of stderr, kept for the final result
WRITE_TIMEOUT = 30.0             # a client that takes nothing for this long is dropped
HEADER_TIMEOUT = 10.0            # a request's head, a JSON body, or an upload's next piece,
                                 # that takes longer: the connection is dropped
KEEPALIVE = 0.25                 # seconds between two events of a quiet stream
MAX_STREAMS = 256                # exec and held-create streams at once (a held env: one, and
                                 # one more per command running in it)
MAX_CONNECTIONS = 256


class ApiError(Exception):
    """A refusal with its HTTP status: the server answers it as a problem document."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra

    def problem(self) -> dict[str, Any]:
        return problem(self.status, self.title, self.detail, **self.extra)


def problem(status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem document; ``type`` names the kind of error, for programs."""
    kind = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return {"type": f"urn:gestvenv:problem:{kind}", "title": title, "status": status,
            "detail": detail, **extra}


# Each library error, its status and title. Order matters: subclasses first.
_ERRORS: tuple[tuple[type[GestvenvError], int, str], ...] = (
    (EnvironmentNotFoundError, 404, "No such environment"),
    (EnvironmentExistsError, 409, "Environment exists"),
    (EnvironmentClosedError, 410, "Environment ended"),
    (InvalidNameError, 400, "Invalid name"),
    (CommandNotFoundError, 400, "Command not found"),
    (CommandNotExecutableError, 400, "Command not executable"),
    (UnenforceableLimitError, 422, "Limit not enforceable"),
    (QuotaExceededError, 429, "Quota exceeded"),
    (DiskFullError, 507, "Disk full"),
    (UnsafePathError, 403, "Unsafe path"),
    (RuntimeUnavailableError, 503, "Runtime unavailable"),
    (BuildError, 422, "Build failed"),
    (CommandNotRunningError, 409, "Command not running"),
    (ValidationError, 400, "Invalid request"),
)


def error_of(exc: GestvenvError) -> ApiError:
    """The API's answer to a library error."""
    for kind, status, title in _ERRORS:
        if isinstance(exc, kind):
            return ApiError(status, title, str(exc), error=type(exc).__name__)
    return ApiError(500, "Environment error", str(exc), error=type(exc).__name__)


def library_error(document: Mapping[str, Any]) -> GestvenvError:
    """The client's side of :func:`error_of`: the library's own exception, from a problem."""
    from .. import exceptions

    name = str(document.get("error", ""))
    kind = getattr(exceptions, name, None)
    detail = str(document.get("detail") or document.get("title") or "error")
    if isinstance(kind, type) and issubclass(kind, GestvenvError) and \
            kind.__name__ != "CommandError":  # (made of an ExecResult, never sent as one)
        try:
            return kind(detail)
        except TypeError:
            pass
    return RemoteError(int(document.get("status") or 500), detail, dict(document))


class RemoteError(GestvenvError):
    """An error the API answered that is not one of the library's own (a refusal of the
    service: a body too large, a stream limit, an unknown route)."""

    def __init__(self, status: int, detail: str, document: dict[str, Any]) -> None:
        super().__init__(detail)
        self.status, self.document = status, document


# --- requests ---

_LIMIT_FIELDS = {"max_memory": int, "max_disk": int, "max_processes": int,
                 "max_cpu_percent": (int, float), "network_access": bool}
_PYTHON_RE = re.compile(r"(python)?3(\.[0-9]{1,2}){0,2}", re.ASCII)


@dataclass(frozen=True)
class CreateRequest:
    kwargs: dict[str, Any]          # for gestvenv.ephemeral / create_environment
    requirements: str | None        # the requirements file's content
    hold: bool                      # the env lives while the response stream is open


@dataclass(frozen=True)
class ExecRequest:
    command: str | list[str]
    shell: bool = False
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    stdin: bytes | None = None


def _typed(body: Mapping[str, Any], name: str, kind: Any, what: str) -> Any:
    value = body[name]
    # bool is an int in Python, never in a request
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool
                                       and bool not in (kind if isinstance(kind, tuple)
                                                        else (kind,))):
        raise ApiError(400, "Invalid request", f"{name!r} must be {what}, not {value!r}",
                       field=name)
    return value


def _object(body: object, known: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "Invalid request", "the body must be a JSON object")
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise ApiError(400, "Unknown fields",
                       f"unknown field(s) {', '.join(map(repr, unknown))}: the API takes "
                       f"{', '.join(sorted(known))} (unit properties and configuration are "
                       "gestvenv's to set, never a request's)", fields=unknown)
    return {name: _typed(body, name, kind, what) for name, (kind, what) in known.items()
            if name in body and body[name] is not None}


def _strings(value: list[Any], name: str) -> list[str]:
    if not all(isinstance(v, str) for v in value):
        raise ApiError(400, "Invalid request", f"{name!r} must be a list of strings",
                       field=name)
    return value


def _string_map(value: dict[str, Any], name: str) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ApiError(400, "Invalid request", f"{name!r} must map names to strings",
                       field=name)
    return value


_CREATE = {
    "name": (str, "a string"),
    "packages": (list, "a list of package specs"),
    "requirements": (str, "the content of a requirements file"),
    "python": (str, "a Python version such as '3.11'"),
    "resource_limits": (dict, "an object of limits"),
    "isolation_level": (str, "an isolation level"),
    "storage_backend": (str, "a storage backend"),
    "ttl": (int, "an integer (seconds)"),
    "idle_timeout": (int, "an integer (seconds)"),
    "env": (dict, "an object of strings"),
    "allow_unenforced": (bool, "a boolean"),
    "hold": (bool, "a boolean"),
}


def create_request(body: object) -> CreateRequest:
    """A create request, checked: ``ephemeral()``'s parameters, with limits as an object of
    ``ResourceLimits``' fields, ``requirements`` as the file's content, and ``python`` as a
    version only (never a path: the service would run it)."""
    from ..models import ResourceLimits

    fields = _object(body, _CREATE)
    kwargs: dict[str, Any] = {}
    for name in ("name", "isolation_level", "storage_backend", "ttl", "idle_timeout",
                 "allow_unenforced"):
        if name in fields:
            kwargs[name] = fields[name]
    if "packages" in fields:
        kwargs["packages"] = _specs(_strings(fields["packages"], "packages"), "packages")
    if "env" in fields:
        kwargs["env"] = _variables(fields["env"], "env")
    if "name" in fields:
        _no_nul(fields["name"], "name")
    if "python" in fields:
        if not _PYTHON_RE.fullmatch(fields["python"]):
            raise ApiError(400, "Invalid request",
                           f"'python' must be a version such as '3.11', not "
                           f"{fields['python']!r} (an interpreter path is not taken)",
                           field="python")
        kwargs["python"] = fields["python"].removeprefix("python")
    if "resource_limits" in fields:
        limits = _object(fields["resource_limits"],
                         {k: (v, "a number" if v is not bool else "a boolean")
                          for k, v in _LIMIT_FIELDS.items()})
        try:
            kwargs["resource_limits"] = ResourceLimits(**limits)
        except ValidationError as exc:
            raise ApiError(400, "Invalid request", str(exc), field="resource_limits") from exc
    requirements = fields.get("requirements")
    if requirements is not None:
        _specs(requirements.splitlines(), "requirements")
    return CreateRequest(kwargs, requirements, bool(fields.get("hold", False)))


_EXEC = {
    "command": ((str, list), "a string or a list of strings"),
    "shell": (bool, "a boolean"),
    "cwd": (str, "a path inside the environment"),
    "env": (dict, "an object of strings"),
    "timeout": ((int, float), "a number of seconds"),
    "stdin": (str, "text"),
    "stdin_base64": (str, "base64"),
}


def exec_request(body: object) -> ExecRequest:
    import base64
    import binascii

    fields = _object(body, _EXEC)
    if "command" not in fields:
        raise ApiError(400, "Invalid request", "'command' is required", field="command")
    command = fields["command"]
    if isinstance(command, list):
        command = _strings(command, "command")
        for arg in command:
            _no_nul(arg, "command")
    else:
        _no_nul(command, "command")
    stdin: bytes | None = None
    if "stdin" in fields and "stdin_base64" in fields:
        raise ApiError(400, "Invalid request", "give 'stdin' or 'stdin_base64', not both")
    if "stdin" in fields:
        stdin = fields["stdin"].encode()
    elif "stdin_base64" in fields:
        try:
            stdin = base64.b64decode(fields["stdin_base64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "Invalid request", "'stdin_base64' is not base64",
                           field="stdin_base64") from exc
    if stdin is not None and len(stdin) > MAX_STDIN:
        raise ApiError(413, "Input too large",
                       f"stdin is limited to {MAX_STDIN} bytes", limit=MAX_STDIN)
    timeout = fields.get("timeout")
    if timeout is not None and not timeout > 0:
        raise ApiError(400, "Invalid request", "'timeout' must be positive", field="timeout")
    return ExecRequest(command=command, shell=fields.get("shell", False),
                       cwd=fields.get("cwd"), env=_variables(fields.get("env", {}), "env"),
                       timeout=None if timeout is None else float(timeout), stdin=stdin)


_INSTALL = {"packages": (list, "a list of package specs"),
            "requirements": (str, "the content of a requirements file")}


def install_request(body: object) -> tuple[list[str], str | None]:
    fields = _object(body, _INSTALL)
    packages = _specs(_strings(fields.get("packages", []), "packages"), "packages")
    requirements = fields.get("requirements")
    if requirements is not None:
        _specs(requirements.splitlines(), "requirements")
    if not packages and not requirements:
        raise ApiError(400, "Invalid request", "give 'packages' or 'requirements'")
    return packages, requirements


_TTL = {"extend": ((int, float), "a number of seconds, more than 0")}


def ttl_request(body: object) -> float:
    """How many seconds later the environment should end (checked again by gestvenv.ttl)."""
    fields = _object(body, _TTL)
    extend = fields.get("extend")
    if extend is None:
        raise ApiError(400, "Invalid request", "give 'extend': seconds", field="extend")
    try:
        seconds = float(extend)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise ApiError(400, "Invalid request", "'extend' is a positive number of seconds",
                       field="extend")
    return seconds


def json_body(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "Malformed JSON", f"the body is not JSON: {exc}") from exc
    except RecursionError:
        raise ApiError(400, "Malformed JSON", "the body nests too deep") from None


def _no_nul(value: str, name: str) -> str:
    if "\0" in value:
        raise ApiError(400, "Invalid request", f"{name!r} holds a NUL character", field=name)
    return value


def _variables(value: dict[str, Any], name: str) -> dict[str, str]:
    """Environment variables: names without '=' or NUL, values without NUL (what a process's
    environment can hold)."""
    value = _string_map(value, name)
    for key, text in value.items():
        if not key or "=" in key or "\0" in key or "\0" in text:
            raise ApiError(400, "Invalid request",
                           f"{name!r}: {key!r} is not a variable an environment can hold",
                           field=name)
    return value


_ARCHIVE = (".whl", ".tar.gz", ".zip", ".tar.bz2", ".tgz")


def bad_spec(text: str) -> str | None:
    """Why a package spec (or requirement line) is not taken through the API, or None. Only
    index requirements (a name, extras, versions, markers) and ``name @ https://...``: no
    installer option (``-r``, ``-c``, ``-e``, ``--index-url``), no path, ``file:`` URL or
    archive name (read as the service, not the caller, and relative to nothing the caller
    knows), no ``$`` (an installer expands ``${VAR}`` from the service's environment). Pure:
    tests/unit/test_api_protocol.py."""
    if "\0" in text or "\\" in text or "$" in text:
        return "a NUL, a backslash or a '$'"
    line = text.strip()
    if line.startswith(("-", ".", "~", "/")):
        return "an installer option or a path"
    name, at, url = line.partition("@")
    if at:
        url = url.strip()
        if not url.startswith(("https://", "git+https://")):
            return "a direct reference that is not an https URL"
        if "/" in name:
            return "a path"
        return None
    if "/" in line or "file:" in line.lower():
        return "a path or a file: URL"
    if line.split(";")[0].strip().lower().endswith(_ARCHIVE):
        return "an archive's file name"
    return None


def _specs(lines: list[str], name: str) -> list[str]:
    """Package specs or requirement lines as the service takes them (:func:`bad_spec`)."""
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        why = bad_spec(text)
        if why is not None:
            raise ApiError(400, "Invalid request",
                           f"{name!r}: {text!r}: {why}; the API takes index requirements and "
                           "https URLs only (packages come from the service's index)",
                           field=name)
    return lines


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address, or ``localhost`` (TCP in clear is served, and
    a token sent, to those only)."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


# --- names: a user of root's service has its own ---

def scoped_name(uid: int, name: str) -> str:
    """The name of a user's environment in root's registry (and its units'): ``u<uid>-``
    before the name the user gave (so that no user can take, or learn, another's names)."""
    return f"u{uid}-{name}"


def unscoped_name(uid: int, name: str) -> str:
    return name.removeprefix(f"u{uid}-")


# --- files ---

def relative_parts(path: str) -> list[str]:
    """The components of a file's path inside an environment's dir, refused when they could
    leave it or mean something else: absolute, ``..``, ``.``, empty, NUL, a backslash. (A
    symlink on the way is refused at the opening, component by component, with O_NOFOLLOW.)"""
    if not path or path.startswith("/") or "\0" in path or "\\" in path:
        raise ApiError(400, "Invalid path",
                       f"{path!r}: a relative path inside the environment is required")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ApiError(400, "Invalid path",
                       f"{path!r}: no empty, '.' or '..' component may appear in it")
    if len(parts) > 64 or any(len(p.encode()) > 255 for p in parts):
        raise ApiError(400, "Invalid path", f"{path!r}: too deep or a component too long")
    return parts


# --- streams ---

def event(kind: str, **data: Any) -> bytes:
    """One NDJSON line of a stream."""
    return json.dumps({"event": kind, **data}, separators=(",", ":")).encode() + b"\n"


# --- the OpenAPI document ---

def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _props(spec: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    kinds = {str: "string", int: "integer", bool: "boolean", list: "array", dict: "object",
             float: "number"}
    out: dict[str, Any] = {}
    for name, (kind, what) in spec.items():
        if isinstance(kind, tuple):
            out[name] = {"oneOf": [{"type": kinds[k]} for k in kind], "description": what}
        else:
            out[name] = {"type": kinds[kind], "description": what}
            if kind is list:
                out[name]["items"] = {"type": "string"}
            if kind is dict and name == "env":
                out[name]["additionalProperties"] = {"type": "string"}
    return out


def openapi() -> dict[str, Any]:
    """The API's OpenAPI 3.1 document (served at ``/v1/openapi.json``)."""
    problem_response = {"description": "A problem document (RFC 9457)",
                        "content": {PROBLEM: {"schema": _ref("Problem")}}}
    env_response = {"description": "The environment",
                    "content": {"application/json": {"schema": _ref("Environment")}}}
    errors = {str(s): problem_response for s in (400, 403, 404, 409, 413, 422, 429, 503)}
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]

    def op(summary: str, responses: dict[str, Any], body: str | None = None,
           params: list[Any] | None = None, content: str = "application/json") -> dict[str, Any]:
        out: dict[str, Any] = {"summary": summary, "responses": {**responses, **errors}}
        if params:
            out["parameters"] = params
        if body:
            out["requestBody"] = {"required": True,
                                  "content": {content: {"schema": _ref(body)}}}
        return out

    limits = {k: ({"type": "boolean"} if v is bool else {"type": "number"})
              for k, v in _LIMIT_FIELDS.items()}
    create = _props(_CREATE)
    create["resource_limits"] = {"type": "object", "properties": limits,
                                 "additionalProperties": False}
    stream = {"description": "NDJSON events, one per line",
              "content": {NDJSON: {"schema": _ref("Event")}}}
    file_path = [*name, {"name": "path", "in": "path", "required": True,
                         "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "gestvenv", "version": __version__,
                 "description": "Ephemeral Python environments, destroyed with a guarantee."},
        "paths": {
            f"{PREFIX}/envs": {
                "get": op("List the caller's environments",
                          {"200": {"description": "Environments", "content": {
                              "application/json": {"schema": {
                                  "type": "array", "items": _ref("Environment")}}}}}),
                "post": op("Create an environment (hold: it lives while the response "
                           "stream is open)", {"201": env_response, "200": stream},
                           body="CreateRequest")},
            f"{PREFIX}/envs/{{name}}": {
                "get": op("Show an environment", {"200": env_response}, params=name),
                "delete": op("Destroy an environment", {"204": {"description": "Destroyed"}},
                             params=name)},
            f"{PREFIX}/envs/{{name}}/usage": {
                "get": op("What it uses now, against its limits",
                          {"200": {"description": "Usage"}}, params=name)},
            f"{PREFIX}/envs/{{name}}/exec": {
                "post": op("Run a command; output streamed as it comes", {"200": stream},
                           body="ExecRequest", params=name)},
            f"{PREFIX}/envs/{{name}}/execs/{{exec_id}}/signal": {
                "post": op("Send a signal to a running command: {\"signal\": \"TERM\"} "
                           "(HUP, INT, QUIT, TERM, USR1, USR2, CONT, STOP, TSTP, WINCH, "
                           "ALRM: to each of its processes; KILL: its whole tree, ended)",
                           {"204": {"description": "Sent"}},
                           params=[*name, {"name": "exec_id", "in": "path", "required": True,
                                           "schema": {"type": "string"}}])},
            f"{PREFIX}/envs/{{name}}/ttl": {
                "post": op("Extend the TTL: the environment ends `extend` seconds later, "
                           "within the max_ttl it was made with", {"200": env_response},
                           body="TtlRequest", params=name)},
            f"{PREFIX}/envs/{{name}}/install": {
                "post": op("Install packages", {"200": env_response}, body="InstallRequest",
                           params=name)},
            f"{PREFIX}/envs/{{name}}/files/{{path}}": {
                "get": op("Download a file of the environment's dir",
                          {"200": {"description": "The file",
                                   "content": {"application/octet-stream": {}}}},
                          params=file_path),
                "put": {**op("Upload a file into the environment's dir",
                             {"201": {"description": "Written"}}, params=file_path),
                        "requestBody": {"content": {"application/octet-stream": {}}}}},
            f"{PREFIX}/stats": {"get": op("Totals for the caller", {"200": {
                "description": "Stats"}})},
            f"{PREFIX}/openapi.json": {"get": {"summary": "This document",
                                               "responses": {"200": {"description": "OpenAPI"}}}},
        },
        "components": {"schemas": {
            "CreateRequest": {"type": "object", "properties": create,
                              "additionalProperties": False},
            "ExecRequest": {"type": "object", "properties": _props(_EXEC),
                            "required": ["command"], "additionalProperties": False},
            "InstallRequest": {"type": "object", "properties": _props(_INSTALL),
                               "additionalProperties": False},
            "TtlRequest": {"type": "object", "properties": _props(_TTL),
                           "required": ["extend"], "additionalProperties": False},
            "Environment": {"type": "object", "description": "As `gestvenv ephemeral show "
                            "--json` prints it"},
            "Event": {"type": "object", "required": ["event"], "properties": {
                "event": {"enum": ["created", "start", "stdout", "stderr", "keepalive",
                                   "exit", "error"]},
                "data": {"type": "string"}, "result": {"type": "object"},
                "problem": _ref("Problem")}},
            "Problem": {"type": "object", "required": ["type", "title", "status", "detail"],
                        "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                                       "status": {"type": "integer"},
                                       "detail": {"type": "string"}}},
        }},
    }
