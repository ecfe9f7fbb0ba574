"""The REST API (``gestvenv serve``) reached with a real HTTP client over its unix socket: the
service is a process of its own, as systemd would start it, and the library under it is the
real one (local runtime on this host; the systemd runtime inside the test host). Hostile
requests too: malformed, oversized, unknown fields (a smuggled unit property), paths that try
to leave the environment, a client that reads nothing, a client killed mid-command, a caller
of another uid. After each, the service still serves."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")

import gestvenv  # noqa: E402
from gestvenv import registry  # noqa: E402
from gestvenv.api.client import connect  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Path]:
    """``gestvenv serve`` on a socket of its own (short bounds where a test needs them)."""
    folder = Path(f"/tmp/gv-api-{os.getpid()}-{tmp_path.name}"[:90])
    folder.mkdir(mode=0o755)
    path = folder / "api.sock"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gestvenv", "serve", "--socket", str(path),
         "--limit", "write_timeout=2", "--limit", "max_json_body=65536",
         "--limit", "max_upload=1048576", "--limit", "max_pending_output=262144",
         "--limit", "header_timeout=2"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        assert time.monotonic() < deadline, "the service never listened"
        time.sleep(0.05)
    try:
        yield path
        assert proc.poll() is None, "the service died: " + (tmp_path / "serve.log").read_text()
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        stopped = proc.returncode == 0
        left = os.listdir(folder)
        for name in left:
            (folder / name).unlink()
        folder.rmdir()
    # (The path exists only while the service listens: the wait above is all a client needs.)
    assert not (stopped and left), f"the service left {left} at its exit"


@pytest.fixture
def client(service: Path) -> gestvenv.api.client.Client:
    """A client; its session opens in the test's own event loop, on first use."""
    return connect(f"unix://{service}")


async def raw(service: Path, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, object]]:
    """One request with nothing of the client's own checks in the way."""
    connector = aiohttp.UnixConnector(path=str(service))
    async with aiohttp.ClientSession(connector=connector) as s, \
            s.request(method, f"http://gestvenv{path}", data=body, headers=headers) as r:
        text = await r.text()
        try:
            document = json.loads(text)
        except ValueError:
            document = {}
        return r.status, r.headers.get("Content-Type", ""), document


async def test_create_exec_upload_run_download_destroy(client: gestvenv.api.client.Client
                                                       ) -> None:
    seen: list[tuple[str, str]] = []
    async with client.ephemeral("api-flow", packages=["six>=1.0"], ttl=300) as env:
        assert env.name == "api-flow" and registry.load("api-flow").id == env.id
        result = await env.execute(
            ["python", "-c", "import sys, six, time; print('first', flush=True); "
                             "time.sleep(0.5); print(six.__version__); "
                             "print(sys.stdin.read(), file=sys.stderr)"],
            input="from stdin", stream=lambda name, text: seen.append((name, text)))
        assert result.ok and result.stdout.startswith("first\n1.")
        assert result.stderr == "from stdin\n"
        assert seen[0][0] == "stdout" and "1." not in seen[0][1], \
            "the first line came with the rest, not as it was printed"
        await env.upload("job/script.py", b"import pathlib\n"
                                          b"pathlib.Path('out.txt').write_text('42')\n")
        assert (await env.execute(["python", "job/script.py"])).ok  # (cwd: the env's dir)
        assert await env.download("out.txt") == b"42"
        assert [e["name"] for e in await client.list_environments()] == ["api-flow"]
        usage = await env.usage()
        assert usage["name"] == "api-flow" and usage["disk_bytes"] > 0
        timed = await env.execute(["sleep", "30"], timeout=0.5)
        assert timed.killed_by == "timeout"
    assert await client.list_environments() == []
    with pytest.raises(gestvenv.EnvironmentNotFoundError):
        registry.load("api-flow")


async def test_a_kept_env_lives_on_and_is_destroyed_by_name(
        client: gestvenv.api.client.Client) -> None:
    env = await client.create_environment("api-kept", ttl=300)
    await client.aclose()  # the connection gone: a kept env stays
    assert registry.load("api-kept").id == env.id
    with pytest.raises(gestvenv.EnvironmentExistsError):
        await client.create_environment("api-kept", ttl=300)
    await client.destroy_environment("api-kept")
    with pytest.raises(gestvenv.EnvironmentNotFoundError):
        await client.attach("api-kept")


