"""``gestvenv serve``: the REST API over a unix socket (socket-activated by systemd, or bound by
itself), a shell over the library as the CLI is.

Why aiohttp: it is server and client in one (``gestvenv.connect`` uses the same stack), it takes
an inherited socket as it is (``SockSite``: systemd's, without unlinking its path at exit), it
gives the handler the connection's socket (``SO_PEERCRED``: who the caller is; ASGI servers do
not pass it through), and Debian packages it (python3-aiohttp, which the .deb depends on).

Who may do what: on the unix socket the caller is its peer credentials' uid. A user's own
service serves that user (and root). Root's service serves root's environments to root, and
gives every other user environments of its own (:func:`access`): they run as that user, in a
sandbox, in the system manager's slices (``EnvSpec.run_as``), under names of their own
(``protocol.scoped_name``); the user sees those only, and its files are read and written by a
helper running as the user (:mod:`.files`). Over TCP (``--listen``), a bearer token whose
hash the service holds (:mod:`.tokens`) acts as the service's user; TLS unless on loopback.

Bounds: request bodies, uploads, the output a client has not taken yet, concurrent streams and
connections are bounded; a connection that sends no request in time and a client that takes no
output are dropped. Every refusal is a problem document (RFC 9457), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
import time
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import registry
from ..config import Config, load_config
from ..context import Environment, EphemeralContext, destroy_environment, resolve_spec
from ..exceptions import (
    EnvironmentClosedError,
    EnvironmentNotFoundError,
    GestvenvError,
    InvalidNameError,
)
from ..handle import CommandHandle, signal_number
from ..lifecycle import create as create_record
from ..listing import environments
from ..models import IsolationLevel
from ..names import MAX_NAME_LENGTH, generate_name, validate_name
from . import files, protocol, tokens
from .lifetime import STOPS
from .protocol import NDJSON, PROBLEM, ApiError, event

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Limits:
    """The service's bounds (defaults: :mod:`.protocol`; the tests shorten some)."""

    max_json_body: int = protocol.MAX_JSON_BODY
    max_upload: int = protocol.MAX_UPLOAD
    max_pending_output: int = protocol.MAX_PENDING_OUTPUT
    kept_output: int = protocol.KEPT_OUTPUT
    write_timeout: float = protocol.WRITE_TIMEOUT
    header_timeout: float = protocol.HEADER_TIMEOUT
    keepalive: float = protocol.KEEPALIVE
    max_streams: int = protocol.MAX_STREAMS
    max_connections: int = protocol.MAX_CONNECTIONS


@dataclass
class Caller:
    uid: int
    pid: int | None
    via: str  # "unix"
    # A user of root's service: it sees and acts on the environments made for it only, by
    # their names without its prefix (protocol.scoped_name); they run as its uid.
    scoped: bool = False


@dataclass
class Service:
    config: Config
    limits: Limits = field(default_factory=Limits)
    idle_exit: float | None = None
    uid: int = field(default_factory=os.geteuid)
    active: int = 0
    streams: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    # exec id -> (env name, the command's task, its handle: signals)
    execs: dict[str, tuple[str, asyncio.Task[Any], CommandHandle]] = field(default_factory=dict)
    # Signals being sent: one per command at a time, a few at once in all (each may scan
    # /proc in a worker thread: a caller's flood must not take the threads every request uses).
    signalling: set[str] = field(default_factory=set)
    signal_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    runner: web.AppRunner | None = None
    token_hashes: frozenset[str] = frozenset()  # (tokens.parse: the TCP callers' tokens)
    served: set[int] = field(default_factory=set)  # connections that sent a whole request
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


SERVICE: web.AppKey[Service] | str
try:
    SERVICE = web.AppKey("service", Service)
except AttributeError:  # aiohttp < 3.9 (Debian 12's 3.8): string keys
    SERVICE = "service"


def _service(request: web.Request) -> Service:
    return request.app[SERVICE]  # type: ignore[no-any-return,index,unused-ignore]


# --- identity ---

