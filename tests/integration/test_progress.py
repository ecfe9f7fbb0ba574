"""Progress where work is long: ``gestvenv ephemeral create`` on a terminal says what it does as
it goes (its stages, and the installer's own progress: resolving, downloading with bytes,
installing); piped, or with --json, it prints what it always printed and nothing more.

The pandas tests install the real pandas from PyPI (uv's cache and the snapshots are the
module's own, so the first install downloads); the others use the offline wheelhouse.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gestvenv
from gestvenv import progress
from gestvenv.builder import find_uv

GV = [sys.executable, "-m", "gestvenv"]
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
# A download's progress, in bytes: uv's "12.3 MiB/45.6 MiB", pip's "(12.4 MB)" / "3.1/12.4 MB".
BYTES = re.compile(r"\d+(\.\d+)? ?(MiB|MB|KiB|kB)")


def pypi_reachable() -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True  # (through the proxy: uv and pip use it)
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def pypi_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable from here")
    return tmp_path_factory.mktemp("pypi-cache") / "uv"


@pytest.fixture
def online(pypi_cache: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of a gestvenv command that installs from PyPI."""
    monkeypatch.setenv("GESTVENV_EPHEMERAL_OFFLINE", "0")
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CACHE_DIR", str(pypi_cache))
    for key in list(os.environ):
        if key.startswith("PIP_"):  # (this machine's own pip settings are not the test's)
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return dict(os.environ)


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    if names:
        subprocess.run([*GV, "ephemeral", "cleanup", *names], capture_output=True, timeout=120)


def on_a_terminal(argv: list[str], env: dict[str, str], *, stdout_too: bool = True,
                  timeout: float = 900) -> tuple[list[tuple[float, bytes]], str, int]:
    """Run ``argv`` with stderr (and stdout) on a new 30x120 terminal: (when each chunk of
    the terminal's output came, in seconds from the start; stdout if piped; exit status)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("hhhh", 30, 120, 0, 0))
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=slave,
                            stdout=slave if stdout_too else subprocess.PIPE, env=env,
                            start_new_session=True)
    os.close(slave)
    chunks: list[tuple[float, bytes]] = []
    try:
        while time.monotonic() - started < timeout:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not data:
                break
            chunks.append((time.monotonic() - started, data))
        out = proc.stdout.read().decode() if proc.stdout else ""
        code = proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return chunks, out, code


def text_of(chunks: list[tuple[float, bytes]]) -> str:
    return ANSI.sub("", b"".join(data for _, data in chunks).decode(errors="replace"))


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["uv", "venv"])
def test_on_a_terminal_creating_a_pandas_env_shows_progress_within_a_second(
        builder: str, online: dict[str, str], cleanup: list[str]) -> None:
    if builder == "uv" and find_uv() is None:
        pytest.skip("no uv here")
    name = f"pd-{builder}"
    cleanup.append(name)
    chunks, _, code = on_a_terminal(
        [*GV, "ephemeral", "create", name, "-p", "pandas", "--ttl", "600"],
        {**online, "GESTVENV_EPHEMERAL_BUILDER": builder})
    text = text_of(chunks)
    assert code == 0, text[-3000:]
    first_at, first = chunks[0]
    took = chunks[-1][0]
    print(f"{builder}: first output after {first_at:.2f} s, done after {took:.2f} s")
    assert first.startswith(b"gestvenv: "), first
    assert first_at < 1.0, (first_at, text[:500])
    lines = text.replace("\r", "\n").splitlines()
    installing = [n for n, line in enumerate(lines) if line.startswith("gestvenv: installing")]
    created = [n for n, line in enumerate(lines) if line.startswith(f"created {name} at ")]
    assert installing and created and installing[0] < created[0], text[-3000:]
    # The installer's own progress, between the two: what it downloads, with its size.
    between = "\n".join(lines[installing[0]:created[0]])
    assert "pandas" in between and BYTES.search(between), between[-3000:]
    # ... and it came as it went, not all at the end.
    assert sum(1 for at, _ in chunks if at < took - 1.0) >= 3, [at for at, _ in chunks]


@pytest.mark.slow
def test_piped_only_the_final_line(online: dict[str, str], cleanup: list[str]) -> None:
    cleanup.append("pd-piped")
    done = subprocess.run([*GV, "ephemeral", "create", "pd-piped", "-p", "pandas", "-p", "six",
                           "--ttl", "600"], capture_output=True, text=True, env=online,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert re.fullmatch(r"created pd-piped at \S+ \([^)]*\)\n", done.stdout), done.stdout


def test_with_json_on_a_terminal_nothing_is_added(cleanup: list[str]) -> None:
    cleanup.append("js")
    chunks, out, code = on_a_terminal([*GV, "ephemeral", "create", "js", "-p", "gvtool",
                                       "--json", "--ttl", "600"], dict(os.environ),
                                      stdout_too=False, timeout=300)
    assert code == 0, text_of(chunks)
    assert json.loads(out)["name"] == "js"
    assert text_of(chunks) == ""


async def test_the_stages_a_clone_and_a_failure_as_reported() -> None:
    out = io.StringIO()
    with progress.reporting(out):
        async with gestvenv.ephemeral("rep1", packages=["gvtool", "six>=1.0"]):
            pass
        first = out.getvalue()
        out.seek(0)
        out.truncate()
        async with gestvenv.ephemeral("rep2", packages=["gvtool", "six>=1.0"]):
            pass
        second = out.getvalue()
        with pytest.raises(gestvenv.BuildError) as caught:
            async with gestvenv.ephemeral("rep3", packages=["gvnosuchthing"]):
                pass
    steps = [line for line in first.splitlines() if line.startswith("gestvenv: ")]
    assert steps[0].startswith("gestvenv: writing its virtualenv (Python ")
    assert any(s.startswith("gestvenv: installing with ") for s in steps), first
    assert steps[-1].startswith("gestvenv: saving a snapshot"), first
    assert len(steps) < len(first.splitlines())  # the installer's own lines in between
    assert re.search(r"^gestvenv: cloning the package set's snapshot \(\d+ files, [\d.]+ "
                     r"(B|kB|MB)\)$", second, re.M), second
    # The failure's output is what the installer said, as text.
    message = str(caught.value)
    assert "gvnosuchthing" in message.split("\n", 1)[1] and "\x1b" not in message, message


def test_the_one_shot_reports_on_a_terminal_and_piped_prints_only_the_commands_output() -> None:
    """`ephemeral run` shows the creation's progress on a terminal, then the command's own
    output; piped (or with --quiet) its output is the command's alone."""
    argv = [*GV, "ephemeral", "run", "-p", "six", "--", "python", "-c",
            "import six; print('six', six.__version__)"]
    chunks, _, code = on_a_terminal(argv, dict(os.environ), timeout=300)
    text = text_of(chunks).replace("\r", "")
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0].startswith("gestvenv: "), text
    assert lines[-1].startswith("six "), text
    piped = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert (piped.returncode, piped.stderr) == (0, ""), piped.stderr
    assert piped.stdout.startswith("six ") and piped.stdout.count("\n") == 1, piped.stdout
    quiet = [*GV, "ephemeral", "run", "--quiet", *argv[len(GV) + 2:]]
    chunks, _, code = on_a_terminal(quiet, dict(os.environ), timeout=300)
    assert code == 0 and text_of(chunks).replace("\r", "").startswith("six "), text_of(chunks)
