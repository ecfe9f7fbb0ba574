"""``gestvenv serve``: the REST API over a unix socket (socket-activated by systemd, or bound by
itself), a shell over the library as the CLI is.

Why aiohttp: it is server and client in one (``gestvenv.connect`` uses the same stack), it takes
an inherited socket as it is (``SockSite``: systemd's, without unlinking its path at exit), it
gives the handler the connection's socket (``SO_PEERCRED``: who the caller is; ASGI servers do
not pass it through), and Debian packages it (python3-aiohttp, which the .deb depends on).

Who may do what: on the unix socket the caller is its peer credentials' uid. The service acts
on the environments of its own user; a caller of another uid (root excepted) is refused:
environments run as the caller (``User=``) through the system service are not built yet, and
acting as the service's user for them would hand that user's environments to anyone.

Bounds: request bodies, uploads, the output a client has not taken yet, concurrent streams and
connections are bounded; a connection that sends no request in time and a client that takes no
output are dropped. Every refusal is a problem document (RFC 9457), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import struct
import sys
import tempfile
import time
import traceback
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .. import registry
from ..config import Config, load_config
from ..context import attach, create_environment, destroy_environment, ephemeral
from ..exceptions import GestvenvError
from ..listing import environments
from . import protocol
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


@dataclass
class Service:
    config: Config
    limits: Limits = field(default_factory=Limits)
    idle_exit: float | None = None
    uid: int = field(default_factory=os.geteuid)
    active: int = 0
    streams: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    execs: dict[str, tuple[str, asyncio.Task[Any]]] = field(default_factory=dict)
    runner: web.AppRunner | None = None
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
    """The caller: its uid from SO_PEERCRED on the unix socket. Anything else is refused (TCP
    is not served)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        raise ApiError(403, "Forbidden", "only unix-socket callers are served")
    size = struct.calcsize("3i")
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         size))
    return Caller(uid=uid, pid=pid, via="unix")


def may_act(caller_uid: int, service_uid: int) -> bool:
    """Whether a caller may see and act on the service's environments: its own user's
    service, or root. (Pure: tested in tests/unit/test_api_protocol.py.)"""
    return caller_uid in (service_uid, 0)


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
        if not may_act(caller.uid, service.uid):
            raise ApiError(403, "Forbidden",
                           f"uid {caller.uid} may not act on the environments of uid "
                           f"{service.uid}: this service creates environments as its own "
                           "user; environments run as another user through the system "
                           "service are not built yet (use your own user's service: "
                           "$XDG_RUNTIME_DIR/gestvenv/api.sock)")
        request["caller"] = caller
        return await handler(request)
    except ApiError as exc:
        return _problem_response(exc)
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
    limit = _service(request).limits.max_json_body
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "Body too large", f"a request body is limited to {limit} bytes",
                       limit=limit)
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise ApiError(413, "Body too large", f"a request body is limited to {limit} bytes",
                       limit=limit)
    return protocol.json_body(raw)


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


