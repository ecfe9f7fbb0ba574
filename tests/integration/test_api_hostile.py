"""The REST API against a hostile caller, and against an environment's own code: each test is a
problem found by attacking a real ``gestvenv serve`` (a process of its own, on a private socket,
as in test_api.py) and fails until it is fixed.

- a JSON body that arrives in two pieces is parsed from its first piece only;
- an upload that is refused or abandoned deletes the file it would have replaced;
- a download whose file the env shrinks meanwhile desyncs the keep-alive connection;
- a held stream goes on after its env was destroyed, and a client's block exit destroys, by
  name, another env that took that name;
- max_streams=N serves N-1 streams;
- a NUL in a command's argument or environment cuts the stream (no problem, a traceback);
- deeply nested JSON is a 500 (RecursionError), not a 400;
- a request whose body never completes holds its connection (and a connection slot) forever;
- SIGTERM leaves exec streams running for two minutes (the unit's stop timeout);
- a FIFO in place of an upload is a 500;
- the dirs an upload makes in a sandboxed env are root's: its commands cannot write in them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp")

import gestvenv  # noqa: E402
from gestvenv.api.client import connect  # noqa: E402

pytestmark = pytest.mark.slow

BOUNDS = ("--limit", "write_timeout=2", "--limit", "max_json_body=65536",
          "--limit", "max_upload=1048576", "--limit", "max_pending_output=262144",
          "--limit", "header_timeout=2")


class Served:
    """A ``gestvenv serve`` process on a socket of its own."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        self.folder = Path(f"/tmp/gv-hostile-{os.getpid()}-{tmp_path.name}"[:90])
        self.folder.mkdir(mode=0o755)
        self.path = self.folder / "api.sock"
        self.log_path = tmp_path / f"serve-{self.folder.name}.log"
        self.expect_running = True
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gestvenv", "serve", "--socket", str(self.path), *BOUNDS,
             *extra], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.path.exists():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "the service never listened"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.path.unlink(missing_ok=True)
        self.folder.rmdir()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start a service (extra ``--limit`` arguments as given); at the end it must still run
    and its journal must hold no traceback."""
    started: list[Served] = []

    def start(*extra: str) -> Served:
        started.append(Served(tmp_path, *extra))
        return started[-1]

    try:
        yield start
        for served in started:
            if served.expect_running:
                assert served.proc.poll() is None, "the service died: " + served.log()
            summary = [line for line in served.log().splitlines()
                       if line and not line.startswith(" ")]
            assert "Traceback" not in served.log(), \
                f"a traceback in the service's journal: {summary[-6:]}"
    finally:
        for served in started:
            served.stop()
        _destroy_all()


@pytest.fixture
def service(serve: Callable[..., Served]) -> Path:
    return serve().path


def _destroy_all() -> None:
    """Whatever a failing test left (kept envs, the commands of a killed service)."""
    from gestvenv import registry

    async def destroy_all() -> None:
        for record in registry.list_records():
            with contextlib.suppress(gestvenv.GestvenvError):
                await gestvenv.destroy_environment(record.name)

    asyncio.run(destroy_all())


async def api(service: Path, method: str, path: str, body: Any = None, *,
              data: Any = None) -> tuple[int, Any]:
    """One request; the JSON answer (or the bytes when it is not JSON)."""
    connector = aiohttp.UnixConnector(path=str(service))
    async with aiohttp.ClientSession(connector=connector) as s, \
            s.request(method, f"http://gestvenv{path}", json=body, data=data) as r:
        raw = await r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw


async def create(service: Path, name: str, **extra: Any) -> dict[str, Any]:
    status, info = await api(service, "POST", "/v1/envs", {"name": name, "ttl": 300, **extra})
    assert status == 201, info
    return dict(info)


async def exchange(service: Path, *parts: bytes, pause: float = 0.0,
                   timeout: float = 20.0) -> bytes:
    """Raw bytes sent in ``parts`` (``pause`` between them); everything answered until EOF."""
    reader, writer = await asyncio.open_unix_connection(str(service))
    try:
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def head(method: str, path: str, length: int) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def events(answer: bytes) -> list[dict[str, Any]]:
    """The NDJSON events of a raw chunked answer (chunk sizes dropped)."""
    out = []
    for line in answer.partition(b"\r\n\r\n")[2].split(b"\n"):
        line = line.strip()
        if line.startswith(b"{"):
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict) and "event" in item:
                    out.append(item)
    return out


# --- request bodies ---

async def test_a_json_body_that_arrives_in_two_pieces_is_read_whole(service: Path) -> None:
    """read_json takes ``request.content.read(limit + 1)``: whatever has arrived, not the body.
    A body sent in two writes (any body past the socket buffer: the real client's stdin of
    300 kB gets "Malformed JSON") is parsed from its first piece only."""
    await create(service, "hb-pieces")
    body = json.dumps({"command": ["python", "-c", "import sys; print(len(sys.stdin.read()))"],
                       "stdin": "x" * 20000}).encode()
    answer = await exchange(service, head("POST", "/v1/envs/hb-pieces/exec", len(body))
                            + body[:1000], body[1000:], pause=0.3)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:400]
    out = "".join(e.get("data", "") for e in events(answer) if e["event"] == "stdout")
    assert out.strip() == "20000", answer[-400:]
    assert (await api(service, "DELETE", "/v1/envs/hb-pieces"))[0] == 204


async def test_deeply_nested_json_is_malformed_not_an_internal_error(service: Path) -> None:
    status, problem = await api(service, "POST", "/v1/envs", data=b"[" * 50000)
    assert status == 400, problem  # now 500, "RecursionError", and a traceback in the journal
    assert problem["type"] in ("urn:gestvenv:problem:malformed-json",
                               "urn:gestvenv:problem:invalid-request")


async def test_a_nul_in_a_command_or_its_env_is_a_problem_not_a_cut_stream(
        service: Path) -> None:
    """The library's ValueError (subprocess: "embedded null byte", "illegal environment
    variable name") comes after the stream opened: the answer is a 200 cut mid-chunk, with
    neither an exit nor an error event, and a traceback in the journal. An env created with
    such a variable can never run a command."""
    await create(service, "hb-nul")
    for body in ({"command": ["echo", "a\0b"]}, {"command": "echo \0", "shell": True},
                 {"command": ["true"], "env": {"A": "x\0y"}},
                 {"command": ["true"], "env": {"A=B": "x"}}):
        raw = json.dumps(body).encode()
        answer = await exchange(service, head("POST", "/v1/envs/hb-nul/exec", len(raw)) + raw)
        if answer.startswith(b"HTTP/1.1 200"):
            # (now: a second status line, "HTTP/1.1 500", written inside the chunked body)
            assert answer.count(b"HTTP/1.1 ") == 1, (body, answer[-400:])
            last = events(answer)[-1]["event"] if events(answer) else None
            assert last == "error", (body, answer[-300:])
        else:
            assert answer.startswith(b"HTTP/1.1 400"), (body, answer[:300])
    status, info = await api(service, "POST", "/v1/envs",
                             {"name": "hb-nul-env", "ttl": 300, "env": {"A": "x\0y"}})
    if status == 201:
        await api(service, "DELETE", "/v1/envs/hb-nul-env")
    assert status == 400, info
    assert (await api(service, "DELETE", "/v1/envs/hb-nul"))[0] == 204


async def test_a_request_whose_body_never_comes_is_dropped(service: Path) -> None:
    """The header timeout stops at the head: a PUT that announces 1000 bytes and sends one
    holds its connection (a slot of max_connections, the env's truncated file) forever; 256
    of them lock every client out (503). The doc says a connection that sends no complete
    request in time is closed."""
    await create(service, "hb-slow")
    reader, writer = await asyncio.open_unix_connection(str(service))
    try:
        writer.write(head("PUT", "/v1/envs/hb-slow/files/slow.txt", 1000) + b"x")
        await writer.drain()
        try:  # header_timeout is 2 s here: 5 times that is plenty
            await asyncio.wait_for(reader.read(), 10)
        except TimeoutError:
            pytest.fail("a request body that never came held its connection for 10 s")
    finally:
        writer.close()
    assert (await api(service, "DELETE", "/v1/envs/hb-slow"))[0] == 204


# --- files ---

async def test_a_refused_or_abandoned_upload_keeps_the_file_it_replaces(service: Path) -> None:
    """put_file opens the target with O_TRUNC and unlinks it on any failure: an upload over the
    limit (sent chunked, so refused while it is read) or a client gone mid-upload deletes the
    file that was there. (And the client gone is a traceback in the journal.)"""
    await create(service, "hb-upload")
    status, _ = await api(service, "PUT", "/v1/envs/hb-upload/files/keep.txt", data=b"precious")
    assert status == 201

    async def too_big() -> Any:
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB, chunked: no Content-Length to refuse up front

    status, problem = await api(service, "PUT", "/v1/envs/hb-upload/files/keep.txt",
                                data=too_big())
    assert status == 413, problem
    status, content = await api(service, "GET", "/v1/envs/hb-upload/files/keep.txt")
    assert (status, content) == (200, b"precious"), "a refused upload deleted the old file"

    _reader, writer = await asyncio.open_unix_connection(str(service))
    writer.write(head("PUT", "/v1/envs/hb-upload/files/keep.txt", 50000) + b"y" * 1000)
    await writer.drain()
    await asyncio.sleep(0.5)
    writer.close()  # gone mid-upload
    await asyncio.sleep(1.0)
    status, content = await api(service, "GET", "/v1/envs/hb-upload/files/keep.txt")
    assert (status, content) == (200, b"precious"), "an abandoned upload deleted the old file"
    assert (await api(service, "DELETE", "/v1/envs/hb-upload"))[0] == 204


def test_a_download_the_env_cuts_short_never_desyncs_the_connection(service: Path) -> None:
    """get_file sends Content-Length: st_size, then stops at EOF and keeps the connection: if
    the env's code truncates the file meanwhile, the next response on that keep-alive
    connection is read by the client as the rest of the file."""
    info = asyncio.run(create(service, "hb-shrink"))
    big = Path(info["path"]) / "big.bin"
    big.write_bytes(b"\0" * 20_000_000)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(service))
        s.sendall(b"GET /v1/envs/hb-shrink/files/big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /v1/envs/hb-shrink HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
        os.truncate(big, 1000)  # what the env's own command may do at any time
        s.settimeout(5)
        with contextlib.suppress(socket.timeout):
            while chunk := s.recv(1 << 16):
                data += chunk
    headers, _, body = data.partition(b"\r\n\r\n")
    length = int(headers.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    assert length == 20_000_000
    assert b"HTTP/1.1 " not in body[:length], \
        "the next response was sent as the rest of the file (Content-Length not honoured)"
    assert asyncio.run(api(service, "DELETE", "/v1/envs/hb-shrink"))[0] == 204


async def test_a_fifo_in_place_of_an_upload_is_refused_as_unsafe(service: Path) -> None:
    """Documented: a FIFO in place of a file is refused (403). Without a reader the open gets
    ENXIO, which _path_error answers as a 500 "File error"."""
    await create(service, "hb-fifo")
    status, _ = await api(service, "POST", "/v1/envs/hb-fifo/exec",
                          {"command": ["mkfifo", "fifo"]})
    assert status == 200
    status, problem = await api(service, "PUT", "/v1/envs/hb-fifo/files/fifo", data=b"x")
    assert status == 403, problem
    assert (await api(service, "DELETE", "/v1/envs/hb-fifo"))[0] == 204


async def test_dirs_an_upload_makes_in_a_sandboxed_env_are_the_env_s(service: Path) -> None:
    """As root at namespace isolation the env's commands run as its own uid: the uploaded file
    is chowned to it, but the dirs _walk makes for it stay root's 0755, so a script uploaded to
    job/script.py cannot write job/result.txt."""
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("needs root and bubblewrap (an env with a uid of its own)")
    status, info = await api(service, "POST", "/v1/envs", {
        "name": "hb-sandbox", "ttl": 300, "isolation_level": "namespace",
        "allow_unenforced": True})
    if status != 201 or not info.get("sandbox_uid"):
        if status == 201:
            await api(service, "DELETE", "/v1/envs/hb-sandbox")
        pytest.skip(f"no sandboxed env on this host: {info}")
    try:
        status, _ = await api(service, "PUT", "/v1/envs/hb-sandbox/files/job/out/script.py",
                              data=b"open('job/out/result.txt', 'w').write('42')\n")
        assert status == 201
        raw = json.dumps({"command": ["python", "job/out/script.py"]}).encode()
        answer = await exchange(service, head("POST", "/v1/envs/hb-sandbox/exec", len(raw))
                                + raw)
        result = [e for e in events(answer) if e["event"] == "exit"]
        assert result and result[0]["result"]["returncode"] == 0, answer[-600:]
    finally:
        await api(service, "DELETE", "/v1/envs/hb-sandbox")


# --- streams and held environments ---

async def test_a_held_stream_ends_when_its_env_is_destroyed(service: Path) -> None:
    """The held loop checks ``env.closed``, which only its own handle sets: after a DELETE (or
    a cleanup, or the TTL) the client is sent keepalives for an env that is gone."""
    connector = aiohttp.UnixConnector(path=str(service))
    async with aiohttp.ClientSession(connector=connector) as s:
        response = await s.post("http://gestvenv/v1/envs",
                                json={"name": "hb-held", "ttl": 300, "hold": True})
        assert json.loads(await response.content.readline())["event"] == "created"
        assert (await api(service, "DELETE", "/v1/envs/hb-held"))[0] == 204
        deadline = time.monotonic() + 5
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail("the held stream still runs 5 s after its env was destroyed")
                try:
                    line = await asyncio.wait_for(response.content.readline(), left)
                except TimeoutError:
                    continue
                except aiohttp.ClientPayloadError:
                    break  # (cut: ended too)
                if not line:
                    break
        finally:
            response.close()


async def test_leaving_a_held_block_never_destroys_another_env_of_that_name(
        service: Path) -> None:
    """RemoteContext.__aexit__ (and RemoteEnvironment.aclose) DELETE by name: once the held env
    is gone (a cleanup, its TTL) and another client made an env of that name, the first
    client's block exit destroys the second client's env."""
    first, second = connect(f"unix://{service}"), connect(f"unix://{service}")
    try:
        async with first.ephemeral("hb-same", ttl=300):
            await second.destroy_environment("hb-same")
            other = await second.create_environment("hb-same", ttl=300)
        assert (await second.attach("hb-same")).id == other.id, \
            "another client's env was destroyed"
    except gestvenv.EnvironmentNotFoundError:
        pytest.fail("leaving the block destroyed another client's env of the same name")
    finally:
        with contextlib.suppress(gestvenv.GestvenvError):
            await second.destroy_environment("hb-same")
        await first.aclose()
        await second.aclose()


async def test_max_streams_means_that_many_streams(serve: Callable[..., Served]) -> None:
    """execute() counts its own stream before _open_stream compares the count with the bound:
    with max_streams=2 a second exec is refused (429) while one runs, and max_streams=1 would
    refuse every exec."""
    service = serve("--limit", "max_streams=2").path
    await create(service, "hb-streams")
    connector = aiohttp.UnixConnector(path=str(service))
    async with aiohttp.ClientSession(connector=connector) as s:
        first = await s.post("http://gestvenv/v1/envs/hb-streams/exec",
                             json={"command": ["sleep", "30"]})
        try:
            assert json.loads(await first.content.readline())["event"] == "start"
            status, answer = await api(service, "POST", "/v1/envs/hb-streams/exec",
                                       {"command": ["true"]})
            assert status == 200, answer
        finally:
            first.close()
    assert (await api(service, "DELETE", "/v1/envs/hb-streams"))[0] == 204


def test_sigterm_ends_open_exec_streams_promptly(serve: Callable[..., Served]) -> None:
    """The service's unit says stopping it ends the streams it holds. The exec loop never looks
    at ``stopping``: aiohttp waits its shutdown_timeout (60 s) twice, so the service exits
    after about 120 s, when systemd's TimeoutStopSec (2 min) SIGKILLs it, and the client gets
    keepalives all along and never an end."""
    served = serve()
    asyncio.run(create(served.path, "hb-term"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(served.path))
        raw = json.dumps({"command": ["sleep", "300"]}).encode()
        s.sendall(head("POST", "/v1/envs/hb-term/exec", len(raw)) + raw)
        data = b""
        while b'"start"' not in data:
            data += s.recv(4096)
        served.expect_running = False
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.wait(15)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()
            pytest.fail("the service still ran 15 s after SIGTERM, with one exec stream open")
        s.settimeout(5)
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                data += chunk
    ended = events(data)
    assert ended and ended[-1]["event"] in ("error", "exit"), \
        f"the stream ended without telling the client: {data[-300:]!r}"
