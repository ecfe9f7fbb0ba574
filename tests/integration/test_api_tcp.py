"""The API over TCP: TLS with a real certificate (made by openssl for the test), bearer tokens
stored hashed, clear text on loopback only; the real client (aiohttp over TLS) and raw
requests without, or with a wrong, token."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")

import gestvenv  # noqa: E402
from gestvenv.api import tokens  # noqa: E402
from gestvenv.api.client import connect  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[str, Path]:
    path = tmp_path / "tokens"
    made = subprocess.run([sys.executable, "-m", "gestvenv", "serve", "--new-token", str(path)],
                          check=True, capture_output=True, text=True).stdout.strip()
    return made, path


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def run(*args: str, wait_port: int | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "gestvenv", "serve", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        if wait_port is not None:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", wait_port)) == 0:
                        break
                assert time.monotonic() < deadline, "the service never listened"
                time.sleep(0.05)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)


def test_a_token_file_holds_hashes_only(token_file: tuple[str, Path]) -> None:
    token, path = token_file
    text = path.read_text()
    assert token not in text and tokens.hashed(token) in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert tokens.accepted(f"Bearer {token}", tokens.parse(text))
    assert not tokens.accepted(f"Bearer {token}x", tokens.parse(text))
    with pytest.raises(ValueError, match="not a token hash"):
        tokens.parse(token)  # a token pasted in clear is refused, not taken


def test_tls_and_a_token_serve_the_whole_flow(start: Callable[..., subprocess.Popen[str]],
                                              certificate: tuple[Path, Path],
                                              token_file: tuple[str, Path]) -> None:
    (cert, key), (token, path), port = certificate, token_file, free_port()
    sock_dir = Path(f"/tmp/gv-tcp-{os.getpid()}")
    sock_dir.mkdir(exist_ok=True)
    start("--socket", str(sock_dir / "api.sock"), "--listen", f"tcp://127.0.0.1:{port}",
          "--tls-cert", str(cert), "--tls-key", str(key), "--tokens", str(path),
          wait_port=port)
    url = f"https://127.0.0.1:{port}"

    async def flow() -> None:
        async with connect(url, token, cafile=str(cert)) as client:
            async with client.ephemeral("tcp-flow", ttl=300) as env:
                await env.upload("a.py", b"print('over tls')")
                result = await env.execute(["python", "a.py"])
                assert result.stdout == "over tls\n"
            assert "tcp-flow" not in [e["name"] for e in await client.list_environments()]
        for bad in (None, token + "x"):  # no token, a wrong one: 401, nothing done
            async with connect(url, bad, cafile=str(cert)) as client:
                with pytest.raises(gestvenv.GestvenvError, match="bearer token") as caught:
                    await client.list_environments()
                assert getattr(caught.value, "status", 401) == 401
        # A client that does not trust the certificate does not talk to it at all.
        async with connect(url, token) as client:
            with pytest.raises(gestvenv.GestvenvError, match=r"cannot reach|certificate"):
                await client.list_environments()

    try:
        asyncio.run(flow())
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    # Plain http to a TLS port: refused by TLS itself.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /v1/envs HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        assert b"200 OK" not in s.recv(4096)


def test_clear_tcp_is_loopback_only_and_tokens_are_required(
        start: Callable[..., subprocess.Popen[str]], token_file: tuple[str, Path]) -> None:
    token, path = token_file
    port = free_port()
    refused = start("--listen", f"tcp://0.0.0.0:{port}", "--tokens", str(path))
    out, _ = refused.communicate(timeout=30)
    assert refused.returncode == 1 and "needs TLS" in out, out
    refused = start("--listen", f"tcp://127.0.0.1:{port}")
    out, _ = refused.communicate(timeout=30)
    assert refused.returncode == 1 and "needs bearer tokens" in out, out
    start("--listen", f"tcp://127.0.0.1:{port}", "--tokens", str(path), wait_port=port)

    async def listed() -> list[dict[str, object]]:
        async with connect(f"http://127.0.0.1:{port}", token) as client:
            return await client.list_environments()

    assert isinstance(asyncio.run(listed()), list)
    with pytest.raises(gestvenv.ValidationError, match="https only"):
        connect("http://192.0.2.1:8787", token)  # a token is never sent in clear elsewhere
    ctx = ssl.create_default_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED  # (the client's default: verified)