async def test_bad_requests_get_problems_and_the_service_stays_up(service: Path) -> None:
    cases = [
        ("POST", "/v1/envs", b"{not json", 400, "malformed-json"),
        ("POST", "/v1/envs", b"[1, 2]", 400, "invalid-request"),
        ("POST", "/v1/envs", json.dumps({"name": "x", "packages": "six"}).encode(), 400,
         "invalid-request"),
        # A unit property smuggled in, at the top and inside the limits: refused, not passed.
        ("POST", "/v1/envs", json.dumps({"name": "x", "ExecStartPre": "/bin/sh"}).encode(),
         400, "unknown-fields"),
        ("POST", "/v1/envs", json.dumps({"name": "x", "resource_limits": {
            "max_memory": 64, "MemoryMax": "infinity"}}).encode(), 400, "unknown-fields"),
        ("POST", "/v1/envs", json.dumps({"name": "x", "python": "/tmp/evil"}).encode(), 400,
         "invalid-request"),
        ("POST", "/v1/envs", json.dumps({"name": "../x"}).encode(), 400, "invalid-name"),
        ("POST", "/v1/envs", b"{" + b" " * 70000 + b"}", 413, "body-too-large"),
        ("GET", "/v1/envs/nope", None, 404, "no-such-environment"),
        ("GET", "/v2/anything", None, 404, "not-found"),
        ("DELETE", "/v1/envs", None, 405, "method-not-allowed"),
    ]
    for method, path, body, status, kind in cases:
        got, content_type, problem = await raw(service, method, path, body)
        assert (got, problem.get("type")) == (status, f"urn:gestvenv:problem:{kind}"), \
            (method, path, got, problem)
        assert content_type.split(";")[0] == "application/problem+json"
        assert "Traceback" not in json.dumps(problem)
    assert (await raw(service, "GET", "/v1/envs"))[0] == 200  # still serving
    assert not list(registry.list_records()), "a refused request left an environment"


