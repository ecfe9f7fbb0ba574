"""``gestvenv.connect(url)``: the library's API, served by a ``gestvenv serve`` elsewhere.

    client = gestvenv.connect("unix:///run/gestvenv/api.sock")
    async with client.ephemeral("job", packages=["six"], ttl=300) as env:
        result = await env.execute(["python", "-c", "import six"])

An environment made by ``client.ephemeral()`` belongs to this client's connection: the service
holds it while the create request's response stream is open, and ends it when the stream ends
(this block's exit, or this process killed: the kernel closes the socket). One made by
``create_environment()`` (a TTL, no owner) lives on, as in the library.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from ..exceptions import EnvironmentClosedError, GestvenvError, ValidationError
from ..models import ExecResult, IsolationLevel, ResourceLimits, StorageBackend
from ..runtime.base import console_stream
from . import protocol

if TYPE_CHECKING:
    from ..handle import CommandHandle

StreamCallback = Any  # (name, text) -> None, as for Environment.execute


def default_socket(euid: int | None = None) -> str:
    """The local service's socket: the system one for root, the user's own otherwise."""
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return "/run/gestvenv/api.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{euid}"
    return os.path.join(runtime, "gestvenv", "api.sock")


def _import_aiohttp() -> Any:
    try:
        import aiohttp
    except ImportError:
        raise GestvenvError(
            "the API client needs aiohttp, a dependency of gestvenv (apt install "
            "python3-aiohttp)") from None
    return aiohttp


class Client:
    """A connection to a gestvenv service: ``unix:///path/to/api.sock`` (``unix:`` alone: the
    local service's default socket), or ``https://host:port`` with a bearer token
    (``http://`` to a loopback address only)."""

    def __init__(self, url: str, token: str | None = None, *,
                 cafile: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            self._socket: str | None = parts.path or default_socket()
            self._base = "http://gestvenv"
        elif parts.scheme in ("http", "https"):
            self._socket = None
            self._base = f"{parts.scheme}://{parts.netloc}"
            if parts.scheme == "http" and token and \
                    not protocol.is_loopback(parts.hostname or ""):
                raise ValidationError(f"{url!r}: a token is sent over https only (or to a "
                                      "loopback address)")
        else:
            raise ValidationError(f"{url!r}: a gestvenv URL is unix:///path/to/api.sock or "
                                  "http(s)://host:port")
        self.url, self._token, self._cafile = url, token, cafile
        self._session: Any = None

    # --- plumbing ---

    async def _open(self) -> Any:
        aiohttp = _import_aiohttp()
        if self._session is None or self._session.closed or \
                self._session._loop is not asyncio.get_running_loop():
            if self._socket:
                connector = aiohttp.UnixConnector(path=self._socket)
            else:
                import ssl

                connector = aiohttp.TCPConnector(
                    ssl=ssl.create_default_context(cafile=self._cafile))
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            self._session = aiohttp.ClientSession(
                connector=connector, headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _url(self, path: str) -> str:
        return f"{self._base}{protocol.PREFIX}{path}"

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       data: Any = None) -> Any:
        aiohttp = _import_aiohttp()
        session = await self._open()
        try:
            response = await session.request(method, self._url(path), json=json_body,
                                              data=data)
        except aiohttp.ClientConnectionError as exc:
            raise GestvenvError(f"cannot reach the gestvenv service at {self.url}: {exc}") \
                from None
        return response

    @staticmethod
    async def _check(response: Any) -> Any:
        if response.status < 400:
            return response
        try:
            document = json.loads(await response.read())
        except ValueError:
            document = {"status": response.status, "detail": response.reason}
        response.release()
        raise protocol.library_error(document)

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        response = await self._check(await self._request(method, path, json_body=body))
        try:
            if response.status == 204:
                return None
            return json.loads(await response.read())
        finally:
            response.release()

    # --- the library's API ---

    async def list_environments(self) -> list[dict[str, Any]]:
        return list(await self._json("GET", "/envs"))

    async def global_stats(self) -> dict[str, Any]:
        return dict(await self._json("GET", "/stats"))

    async def openapi(self) -> dict[str, Any]:
        return dict(await self._json("GET", "/openapi.json"))

    async def attach(self, name: str) -> RemoteEnvironment:
        info = await self._json("GET", f"/envs/{quote(name, safe='')}")
        return RemoteEnvironment(self, info)

    async def destroy_environment(self, name: str) -> None:
        await self._json("DELETE", f"/envs/{quote(name, safe='')}")

    async def cleanup_environments(self, names: Iterable[str]) -> dict[str, Any]:
        """Destroy ``names`` (the remote form of ``cleanup NAME...``): what was removed and
        the errors, as :class:`gestvenv.CleanupReport.to_dict` gives them."""
        report: dict[str, Any] = {"removed": {}, "errors": {}, "orphan_paths": []}
        for name in names:
            try:
                await self.destroy_environment(name)
                report["removed"][name] = "requested"
            except GestvenvError as exc:
                report["errors"][name] = str(exc)
        return report

    async def create_environment(self, name: str | None = None, **kwargs: Any
                                 ) -> RemoteEnvironment:
        """An environment that outlives this client (until its TTL or a cleanup)."""
        info = await self._json("POST", "/envs", create_body(name, hold=False, **kwargs))
        return RemoteEnvironment(self, info)

    def ephemeral(self, name: str | None = None, **kwargs: Any) -> RemoteContext:
        """An environment for the duration of an ``async with`` block, owned by this client's
        connection: ``ephemeral()``'s parameters."""
        return RemoteContext(self, create_body(name, hold=True, **kwargs))

    def ephemeral_sync(self, name: str | None = None, **kwargs: Any) -> SyncRemoteContext:
        """:meth:`ephemeral` for a ``with`` block, without asyncio (as
        ``gestvenv.ephemeral_sync``): on the library's blocking portal."""
        return SyncRemoteContext(self.ephemeral(name, **kwargs))


def _read_text(path: str | os.PathLike[str]) -> str:
    """A requirements file, sent as its content (small: the service takes 1 MiB at most)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(protocol.MAX_JSON_BODY + 1)
    except OSError as exc:
        raise ValidationError(f"requirements file {os.fspath(path)!r}: {exc.strerror}") \
            from None


def create_body(name: str | None, *, hold: bool, packages: Iterable[str] = (),
                requirements: str | os.PathLike[str] | None = None, python: str | None = None,
                resource_limits: ResourceLimits | None = None,
                isolation_level: IsolationLevel | str | None = None,
                storage_backend: StorageBackend | str | None = None, ttl: int | None = None,
                idle_timeout: int | None = None, env: Mapping[str, str] | None = None,
                allow_unenforced: bool | None = None) -> dict[str, Any]:
    """A create request's body from ``ephemeral()``'s parameters (a requirements file is sent
    as its content)."""
    body: dict[str, Any] = {"hold": hold, "packages": list(packages)}
    if name is not None:
        body["name"] = name
    if requirements is not None:
        body["requirements"] = _read_text(requirements)
    if resource_limits is not None:
        body["resource_limits"] = resource_limits.to_dict()
    for key, value in (("python", python), ("ttl", ttl), ("idle_timeout", idle_timeout),
                       ("allow_unenforced", allow_unenforced),
                       ("isolation_level", getattr(isolation_level, "value", isolation_level)),
                       ("storage_backend", getattr(storage_backend, "value", storage_backend)),
                       ("env", dict(env) if env is not None else None)):
        if value is not None:
            body[key] = value
    return body


class RemoteContext:
    """``async with client.ephemeral(...) as env``: the create request's stream held open
    for the block (its end ends the environment)."""

    def __init__(self, client: Client, body: dict[str, Any]) -> None:
        self._client, self._body = client, body
        self._response: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.env: RemoteEnvironment | None = None

    async def __aenter__(self) -> RemoteEnvironment:
        response = await self._client._check(
            await self._client._request("POST", "/envs", json_body=self._body))
        line = await response.content.readline()
        first = json.loads(line) if line else {}
        if first.get("event") != "created":
            response.close()
            raise GestvenvError(f"the service did not create the environment: {first!r}")
        self._response = response
        self.env = RemoteEnvironment(self._client, first["environment"])
        self._reader = asyncio.ensure_future(self._drain(response))
        return self.env

    async def _drain(self, response: Any) -> None:
        with contextlib.suppress(Exception):
            async for _ in response.content:
                pass  # keepalives: read, so that the service's writes never stall
        if self.env is not None:
            self.env._ended = True

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self.env is not None:
                # Destroyed, and waited for, so that the block's exit means "gone" as in the
                # library: this env only (its id), never a later one of its name.
                with contextlib.suppress(GestvenvError):
                    await self.env.aclose()
        finally:
            if self._reader is not None:
                self._reader.cancel()
            if self._response is not None:
                self._response.close()  # (the stream's end: had the DELETE failed, the
                #                          service destroys the env anyway)


class RemoteEnvironment:
    """An environment of the service, with :class:`gestvenv.Environment`'s methods."""

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        self._client, self.info = client, info
        self._ended = False

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def id(self) -> str:
        return str(self.info.get("id", ""))

    @property
    def path(self) -> str:
        return str(self.info.get("path", ""))

    def __repr__(self) -> str:
        return f"<RemoteEnvironment {self.name!r} at {self._client.url}>"

    def _at(self, suffix: str = "") -> str:
        """This environment's route, with its id: the service refuses it (410) once the
        name is another environment's."""
        return f"/envs/{quote(self.name, safe='')}{suffix}?id={quote(self.id, safe='')}"

    async def execute(self, cmd: str | list[str], *, timeout: float | None = None,
                      cwd: str | None = None, env: Mapping[str, str] | None = None,
                      input: str | bytes | None = None, check: bool = False,
                      shell: bool = False, stream: bool | StreamCallback = False,
                      handle: CommandHandle | None = None) -> ExecResult:
        """Run a command in the environment, its output streamed as it comes; ``cwd`` is
        relative to the environment's dir; ``handle``: signals sent to it while it runs (as
        the library's)."""
        import base64

        from ..exceptions import CommandError

        if self._ended:
            raise EnvironmentClosedError(f"environment {self.name!r} has ended")
        body: dict[str, Any] = {"command": cmd if isinstance(cmd, str) else list(cmd),
                                "shell": shell}
        if timeout is not None:
            body["timeout"] = timeout
        if cwd is not None:
            body["cwd"] = cwd
        if env:
            body["env"] = dict(env)
        if isinstance(input, str):
            body["stdin"] = input
        elif input is not None:
            body["stdin_base64"] = base64.b64encode(input).decode()
        show = console_stream(stream)
        started = time.monotonic()
        if handle is not None:
            handle._take()  # (before the request: a busy handle starts nothing)
        out: dict[str, list[str]] = {"stdout": [], "stderr": []}
        final: dict[str, Any] | None = None
        response: Any = None
        try:
            response = await self._client._check(
                await self._client._request("POST", self._at("/exec"), json_body=body))
            while line := await _readline(response):
                message = json.loads(line)
                kind = message.get("event")
                if kind == "start" and handle is not None:
                    handle._arm(functools.partial(self._signal, str(message["exec_id"])))
                elif kind in ("stdout", "stderr"):
                    out[kind].append(message["data"])
                    if show is not None:
                        show(kind, message["data"])
                elif kind == "exit":
                    final = message["result"]
                elif kind == "error":
                    raise protocol.library_error(message["problem"])
        finally:
            if handle is not None:
                handle._disarm()
            if response is not None:
                response.release()
        if final is None:
            raise GestvenvError(f"the service ended the command's stream without its result "
                                f"(environment {self.name!r})")
        result = ExecResult(argv=tuple(final["argv"]), returncode=final["returncode"],
                            stdout="".join(out["stdout"]), stderr="".join(out["stderr"]),
                            duration=final.get("duration", time.monotonic() - started),
                            killed_by=final.get("killed_by"),
                            oom_killed=bool(final.get("oom_killed")),
                            peak_memory_bytes=final.get("peak_memory_bytes"),
                            cpu_seconds=final.get("cpu_seconds"))
        if check and not result.ok:
            raise CommandError(result)
        return result

    async def extend_ttl(self, seconds: float) -> float:
        """The environment's end, ``seconds`` later (as the library's); returns it."""
        shown = await self._client._json("POST", self._at("/ttl"), {"extend": seconds})
        self.info = shown
        return float(shown["expires_at"])

    async def _signal(self, exec_id: str, signum: int) -> None:
        await self._client._json(
            "POST", self._at(f"/execs/{quote(exec_id, safe='')}/signal"),
            {"signal": signal.Signals(signum).name.removeprefix("SIG")})

    async def install(self, packages: Iterable[str] = (), *,
                      requirements: str | os.PathLike[str] | None = None) -> None:
        body: dict[str, Any] = {"packages": list(packages)}
        if requirements is not None:
            body["requirements"] = _read_text(requirements)
        self.info = await self._client._json("POST", self._at("/install"), body)

    async def usage(self) -> dict[str, Any]:
        return dict(await self._client._json("GET", self._at("/usage")))

    async def upload(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` (relative) in the environment's dir."""
        self._checked(path)
        response = await self._client._check(await self._client._request(
            "PUT", self._at(f"/files/{quote(path)}"), data=data))
        response.release()

    async def download(self, path: str) -> bytes:
        self._checked(path)
        response = await self._client._check(await self._client._request(
            "GET", self._at(f"/files/{quote(path)}")))
        try:
            return bytes(await response.read())
        finally:
            response.release()

    @staticmethod
    def _checked(path: str) -> None:
        """Refused here too, as the service would (an HTTP stack may resolve a '..' in a URL
        before it is sent, into another route)."""
        try:
            protocol.relative_parts(path)
        except protocol.ApiError as exc:
            raise ValidationError(exc.detail) from None

    async def aclose(self) -> None:
        """Destroy it (this one: not another made since under its name). Idempotent."""
        if not self._ended:
            with contextlib.suppress(EnvironmentClosedError):
                await self._client._json("DELETE", self._at())
        self._ended = True


async def _readline(response: Any) -> bytes:
    """One NDJSON line (the service keeps each under 64 KiB: aiohttp's line limit)."""
    return bytes(await response.content.readline())


def connect(url: str | None = None, token: str | None = None, *,
            cafile: str | None = None) -> Client:
    """A client of the gestvenv service at ``url`` (default: ``GESTVENV_HOST``, else the local
    service's socket), with the library's API (``ephemeral``, ``create_environment``,
    ``attach``, ``list_environments``, ``destroy_environment``). Over TCP: ``token``
    (default: ``GESTVENV_TOKEN``), and ``cafile`` (default: ``GESTVENV_CAFILE``) for a
    service whose certificate the system does not trust."""
    url = url or os.environ.get("GESTVENV_HOST") or f"unix://{default_socket()}"
    if "://" not in url and url.startswith("/"):
        url = f"unix://{url}"
    return Client(url, token or os.environ.get("GESTVENV_TOKEN") or None,
                  cafile=cafile or os.environ.get("GESTVENV_CAFILE") or None)


class SyncRemoteContext:
    """``with client.ephemeral_sync(...) as env``: the async context, driven from the
    library's blocking portal (one event loop in a helper thread)."""

    def __init__(self, context: RemoteContext) -> None:
        self._context = context

    def __enter__(self) -> SyncRemoteEnvironment:
        from ..sync import _portal

        return SyncRemoteEnvironment(_portal.call(self._context.__aenter__()))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        from ..sync import _portal

        _portal.call(self._context.__aexit__(exc_type, exc, tb), shield=True)


class SyncRemoteEnvironment:
    """:class:`RemoteEnvironment`'s methods, blocking; ``aio`` is the async one."""

    def __init__(self, env: RemoteEnvironment) -> None:
        self.aio = env

    @property
    def name(self) -> str:
        return self.aio.name

    @property
    def id(self) -> str:
        return self.aio.id

    @property
    def info(self) -> dict[str, Any]:
        return self.aio.info

    def execute(self, cmd: str | list[str], **kwargs: Any) -> ExecResult:
        from ..sync import _portal

        return _portal.call(self.aio.execute(cmd, **kwargs))

    def install(self, packages: Iterable[str] = (), **kwargs: Any) -> None:
        from ..sync import _portal

        _portal.call(self.aio.install(packages, **kwargs))

    def extend_ttl(self, seconds: float) -> float:
        from ..sync import _portal

        return _portal.call(self.aio.extend_ttl(seconds))

    def usage(self) -> dict[str, Any]:
        from ..sync import _portal

        return _portal.call(self.aio.usage())

    def upload(self, path: str, data: bytes) -> None:
        from ..sync import _portal

        _portal.call(self.aio.upload(path, data))

    def download(self, path: str) -> bytes:
        from ..sync import _portal

        return _portal.call(self.aio.download(path))