async def _open_stream(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    if service.streams >= service.limits.max_streams:
        raise ApiError(429, "Too many streams",
                       f"the service runs {service.limits.max_streams} streams at most")
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
    while not task.done():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(outbox.ready.wait(), service.limits.keepalive)
        data = outbox.take()
        await _send(service, response, data or event("keepalive"))


# --- handlers ---

async def list_envs(request: web.Request) -> web.Response:
    return web.json_response(await environments())


async def show_env(request: web.Request) -> web.Response:
    env = await asyncio.to_thread(attach, _env_name(request))
    return web.json_response(env.info())


async def usage(request: web.Request) -> web.Response:
    env = await asyncio.to_thread(attach, _env_name(request))
    return web.json_response((await env.usage()).to_dict())


async def stats(request: web.Request) -> web.Response:
    from ..monitor import global_stats

    return web.json_response((await global_stats(_service(request).config)).to_dict())


async def destroy(request: web.Request) -> web.Response:
    await destroy_environment(_env_name(request), config=_service(request).config)
    return web.Response(status=204)


async def create(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    spec = protocol.create_request(await read_json(request))
    if spec.hold and service.streams >= service.limits.max_streams:
        raise ApiError(429, "Too many streams",
                       f"the service runs {service.limits.max_streams} streams at most")
    with _requirements_file(spec.requirements) as requirements:
        kwargs = {**spec.kwargs, "requirements": requirements, "config": service.config}
        if not spec.hold:
            env = await create_environment(**kwargs)
            return web.json_response(env.info(), status=201)
        # Held: the environment is this request's. The response stays open with a keepalive
        # every `keepalive` seconds; when the client goes (its process killed, its
        # connection cut), a write fails and the block's exit destroys the environment. If
        # this service dies instead, the env's creator (this process) is dead: its unit's
        # holder ends it, as for any creator.
        context = ephemeral(**kwargs)
        env = await context.__aenter__()
    service.streams += 1
    try:
        response = await _open_stream(request)
        await _send(service, response, event("created", environment=env.info()))
        while not service.stopping.is_set():
            await asyncio.sleep(service.limits.keepalive)
            if env.closed:
                break
            await _send(service, response, event("keepalive"))
        await response.write_eof()
        return response
    finally:  # the client gone (a failed write), the service stopping, or the env ended
        service.streams -= 1
        await context.__aexit__(None, None, None)


def _cwd(env_path: str, cwd: str | None) -> str:
    if cwd is None:
        return env_path
    return os.path.join(env_path, *protocol.relative_parts(cwd))


async def execute(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    spec = protocol.exec_request(await read_json(request))
    env = await asyncio.to_thread(attach, _env_name(request))
    cwd = _cwd(str(env.path), spec.cwd)
    outbox = Outbox(service.limits.max_pending_output)
    sent = {"stdout": 0, "stderr": 0}

    async def on_output(name: str, text: str) -> None:
        sent[name] += len(text)
        # Events of 8 Ki characters at most: a line stays under a client's line limit (64
        # KiB in aiohttp) even when JSON escapes every character.
        for start in range(0, len(text), 8192):
            await outbox.put(event(name, data=text[start:start + 8192]))

    # Resolved before the stream opens: a bad command is a plain error response.
    task = asyncio.ensure_future(env.execute(
        spec.command, shell=spec.shell, cwd=cwd, env=spec.env, timeout=spec.timeout,
        input=spec.stdin, stream=on_output, output_limit=service.limits.kept_output))
    exec_id = uuid.uuid4().hex[:16]
    service.execs[exec_id] = (env.name, task)
    service.streams += 1
    try:
        # The command is resolved (found, its cwd checked) before the task's first await: a
        # bad one is a plain error response, not a stream.
        await asyncio.sleep(0)
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        response = await _open_stream(request)
        await _send(service, response, event("start", exec_id=exec_id, command=spec.command))
        await _stream_task(service, response, outbox, task)
        tail = outbox.take()
        if tail:
            await _send(service, response, tail)
        try:
            result = task.result()
        except GestvenvError as exc:
            await _send(service, response, event("error", problem=protocol.error_of(exc)
                                                 .problem()))
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
    service = _service(request)
    body = await read_json(request)
    if not isinstance(body, dict) or set(body) - {"signal"}:
        raise ApiError(400, "Invalid request", "the body is {\"signal\": \"KILL\"}")
    name = str(body.get("signal", "KILL")).upper().removeprefix("SIG")
    if name != "KILL":
        raise ApiError(501, "Signal not supported",
                       f"SIG{name} is not delivered: the API ends a running command with "
                       "KILL only (its whole process tree, as the library's cancellation "
                       "does); other signals are not built yet")
    found = service.execs.get(request.match_info["exec_id"])
    if found is None or found[0] != _env_name(request):
        raise ApiError(404, "No such command",
                       "no running command with that id in that environment")
    found[1].cancel()
    return web.Response(status=204)


async def install(request: web.Request) -> web.Response:
    packages, requirements = protocol.install_request(await read_json(request))
    env = await asyncio.to_thread(attach, _env_name(request))
    with _requirements_file(requirements) as path:
        await env.install(packages, requirements=path)
    return web.json_response(env.info())


# --- files: inside the env's dir only, never through a symlink ---

def _walk(env_path: str, parts: list[str], *, create: bool) -> int:
    """An fd of the dir that holds the file ``parts`` name, reached component by component
    with O_NOFOLLOW from the env's own dir (a symlink anywhere on the way is refused)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(env_path, flags)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _path_error(path: str, exc: OSError) -> ApiError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return ApiError(403, "Unsafe path", f"{path!r}: a symlink or a non-directory is on the "
                        "way: files are reached inside the environment's dir only")
    if exc.errno == errno.ENOENT:
        return ApiError(404, "No such file", f"{path!r} does not exist in the environment")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(507, "Disk full", f"{path!r}: the environment's disk is full")
    if exc.errno == errno.EISDIR:
        return ApiError(409, "Is a directory", f"{path!r} is a directory")
    return ApiError(403 if exc.errno in (errno.EACCES, errno.EPERM) else 500,
                    "File error", f"{path!r}: {exc.strerror}")


async def put_file(request: web.Request) -> web.Response:
    service = _service(request)
    path = request.match_info["path"]
    parts = protocol.relative_parts(path)
    env = await asyncio.to_thread(attach, _env_name(request))
    record = registry.load(env.name)
    limit = service.limits.max_upload
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "Upload too large", f"a file is limited to {limit} bytes",
                       limit=limit)
    try:
        dir_fd = _walk(str(env.path), parts, create=True)
    except OSError as exc:
        raise _path_error(path, exc) from exc
    try:
        try:
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            raise _path_error(path, exc) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted there
                raise ApiError(403, "Unsafe path", f"{path!r} is not a regular file")
            if record.sandbox_uid is not None:  # its commands' own uid may change it
                os.fchown(fd, record.sandbox_uid, record.sandbox_uid)
            written = 0
            async for chunk in request.content.iter_chunked(1 << 16):
                written += len(chunk)
                if written > limit:
                    raise ApiError(413, "Upload too large", f"a file is limited to {limit} "
                                   "bytes", limit=limit)
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    raise _path_error(path, exc) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(parts[-1], dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    await asyncio.to_thread(registry.touch, record.name, record.id)
    return web.json_response({"path": path, "bytes": written}, status=201)


async def get_file(request: web.Request) -> web.StreamResponse:
    path = request.match_info["path"]
    parts = protocol.relative_parts(path)
    env = await asyncio.to_thread(attach, _env_name(request))
    try:
        dir_fd = _walk(str(env.path), parts, create=False)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise _path_error(path, exc) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ApiError(403, "Unsafe path", f"{path!r} is not a regular file")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = info.st_size
        request["stream"] = response
        await response.prepare(request)
        left = info.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
            await _send(_service(request), response, chunk)
        await response.write_eof()
        return response
    finally:
        os.close(fd)


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


def bind_unix(path: str, mode: int = 0o600) -> socket.socket:
    """A listening unix socket at ``path``; a stale socket there (a service gone) is replaced,
    anything else at that path is refused."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise GestvenvError(f"{path} exists and is not a socket: not replaced")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        else:
            raise GestvenvError(f"{path}: a service already listens there")
        finally:
            probe.close()
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
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


async def serve(sockets: list[socket.socket], *, config: Config | None = None,
                idle_exit: float | None = None, limits: Limits | None = None,
                ready: Callable[[], None] | None = None) -> None:
    """Serve the API on ``sockets`` until SIGTERM/SIGINT, or ``idle_exit`` seconds without a
    request or a connection (socket activation starts it again on the next one)."""
    import signal

    service = Service(config=config or load_config(), limits=limits or Limits(),
                      idle_exit=idle_exit)
    app = make_app(service)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=15.0)
    await runner.setup()
    service.runner = runner
    for sock in sockets:
        sock.setblocking(False)
        await web.SockSite(runner, sock).start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stopping.set)
    watcher = asyncio.ensure_future(_watch_connections(service))
    if ready is not None:
        ready()
    try:
        await service.stopping.wait()
    finally:
        watcher.cancel()
        # Held environments end with their streams (their blocks exit); commands are ended.
        await runner.cleanup()