async def test_paths_that_leave_the_env_are_refused(service: Path,
                                                    client: gestvenv.api.client.Client,
                                                    tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    async with client.ephemeral("api-paths", ttl=300) as env:
        for path in ("%2e%2e/escape", "a/%2e%2e/%2e%2e/escape", "%2Fetc%2Fpasswd", "a//b"):
            status, _, problem = await raw(service, "PUT",
                                           f"/v1/envs/api-paths/files/{path}", b"x")
            assert status in (400, 404), (path, status, problem)
        # Links planted by the env's own code: neither followed for writing nor reading.
        await env.execute(["ln", "-s", str(secret), "link"])
        await env.execute(["ln", "-s", str(tmp_path), "dirlink"])
        for path in ("link", "dirlink/secret", "dirlink/new"):
            status, _, problem = await raw(service, "PUT", f"/v1/envs/api-paths/files/{path}",
                                           b"overwritten")
            assert status == 403, (path, status, problem)
            status, _, problem = await raw(service, "GET", f"/v1/envs/api-paths/files/{path}")
            assert status in (403, 404), (path, status, problem)
        assert secret.read_text() == "host secret" and not (tmp_path / "new").exists()
        with pytest.raises(gestvenv.ValidationError):
            await env.upload("../escape", b"x")
        status, _, problem = await raw(service, "PUT", "/v1/envs/api-paths/files/big",
                                       b"x" * (1048576 + 1))
        assert status == 413, problem
        with pytest.raises(gestvenv.GestvenvError, match="does not exist"):
            await env.download("big")  # the partial file is removed


async def test_huge_output_is_streamed_not_held(client: gestvenv.api.client.Client) -> None:
    """20 MB of output, read as it comes: all of it arrives (the service keeps 1 MiB for the
    result, holds at most its pending bound)."""
    count = 0

    def take(name: str, text: str) -> None:
        nonlocal count
        count += len(text)

    async with client.ephemeral("api-huge", ttl=300) as env:
        result = await env.execute(
            ["python", "-c", "import sys\nfor _ in range(200): sys.stdout.write('x' * 100000)"],
            stream=take)
    assert result.ok and count == 20_000_000


async def test_a_client_that_reads_nothing_is_dropped_and_its_command_killed(
        service: Path, client: gestvenv.api.client.Client) -> None:
    async with client.ephemeral("api-stalled", ttl=300) as env:
        _reader, writer = await asyncio.open_unix_connection(str(service))
        body = json.dumps({"command": ["python", "-c",
                                       "import sys\nwhile True: sys.stdout.write('y' * 65536)"]})
        writer.write(f"POST /v1/envs/api-stalled/exec HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     f"{body}".encode())
        await writer.drain()
        # Nothing read: the service's write times out (2 s here) or its pending output
        # overflows, and it kills the command.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            found = await asyncio.create_subprocess_exec(
                "pgrep", "-f", "while True: sys.stdout.write", stdout=subprocess.PIPE)
            ps = (await found.communicate())[0].split()
            if not ps:
                break
        assert not ps, "the command of a client that reads nothing still runs"
        writer.close()
        assert (await env.execute(["true"])).ok  # the service (and the env) still serve


async def test_a_slow_client_that_sends_no_request_is_disconnected(service: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(service))
    writer.write(b"GET /v1/envs HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # EOF: the service closed it
    assert data == b"" or b"HTTP/1.1" in data
    writer.close()


_KILLED_CLIENT = """
import asyncio, sys
from gestvenv.api.client import connect

async def main():
    async with connect(sys.argv[1]) as c:
        async with c.ephemeral("api-orphan", ttl=600) as env:
            print(env.id, flush=True)
            await env.execute(["sleep", "300"])

asyncio.run(main())
"""


async def test_a_killed_client_s_env_is_gone_within_a_second(service: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_CLIENT, f"unix://{service}",
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    env_id = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
    assert registry.load("api-orphan").id == env_id
    await asyncio.sleep(0.5)  # in the middle of its exec
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    killed = time.monotonic()
    while time.monotonic() - killed < 10:
        try:
            registry.load("api-orphan")
        except gestvenv.EnvironmentNotFoundError:
            break
        await asyncio.sleep(0.05)
    gone = time.monotonic() - killed
    print(f"env gone {gone:.2f} s after its client was killed")
    assert gone < 2.0, f"the env of a killed client lived {gone:.1f} s"


def test_another_uid_sees_none_of_root_s_envs(service: Path, tmp_path: Path) -> None:
    """A caller of another uid (nobody) reaches root's socket and sees its own environments
    only: none of root's (tests/integration/test_api_users.py has the rest)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to call as another uid")
    os.chmod(service, 0o666)
    asyncio.run(gestvenv.create_environment("api-roots", ttl=300))
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(b'GET /v1/envs HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "data = b''\n"
        "while chunk := s.recv(65536): data += chunk\n"
        "print(data.decode())\n")
    try:
        out = subprocess.run(["/usr/bin/python3", "-c", probe, str(service)], user=65534,
                             group=65534, extra_groups=[], capture_output=True, text=True,
                             timeout=60)
    finally:
        asyncio.run(gestvenv.destroy_environment("api-roots"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 200"), out.stdout
    assert out.stdout.rstrip().endswith("[]") and "api-roots" not in out.stdout


def test_the_cli_example_runs_through_host(service: Path) -> None:
    """The README's example, unchanged but for --host."""
    gv = [sys.executable, "-m", "gestvenv", "--host", f"unix://{service}"]

    def cli(*args: str) -> str:
        done = subprocess.run([*gv, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    assert "created api-demo" in cli("ephemeral", "create", "api-demo", "--packages",
                                     "six>=1.0", "--ttl", "300")
    out = cli("run", "--env", "api-demo", "--", "python", "-c",
              "import six, sys; print('six', six.__version__, 'in', sys.prefix)")
    assert out.startswith("six 1.") and "api-demo" in out
    assert "api-demo" in cli("ephemeral", "list")
    assert "removed api-demo" in cli("ephemeral", "cleanup", "api-demo")
    assert "no environments" in cli("ephemeral", "list")
    status = subprocess.run([*gv, "run", "--env", "api-demo", "--", "true"],
                            capture_output=True, text=True)
    assert status.returncode == 1 and "no environment named 'api-demo'" in status.stderr
    local_only = subprocess.run([*gv, "ephemeral", "top", "--once"], capture_output=True,
                                text=True)
    assert local_only.returncode == 1 and "no --host form" in local_only.stderr


_TRAPS = ("import os, signal, sys, time\n"  # (os.write: a print() in a handler may reenter)
          "def ended(signum, _):\n"
          "    os.write(1, f'handled {signal.Signals(signum).name}\\n'.encode())\n"
          "    sys.exit(3)\n"
          "for s in (signal.SIGTERM, signal.SIGINT):\n"
          "    signal.signal(s, ended)\n"
          "print('ready', flush=True)\n"
          "time.sleep(60)\n")


async def test_signals_reach_a_running_command(client: gestvenv.api.client.Client,
                                               service: Path) -> None:
    async with client.ephemeral("api-signals", ttl=300) as env:
        # Through the client: its handle, as the library's.
        handle = gestvenv.CommandHandle()
        ready = asyncio.Event()
        task = asyncio.ensure_future(env.execute(
            ["python", "-c", _TRAPS], handle=handle,
            stream=lambda _name, text: ready.set() if "ready" in text else None))
        await asyncio.wait_for(ready.wait(), 30)
        await handle.signal("TERM")
        result = await task
        assert result.returncode == 3 and result.stdout.endswith("handled SIGTERM\n"), result
        with pytest.raises(gestvenv.CommandNotRunningError):
            await handle.signal("TERM")

        # Raw: refused, and the command runs on: a signal that is no command's to get, a
        # body that is not one, another env's name for this command; then INT, handled.
        connector = aiohttp.UnixConnector(path=str(service))
        async with aiohttp.ClientSession(connector=connector) as session, session.post(
                f"http://gestvenv/v1/envs/api-signals/exec?id={env.id}",
                json={"command": ["python", "-c", _TRAPS]}) as stream:
            events = stream.content
            exec_id = json.loads(await events.readline())["exec_id"]
            while "ready" not in json.loads(await events.readline()).get("data", ""):
                pass
            route = f"/v1/envs/api-signals/execs/{exec_id}/signal"
            for body, status in ((b'{"signal": "SEGV"}', 400), (b'{"signal": ["TERM"]}', 400),
                                 (b'{"signal": "TERM", "unit": "x"}', 400)):
                code, _, problem = await raw(service, "POST", route, body)
                assert code == status, (body, problem)
            code, _, _ = await raw(service, "POST", f"/v1/envs/api-other/execs/{exec_id}/signal",
                                   b'{"signal": "TERM"}')
            assert code == 404
            code, _, _ = await raw(service, "POST", route, b'{"signal": "SIGINT"}')
            assert code == 204
            rest = [json.loads(line) async for line in events if line.strip()]
        assert {"event": "stdout", "data": "handled SIGINT\n"} in rest, rest
        assert rest[-1]["event"] == "exit" and rest[-1]["result"]["returncode"] == 3, rest


def test_ctrl_c_at_the_cli_reaches_the_remote_command(service: Path) -> None:
    """``gestvenv --host URL ephemeral exec``: an INT to the CLI is the remote command's INT
    (which may handle it), as in a terminal; the CLI exits with the command's status."""
    gv = [sys.executable, "-m", "gestvenv", "--host", f"unix://{service}"]
    subprocess.run([*gv, "ephemeral", "create", "api-ctrl-c", "--ttl", "300"], check=True,
                   capture_output=True, timeout=120)
    try:
        proc = subprocess.Popen([*gv, "ephemeral", "exec", "api-ctrl-c", "--", "python",
                                 "-c", _TRAPS],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert out == "handled SIGINT\n", (out, err)
        assert proc.returncode == 3, err
    finally:
        subprocess.run([*gv, "ephemeral", "cleanup", "api-ctrl-c"], capture_output=True,
                       timeout=120)


@pytest.fixture
def extendable(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the service started after it: envs may live 600 s with their TTL extended."""
    monkeypatch.setenv("GESTVENV_EPHEMERAL_MAX_TTL", "600")


async def test_a_ttl_is_extended_through_the_api(extendable: None, service: Path) -> None:
    client = connect(f"unix://{service}")
    async with client.ephemeral("api-ttl", ttl=60) as env:
        first = registry.load("api-ttl").expires_at
        assert first is not None
        end = await env.extend_ttl(120)
        assert end == pytest.approx(first + 120) == registry.load("api-ttl").expires_at
        with pytest.raises(gestvenv.ValidationError, match="max_ttl"):
            await env.extend_ttl(1000)
        for body in (b'{"extend": "10"}', b'{"extend": -1}', b'{}', b'{"extend": 10, "x": 1}',
                     b'{"extend": true}', b'{"extend": 1' + b'0' * 400 + b'}',
                     b'{"extend": 1e999}'):
            code, _, problem = await raw(service, "POST", f"/v1/envs/api-ttl/ttl?id={env.id}",
                                         body)
            assert code == 400, (body, problem)
        assert registry.load("api-ttl").expires_at == pytest.approx(end)
        gv = [sys.executable, "-m", "gestvenv", "--host", f"unix://{service}"]
        done = await asyncio.to_thread(subprocess.run, [*gv, "ephemeral", "extend", "api-ttl",
                                                        "30"], capture_output=True, text=True)
        assert done.returncode == 0 and "extended api-ttl" in done.stdout, done
        assert registry.load("api-ttl").expires_at == pytest.approx(end + 30)
    await client.aclose()


def test_the_blocking_variant(service: Path) -> None:
    """client.ephemeral_sync: the same environment, from code without asyncio."""
    client = connect(f"unix://{service}")
    with client.ephemeral_sync("api-sync", ttl=300) as env:
        env.upload("x.py", b"print(1 + 1)")
        assert env.execute(["python", "x.py"]).stdout == "2\n"
        assert env.download("x.py") == b"print(1 + 1)"
        assert registry.load("api-sync").id == env.id
    with pytest.raises(gestvenv.EnvironmentNotFoundError):
        registry.load("api-sync")


def test_openapi_document(service: Path) -> None:
    status, _, document = asyncio.run(raw(service, "GET", "/v1/openapi.json"))
    assert status == 200 and document["openapi"].startswith("3.")
    assert "/v1/envs/{name}/exec" in document["paths"]  # type: ignore[operator]


def test_socket_file_is_private(service: Path) -> None:
    assert oct(os.stat(service).st_mode & 0o777) == "0o600"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(service))


def test_sigterm_as_the_service_starts_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM the moment the socket's path appears, before the service's loop has taken
    SIGTERM over (the default action used to kill it there, leaving a socket that refuses
    clients, and its work dir): it unwinds as Ctrl-C does. Five times."""
    for round_ in range(5):
        work = tmp_path / f"tmp{round_}"
        work.mkdir()
        path = tmp_path / f"s{round_}" / "api.sock"
        proc = subprocess.Popen([sys.executable, "-m", "gestvenv", "serve", "--socket",
                                 str(path)], env={**os.environ, "TMPDIR": str(work)},
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not os.path.lexists(path):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.0005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode in (0, 128 + signal.SIGTERM), (round_, proc.returncode, err)
        assert "Traceback" not in err
        assert not path.parent.exists() and not os.listdir(work), (round_, err)


def test_an_empty_socket_path_is_refused() -> None:
    """(`--socket "$UNSET"`): not the default socket in its place."""
    done = subprocess.run([sys.executable, "-m", "gestvenv", "serve", "--socket", ""],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--socket: an empty path" in done.stderr, done


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_while_the_socket_is_removed_is_noted(tmp_path: Path,
                                                              signum: int) -> None:
    """asyncio's loop puts SIGTERM and SIGINT back to their default action as it closes: a
    second signal while the exit removes the socket (here it waits for a lock another process
    holds on the directory) killed the service with its socket left."""
    path = tmp_path / "s" / "api.sock"
    proc = subprocess.Popen([sys.executable, "-m", "gestvenv", "serve", "--socket", str(path)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not os.path.lexists(path):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)  # serving
    holder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        proc.send_signal(signum)
        time.sleep(1.0)  # its exit waits for the lock
        assert proc.poll() is None
        proc.send_signal(signum)
        time.sleep(0.5)
    finally:
        os.close(holder)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert not path.parent.exists(), os.listdir(path.parent)


def test_a_refused_tcp_start_publishes_no_socket(tmp_path: Path) -> None:
    """TCP is bound and checked before the unix socket is published: a start refused for TCP
    (no tokens) never shows a socket that would then go, nor leaves its directory."""
    path = tmp_path / "s" / "api.sock"
    done = subprocess.run([sys.executable, "-m", "gestvenv", "serve", "--socket", str(path),
                           "--listen", "tcp://127.0.0.1:0"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "needs bearer tokens" in done.stderr, done
    assert not path.parent.exists()