def peer_credentials(request: web.Request) -> Caller:
    """The caller: on the unix socket, its uid from SO_PEERCRED; over TCP, a bearer token
    whose hash the service holds, which acts as the service's own user."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        raise ApiError(403, "Forbidden", "no connection to identify")
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        if not tokens.accepted(request.headers.get("Authorization"),
                               _service(request).token_hashes):
            raise ApiError(401, "Unauthorized", "a valid bearer token is required over TCP "
                           "(Authorization: Bearer <token>)")
        return Caller(uid=_service(request).uid, pid=None, via="tcp")
    if sock.family != socket.AF_UNIX:
        raise ApiError(403, "Forbidden", "only unix-socket and TCP callers are served")
    size = struct.calcsize("3i")
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         size))
    return Caller(uid=uid, pid=pid, via="unix")


def access(caller_uid: int, service_uid: int) -> str | None:
    """What a caller may do: ``"service"``, act on the service user's environments (the
    service's own user, or root); ``"user"``, a user of root's service, on the environments
    made for it (they run as its uid); None: refused (another user of a user's service).
    (Pure: tests/unit/test_api_protocol.py.)"""
    if caller_uid in (service_uid, 0):
        return "service"
    if service_uid == 0:
        return "user"
    return None


# --- middleware: identity, accounting, problems ---

def _problem_response(error: ApiError) -> web.Response:
    return web.Response(status=error.status, text=json.dumps(error.problem()),
                        content_type=PROBLEM)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = _service(request)
    service.active += 1
    service.last_activity = time.monotonic()
    if request.transport is not None:
        service.served.add(id(request.transport))
    try:
        runner = service.runner
        if runner is not None and runner.server is not None and \
                len(runner.server.connections) > service.limits.max_connections:
            raise ApiError(503, "Too many connections",
                           f"the service takes {service.limits.max_connections} at most")
        caller = peer_credentials(request)
        granted = access(caller.uid, service.uid)
        if granted is None:
            raise ApiError(403, "Forbidden",
                           f"uid {caller.uid} may not act on the environments of uid "
                           f"{service.uid} (this is that user's own service; yours is "
                           "$XDG_RUNTIME_DIR/gestvenv/api.sock, or the system's)")
        caller.scoped = granted == "user"
        request["caller"] = caller
        return await handler(request)
    except ApiError as exc:
        response = _problem_response(exc)
        if request.get("close"):
            response.force_close()
        return response
    except GestvenvError as exc:
        return _problem_response(protocol.error_of(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.reason
        if exc.status == 404:
            detail = (f"no such route: {request.method} {request.path} (the API is under "
                      f"{protocol.PREFIX}; its document: {protocol.PREFIX}/openapi.json)")
        elif exc.status == 405:
            detail = f"{request.method} is not taken at {request.path}"
        return _problem_response(ApiError(exc.status, exc.reason, detail))
    except (ConnectionResetError, TimeoutError) as exc:
        # The client went, or took nothing for write_timeout, in the middle of a stream:
        # what it was doing has been ended (the handler's finally); one line for the journal.
        print(f"gestvenv serve: {request.method} {request.path}: client gone "
              f"({type(exc).__name__})", file=sys.stderr)
        stream = request.get("stream")
        if stream is not None:
            if request.transport is not None:
                request.transport.close()
            return stream  # type: ignore[no-any-return]
        raise
    except Exception as exc:  # never a traceback to the caller; the journal gets it
        traceback.print_exc(file=sys.stderr)
        return _problem_response(ApiError(500, "Internal error",
                                          f"{type(exc).__name__}: the service's journal "
                                          "has the details"))
    finally:
        service.active -= 1
        service.last_activity = time.monotonic()


# --- request bodies ---

async def read_json(request: web.Request) -> object:
    """The whole body (however many pieces it comes in), at most ``max_json_body`` bytes
    and ``header_timeout`` seconds."""
    limits = _service(request).limits
    too_large = ApiError(413, "Body too large",
                         f"a request body is limited to {limits.max_json_body} bytes",
                         limit=limits.max_json_body)
    if request.content_length is not None and request.content_length > limits.max_json_body:
        raise too_large
    try:
        async with asyncio.timeout(limits.header_timeout):
            raw = await request.read()  # (bounded: the app's client_max_size)
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    except TimeoutError:
        raise _slow_body(request, limits) from None
    return protocol.json_body(raw)


def _slow_body(request: web.Request, limits: Limits) -> ApiError:
    """A body that does not come: its connection is closed after the answer."""
    request["close"] = True
    return ApiError(408, "Request timeout",
                    f"the request body did not arrive within {limits.header_timeout:g} s")


@contextlib.contextmanager
def _requirements_file(content: str | None) -> Any:
    """A requirements file's content as a private file for the library, gone afterwards."""
    if content is None:
        yield None
        return
    folder = tempfile.mkdtemp(prefix="gestvenv-api-")
    try:
        path = os.path.join(folder, "requirements.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _env_name(request: web.Request) -> str:
    return request.match_info["name"]


def _spec_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """resolve_spec's keywords, those the request left out as None (the config's then)."""
    names = ("packages", "python", "resource_limits", "isolation_level", "storage_backend",
             "ttl", "idle_timeout", "allow_unenforced", "env")
    out: dict[str, Any] = {n: kwargs.get(n) for n in names}
    out["packages"] = out["packages"] or ()
    return out


# --- streams ---

class Outbox:
    """Output produced and not yet sent, bounded: past ``limit`` bytes the producer waits
    (the command's pipe fills, and the command waits on its writes, as for a slow terminal),
    so a slow client costs the service no memory; a client that takes nothing at all is
    dropped by the write timeout, and its command ended."""

    def __init__(self, limit: int) -> None:
        self.items: deque[bytes] = deque()
        self.size, self.limit = 0, limit
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def put(self, data: bytes) -> None:
        await self.room.wait()
        self.items.append(data)
        self.size += len(data)
        self.ready.set()
        if self.size >= self.limit:
            self.room.clear()

    def take(self) -> bytes:
        data = b"".join(self.items)
        self.items.clear()
        self.size = 0
        self.ready.clear()
        self.room.set()
        return data


def _take_stream(service: Service) -> None:
    """Count one more stream, or refuse it (before anything is started for it)."""
    if service.streams >= service.limits.max_streams:
        raise ApiError(429, "Too many streams",
                       f"the service runs {service.limits.max_streams} streams at most")
    service.streams += 1


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": NDJSON,
                                                       "Cache-Control": "no-store"})
    request["stream"] = response
    await response.prepare(request)
    return response


async def _send(service: Service, response: web.StreamResponse, data: bytes) -> None:
    """Write, waiting at most ``write_timeout`` for a client that takes nothing (aiohttp
    waits for the transport to drain past 64 KiB, without a bound of its own)."""
    async with asyncio.timeout(service.limits.write_timeout):
        await response.write(data)


async def _stream_task(service: Service, response: web.StreamResponse, outbox: Outbox,
                       task: asyncio.Task[Any]) -> None:
    """Send what ``task`` produces as it comes (and a keepalive when quiet) until it ends.
    Raises ConnectionResetError / TimeoutError when the client goes; the caller then ends
    the task."""
    task.add_done_callback(lambda _: outbox.ready.set())  # the exit goes out at once
    while not task.done() and not service.stopping.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(outbox.ready.wait(), service.limits.keepalive)
        data = outbox.take()
        if data or not task.done():
            await _send(service, response, data or event("keepalive"))


# --- handlers ---

def _public(info: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """An environment as the caller names it."""
    if not caller.scoped:
        return info
    return {**info, "name": protocol.unscoped_name(caller.uid, info["name"])}


def _load(name: str, caller: Caller, env_id: str | None = None) -> registry.EnvRecord:
    """The caller's environment ``name`` (a scoped caller's: made for its uid, or none);
    with ``env_id`` (the client's ``?id=``), only if it is still that environment: a name is
    reused, and a client acts on the env it made, never on a later one of the same name."""
    validate_name(name)
    try:
        record: registry.EnvRecord | None = registry.load(
            protocol.scoped_name(caller.uid, name) if caller.scoped else name)
    except EnvironmentNotFoundError:
        record = None
    if record is None or (caller.scoped and record.caller_uid != caller.uid):
        raise EnvironmentNotFoundError(f"no environment named {name!r}")
    if env_id is not None and record.id != env_id:
        raise EnvironmentClosedError(f"environment {name!r} ({env_id}) has ended; another "
                                     "of that name exists now")
    return record


async def _env_of(request: web.Request) -> tuple[Environment, registry.EnvRecord]:
    record = await asyncio.to_thread(_load, _env_name(request), request["caller"],
                                     request.query.get("id"))
    return Environment(record, _service(request).config, owned=False), record


async def list_envs(request: web.Request) -> web.Response:
    caller: Caller = request["caller"]
    listed = await environments()
    if caller.scoped:
        listed = [_public(i, caller) for i in listed if i.get("caller_uid") == caller.uid]
    return web.json_response(listed)


async def show_env(request: web.Request) -> web.Response:
    env, _ = await _env_of(request)
    return web.json_response(_public(env.info(), request["caller"]))


async def usage(request: web.Request) -> web.Response:
    env, _ = await _env_of(request)
    return web.json_response(_public((await env.usage()).to_dict(), request["caller"]))


async def stats(request: web.Request) -> web.Response:
    from ..monitor import global_stats

    if request["caller"].scoped:
        raise ApiError(403, "Forbidden", "the service's totals are its own user's: list your "
                       "environments, and each one's usage, instead")
    return web.json_response((await global_stats(_service(request).config)).to_dict())


async def destroy(request: web.Request) -> web.Response:
    _, record = await _env_of(request)
    await destroy_environment(record.name, config=_service(request).config)
    return web.Response(status=204)


async def create(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    spec = protocol.create_request(await read_json(request))
    caller: Caller = request["caller"]
    kwargs = dict(spec.kwargs)
    name = kwargs.pop("name", None)
    if caller.scoped:
        # Its own namespace of names, and a sandbox that runs it as the caller (its dir is
        # under root's storage: only a sandbox shows it to the caller's uid).
        _no_variables(kwargs.get("env"))
        name = _scoped(caller.uid, name if name is not None else generate_name())
        kwargs.setdefault("isolation_level", IsolationLevel.NAMESPACE.value)
    with _requirements_file(spec.requirements) as requirements:
        resolved = replace(resolve_spec(service.config, name, requirements=requirements,
                                        owned=spec.hold, runtime=None,
                                        **_spec_defaults(kwargs)),
                           run_as=caller.uid if caller.scoped else None)
        if not spec.hold:
            record = await create_record(resolved, service.config)
            env = Environment(record, service.config, owned=False)
            return web.json_response(_public(env.info(), caller), status=201)
        _take_stream(service)
        # Held: the environment is this request's. The response stays open with a keepalive
        # every `keepalive` seconds; when the client goes (its process killed, its
        # connection cut), a write fails and the block's exit destroys the environment. If
        # this service dies instead, the env's creator (this process) is dead: its unit's
        # holder ends it, as for any creator.
        context = EphemeralContext(resolved, service.config)
        try:
            env = await context.__aenter__()
        except BaseException:
            service.streams -= 1
            raise
    try:
        response = await _open_stream(request)
        await _send(service, response, event("created",
                                             environment=_public(env.info(), caller)))
        tick = 0
        while not service.stopping.is_set():
            await asyncio.sleep(service.limits.keepalive)
            tick += 1
            # Ended otherwise (a DELETE, a cleanup, its TTL): said, and the stream ends.
            if tick % 4 == 0 and not await asyncio.to_thread(_still, env.name, env.id):
                await _send(service, response, event("ended", reason="the environment was "
                                                     "destroyed (a DELETE, a cleanup, its TTL)"))
                break
            await _send(service, response, event("keepalive"))
        else:
            await _send(service, response, event("ended", reason="the service is stopping"))
        await response.write_eof()
        return response
    except (ConnectionResetError, TimeoutError):
        # The client went: that is how a held env ends (not an error of anyone's).
        if request.transport is not None:
            request.transport.close()
        return request.get("stream") or web.Response(status=204)
    finally:  # the client gone (a failed write), the service stopping, or the env ended
        service.streams -= 1
        await context.__aexit__(None, None, None)


def _no_variables(env: dict[str, str] | None) -> None:
    """A user of root's service sets no variable of a command's: they would reach the
    sandbox's launcher (setpriv, bwrap), which starts as root (LD_PRELOAD: root's code)."""
    if env:
        raise ApiError(400, "Invalid request",
                       "'env' is not taken from users of root's service (the sandbox's "
                       "launcher starts as root, with a command's variables): set them inside "
                       "the command (env NAME=VALUE ...)", field="env")


def _scoped(uid: int, name: str) -> str:
    """A user's name in root's registry; its limit said in the user's terms."""
    validate_name(name)
    scoped = protocol.scoped_name(uid, name)
    room = MAX_NAME_LENGTH - (len(scoped) - len(name))
    if len(scoped) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"environment name is {len(name)} characters long; at most "
                               f"{room} through root's service")
    return scoped


def _still(name: str, env_id: str) -> bool:
    try:
        return registry.load(name).id == env_id
    except EnvironmentNotFoundError:
        return False


def _cwd(env_path: str, cwd: str | None) -> str:
    if cwd is None:
        return env_path
    return os.path.join(env_path, *protocol.relative_parts(cwd))


async def execute(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    spec = protocol.exec_request(await read_json(request))
    if request["caller"].scoped:
        _no_variables(spec.env)
    env, _ = await _env_of(request)
    cwd = _cwd(str(env.path), spec.cwd)
    outbox = Outbox(service.limits.max_pending_output)
    sent = {"stdout": 0, "stderr": 0}

    async def on_output(name: str, text: str) -> None:
        sent[name] += len(text)
        # Events of 8 Ki characters at most: a line stays under a client's line limit (64
        # KiB in aiohttp) even when JSON escapes every character.
        for start in range(0, len(text), 8192):
            await outbox.put(event(name, data=text[start:start + 8192]))

    _take_stream(service)
    # Resolved before the stream opens: a bad command is a plain error response.
    handle = CommandHandle()
    handle._walks = service.signal_slots
    task = asyncio.ensure_future(env.execute(
        spec.command, shell=spec.shell, cwd=cwd, env=spec.env, timeout=spec.timeout,
        input=spec.stdin, stream=on_output, output_limit=service.limits.kept_output,
        handle=handle))
    exec_id = uuid.uuid4().hex[:16]
    service.execs[exec_id] = (env.name, task, handle)
    response: web.StreamResponse | None = None
    try:
        # The command is resolved (found, its cwd checked) before the task's first await: a
        # bad one is a plain error response, not a stream.
        await asyncio.sleep(0)
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        response = await _open_stream(request)
        await _send(service, response, event("start", exec_id=exec_id, command=spec.command))
        await _stream_task(service, response, outbox, task)
        if not task.done():  # the service is stopping: the command ends with it
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await _send(service, response, event("error", problem=protocol.problem(
                503, "Service stopping", "the service stopped: the command was killed")))
            await response.write_eof()
            return response
        tail = outbox.take()
        if tail:
            await _send(service, response, tail)
        try:
            result = task.result()
        except GestvenvError as exc:
            await _send(service, response, event("error", problem=protocol.error_of(exc)
                                                 .problem()))
        except asyncio.CancelledError:
            await _send(service, response, event("error", problem=protocol.problem(
                409, "Command killed", "the command was killed (a KILL signal)")))
        except Exception as exc:  # the stream is open: said there, not as a second status
            traceback.print_exc(file=sys.stderr)
            await _send(service, response, event("error", problem=protocol.problem(
                500, "Internal error", f"{type(exc).__name__}: the service's journal has "
                "the details")))
        else:
            await _send(service, response, event("exit", result={
                "argv": list(result.argv), "returncode": result.returncode,
                "duration": result.duration, "killed_by": result.killed_by,
                "oom_killed": result.oom_killed, "peak_memory_bytes": result.peak_memory_bytes,
                "cpu_seconds": result.cpu_seconds},
                stdout_chars=sent["stdout"], stderr_chars=sent["stderr"]))
        await response.write_eof()
        return response
    finally:  # (a client gone: a failed write; the command is ended here)
        service.streams -= 1
        service.execs.pop(exec_id, None)
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def signal_exec(request: web.Request) -> web.Response:
    """A signal for a running command: KILL ends its whole tree (the library's cancellation);
    any other sendable signal goes to each of its processes, which may handle it."""
    service = _service(request)
    body = await read_json(request)
    if not isinstance(body, dict) or set(body) - {"signal"} or \
            not isinstance(body.get("signal", "KILL"), str | int):
        raise ApiError(400, "Invalid request", "the body is {\"signal\": \"TERM\"}")
    signum = signal_number(body.get("signal", "KILL"))  # (ValidationError: 400, says which)
    _, record = await _env_of(request)
    found = service.execs.get(request.match_info["exec_id"])
    if found is None or found[0] != record.name:
        raise ApiError(404, "No such command",
                       "no running command with that id in that environment")
    exec_id = request.match_info["exec_id"]
    if signum == signal.SIGKILL:
        found[1].cancel()
        return web.Response(status=204)
    if exec_id in service.signalling:
        raise ApiError(429, "Signal in progress", "a signal for this command is still being "
                       "sent: send the next one once it is answered")
    service.signalling.add(exec_id)
    try:
        # (Its walks of /proc take the service's slots, each on its own: see the handle made
        # in exec_command. A command still starting, or whose wrapper has not yet started
        # it, is waited for holding none.)
        await found[2].signal(signum)
    finally:
        service.signalling.discard(exec_id)
    return web.Response(status=204)


async def extend_ttl(request: web.Request) -> web.Response:
    seconds = protocol.ttl_request(await read_json(request))
    env, _ = await _env_of(request)
    await env.extend_ttl(seconds)
    return web.json_response(_public(env.info(), request["caller"]))


async def install(request: web.Request) -> web.Response:
    packages, requirements = protocol.install_request(await read_json(request))
    env, _ = await _env_of(request)
    with _requirements_file(requirements) as path:
        await env.install(packages, requirements=path)
    return web.json_response(_public(env.info(), request["caller"]))


# --- files: inside the env's dir only, never through a symlink, checked as the caller ---

def _path_error(path: str, err: int | None, strerror: str | None = None) -> ApiError:
    if err in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return ApiError(403, "Unsafe path", f"{path!r}: a symlink or a non-directory is on the "
                        "way: files are reached inside the environment's dir only")
    if err == errno.ENOENT:
        return ApiError(404, "No such file", f"{path!r} does not exist in the environment")
    if err in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(507, "Disk full", f"{path!r}: the environment's disk is full")
    if err == errno.EISDIR:
        return ApiError(409, "Is a directory", f"{path!r} is a directory")
    if err in (errno.EPERM, errno.ENXIO):
        return ApiError(403, "Unsafe path", f"{path!r} is not a regular file")
    return ApiError(403 if err == errno.EACCES else 500, "File error",
                    f"{path!r}: {strerror or os.strerror(err or 0)}")


def _env_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


_FILES_PYTHON = "/usr/bin/python3"  # stdlib only: any user can run it (a venv's may be hidden)


@functools.cache
def _files_source() -> str:
    return Path(files.__file__).read_text()


async def _as_caller(uid: int, op: str, env_path: str, path: str, limit: int,
                     ) -> asyncio.subprocess.Process:
    """files.py run as ``uid`` (and its gid, no other group) on the env's dir, handed as an
    fd: every check on the way is the caller's, not root's."""
    source = _files_source()
    dirfd = _env_dir(env_path)
    try:
        python = _FILES_PYTHON if os.access(_FILES_PYTHON, os.X_OK) else sys.executable
        return await asyncio.create_subprocess_exec(
            python, "-I", "-S", "-c", source, op, str(dirfd), path, str(limit),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, pass_fds=(dirfd,), user=uid, group=uid,
            extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/")
    finally:
        os.close(dirfd)


def _child_error(path: str, stderr: bytes) -> ApiError:
    text = stderr.decode(errors="replace").strip()
    return _path_error(path, int(text)) if text.isdigit() else \
        ApiError(500, "File error", f"{path!r}: the file helper failed")


async def _body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """An upload's body as it comes; each piece within ``header_timeout`` (a client that
    stops sending is dropped, not waited for)."""
    limits = _service(request).limits
    while True:
        try:
            async with asyncio.timeout(limits.header_timeout):
                chunk = await request.content.readany()
        except TimeoutError:
            raise _slow_body(request, limits) from None
        if not chunk:
            return
        yield chunk


async def put_file(request: web.Request) -> web.Response:
    service = _service(request)
    path = request.match_info["path"]
    parts = protocol.relative_parts(path)
    env, record = await _env_of(request)
    limit = service.limits.max_upload
    too_large = ApiError(413, "Upload too large", f"a file is limited to {limit} bytes",
                         limit=limit)
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    written = 0
    if request["caller"].scoped:
        # Written by a helper running as the caller: it commits only a complete, framed body.
        child = await _as_caller(request["caller"].uid, "put", str(env.path), path, limit)
        assert child.stdin is not None
        complete = False
        try:
            async for chunk in _body_chunks(request):
                written += len(chunk)
                if written > limit:
                    break
                child.stdin.write(files.frame(chunk))
                await child.stdin.drain()
            else:
                child.stdin.write(files.frame(b""))
                await child.stdin.drain()
                complete = True
        except (BrokenPipeError, ConnectionResetError):
            pass  # (the helper stopped: its status says why)
        finally:  # (closed before the last frame: the helper abandons the upload)
            with contextlib.suppress(OSError):
                child.stdin.close()
            _, err = await child.communicate()
        if not complete and written <= limit and child.returncode == files.ABANDONED:
            raise ConnectionResetError("the upload's body ended before its end")
        if written > limit or child.returncode == files.TOO_LARGE:
            raise too_large
        if child.returncode != 0:
            raise _child_error(path, err)
    else:
        try:
            dirfd = _env_dir(str(env.path))
            try:
                folder, fd, temp = files.open_upload(dirfd, parts, record.sandbox_uid)
            finally:
                os.close(dirfd)
        except OSError as exc:
            raise _path_error(path, exc.errno, exc.strerror) from exc
        try:
            try:
                async for chunk in _body_chunks(request):
                    written += len(chunk)
                    if written > limit:
                        raise too_large
                    os.write(fd, chunk)
                os.close(fd)
                fd = -1
                files.commit(folder, temp, parts[-1])
            except OSError as exc:
                raise _path_error(path, exc.errno, exc.strerror) from exc
        except BaseException:
            files.abandon(folder, temp)  # (the file it would replace is left as it was)
            raise
        finally:
            if fd >= 0:
                os.close(fd)
            os.close(folder)
    await asyncio.to_thread(registry.touch, record.name, record.id)
    return web.json_response({"path": path, "bytes": written}, status=201)


async def get_file(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    path = request.match_info["path"]
    parts = protocol.relative_parts(path)
    env, _ = await _env_of(request)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request["caller"].scoped:
        child = await _as_caller(request["caller"].uid, "get", str(env.path), path, 0)
        assert child.stdout is not None and child.stdin is not None
        child.stdin.close()
        first = await child.stdout.read(1 << 16)
        if not first:
            _, err = await child.communicate()
            if child.returncode != 0:
                raise _child_error(path, err)
        request["stream"] = response  # (chunked: its end says it is whole)
        await response.prepare(request)
        try:
            chunk = first
            while chunk:
                await _send(service, response, chunk)
                chunk = await child.stdout.read(1 << 16)
            await child.wait()
            if child.returncode != 0:
                _abort(request)  # a cut body, never one that looks whole
                return response
        finally:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
        await response.write_eof()
        return response
    try:
        dirfd = _env_dir(str(env.path))
        try:
            fd = files.open_file(dirfd, parts)
        finally:
            os.close(dirfd)
    except OSError as exc:
        raise _path_error(path, exc.errno, exc.strerror) from exc
    try:
        size = os.fstat(fd).st_size
        response.content_length = size
        request["stream"] = response
        await response.prepare(request)
        left = size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                # The file shrank while it was sent (the env's code may do that): the
                # connection is cut, so that what follows is never taken for the file's rest.
                _abort(request)
                return response
            left -= len(chunk)
            await _send(service, response, chunk)
        await response.write_eof()
        return response
    finally:
        os.close(fd)


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(protocol.openapi())


def make_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=service.limits.max_json_body)
    app[SERVICE] = service  # type: ignore[index,unused-ignore]
    p = protocol.PREFIX
    app.router.add_get(f"{p}/openapi.json", openapi)
    app.router.add_get(f"{p}/envs", list_envs)
    app.router.add_post(f"{p}/envs", create)
    app.router.add_get(f"{p}/envs/{{name}}", show_env)
    app.router.add_delete(f"{p}/envs/{{name}}", destroy)
    app.router.add_get(f"{p}/envs/{{name}}/usage", usage)
    app.router.add_post(f"{p}/envs/{{name}}/exec", execute)
    app.router.add_post(f"{p}/envs/{{name}}/execs/{{exec_id}}/signal", signal_exec)
    app.router.add_post(f"{p}/envs/{{name}}/ttl", extend_ttl)
    app.router.add_post(f"{p}/envs/{{name}}/install", install)
    app.router.add_put(f"{p}/envs/{{name}}/files/{{path:.+}}", put_file)
    app.router.add_get(f"{p}/envs/{{name}}/files/{{path:.+}}", get_file)
    app.router.add_get(f"{p}/stats", stats)
    return app


# --- sockets and the service's life ---

def inherited_sockets() -> list[socket.socket]:
    """The sockets systemd passed (sd_listen_fds): none unless LISTEN_PID is this process.
    The variables are removed, so that no command run in an environment inherits them."""
    fds = int(os.environ.get("LISTEN_FDS", "0") or 0) \
        if os.environ.get("LISTEN_PID") == str(os.getpid()) else 0
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    socks = []
    for fd in range(3, 3 + fds):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def bind_tcp(address: str) -> socket.socket:
    """A listening TCP socket for ``tcp://HOST:PORT`` (``[v6]`` in brackets)."""
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise GestvenvError(f"{address!r}: a TCP address is tcp://HOST:PORT")
    family = socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((parts.hostname, parts.port))
    except OSError as exc:
        sock.close()
        raise GestvenvError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.listen(128)
    return sock


async def _watch_connections(service: Service) -> None:
    """Idle exit, and connections that send no complete request in time (slowloris): aiohttp
    has no timeout for a request's head."""
    first_seen: dict[int, float] = {}
    while not service.stopping.is_set():
        await asyncio.sleep(min(1.0, service.limits.header_timeout / 2))
        runner = service.runner
        if runner is None or runner.server is None:
            continue
        now = time.monotonic()
        live = {}
        for handler in list(runner.server.connections):
            transport = getattr(handler, "transport", None)
            if transport is None:
                continue
            key = id(transport)
            live[key] = first_seen.get(key, now)
            if key not in service.served and now - live[key] > service.limits.header_timeout:
                transport.close()  # no complete request in time
        first_seen = live
        service.served &= set(live)
        if service.idle_exit is not None and service.active == 0 and not service.streams \
                and not runner.server.connections \
                and now - service.last_activity >= service.idle_exit:
            service.stopping.set()


def _quiet_client_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client gone in the middle of a write is one line for the journal, not a traceback
    (aiohttp 3.8 leaves such a write's future unretrieved)."""
    if isinstance(context.get("exception"), ConnectionError):
        print(f"gestvenv serve: a client went: {context['exception']!r}", file=sys.stderr)
        return
    loop.default_exception_handler(context)


def check_tcp(sock: socket.socket, tls: bool, token_hashes: frozenset[str]) -> None:
    """A TCP socket is served with tokens, and with TLS unless it listens on loopback only:
    refused before anything is served."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = sock.getsockname()[0]
    if not token_hashes:
        raise GestvenvError(f"TCP ({host}) needs bearer tokens: --tokens FILE (make one with "
                            "`gestvenv serve --new-token FILE`)")
    if not tls and not protocol.is_loopback(host):
        raise GestvenvError(f"TCP on {host} needs TLS (--tls-cert and --tls-key): only "
                            "loopback is served in clear")


def _hand_back(loop: asyncio.AbstractEventLoop, previous: dict[int, Any]) -> None:
    """SIGTERM and SIGINT as they were before serve() took them (``gestvenv serve``: noted,
    gestvenv.api.lifetime). Left to the loop, its close would put them to their default
    action while the process still has work to do (removing its socket): a second Ctrl-C
    there killed the service. Blocked meanwhile in this thread; another thread (the child
    watcher's, while a child lives) could take one in the microseconds between the two
    calls."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


async def serve(sockets: list[socket.socket], *, config: Config | None = None,
                idle_exit: float | None = None, limits: Limits | None = None,
                ready: Callable[[], None] | None = None, tls: ssl.SSLContext | None = None,
                token_hashes: frozenset[str] = frozenset(),
                stop_asked: Callable[[], bool] | None = None) -> None:
    """Serve the API on ``sockets`` until SIGTERM/SIGINT, or ``idle_exit`` seconds without a
    request or a connection (socket activation starts it again on the next one).
    ``stop_asked``: whether a stop came before the service took the signals over (it then
    stops as soon as it has started)."""
    for sock in sockets:
        check_tcp(sock, tls is not None, token_hashes)
    # Run from an empty dir of its own: nothing a request names can resolve against the
    # service's working dir (an installer takes a bare existing path as a local project).
    workdir = tempfile.mkdtemp(prefix="gestvenv-serve-")
    runner: web.AppRunner | None = None
    watcher: asyncio.Future[None] | None = None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    try:  # (a failure or SIGTERM while starting leaves no workdir either)
        os.chdir(workdir)
        service = Service(config=config or load_config(), limits=limits or Limits(),
                          idle_exit=idle_exit, token_hashes=token_hashes)
        app = make_app(service)
        # Stopping waits this long for handlers: every stream ends at once when the service
        # stops (its loops look at `stopping`), so a short wait is enough.
        # After an answer to a request whose body was not read (refused, or slow), aiohttp reads
        # what is left for `lingering_time` (10 s by default): a client that sends nothing more
        # would hold its connection that long.
        options: dict[str, Any] = {"access_log": None, "handle_signals": False,
                                   "keepalive_timeout": 15.0, "lingering_time": 1.0}
        site_options: dict[str, Any] = {}
        # (aiohttp >= 3.9: the runner's; before, the site's: the runner would pass it on to
        # each connection's handler, which refuses it)
        if "shutdown_timeout" in inspect.signature(web.AppRunner.__init__).parameters:
            options["shutdown_timeout"] = 5.0
        else:
            site_options["shutdown_timeout"] = 5.0
        runner = web.AppRunner(app, **options)
        await runner.setup()
        service.runner = runner
        for sock in sockets:
            sock.setblocking(False)
            tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
            await web.SockSite(runner, sock, ssl_context=tls if tcp else None,
                               **site_options).start()
        loop.set_exception_handler(_quiet_client_errors)
        for signum in STOPS:
            previous[signum] = signal.getsignal(signum)
            loop.add_signal_handler(signum, service.stopping.set)
        if stop_asked is not None and stop_asked():
            service.stopping.set()
        watcher = asyncio.ensure_future(_watch_connections(service))
        if ready is not None:
            ready()
        await service.stopping.wait()
    finally:
        try:
            if watcher is not None:
                watcher.cancel()
            if runner is not None:
                # Held environments end with their streams (their blocks exit); commands end.
                await runner.cleanup()
        finally:
            os.chdir("/")
            shutil.rmtree(workdir, ignore_errors=True)
            _hand_back(loop, previous)
