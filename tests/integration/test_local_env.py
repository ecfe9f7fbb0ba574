"""The local runtime end to end: real uv, real processes, real cleanup.

Every test runs in its own runtime dir and storage root (tests/conftest.py) and installs offline
from the session's wheelhouse; ``no_leftovers`` (conftest.py here) fails any test that leaves a
state file, a storage dir or a marked process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import gestvenv
from gestvenv import (
    BuildError,
    CommandError,
    CommandNotExecutableError,
    CommandNotFoundError,
    EnvironmentClosedError,
    EnvironmentExistsError,
    InvalidNameError,
    IsolationLevel,
    QuotaExceededError,
    ResourceLimits,
    RuntimeUnavailableError,
    StorageBackend,
    SyncEnvironment,
    UnenforceableLimitError,
    ValidationError,
    registry,
)
from gestvenv.runtime.local import HOLDER_MARKER
from gestvenv.runtime.processes import marked_pids
from gestvenv.storage import is_tmpfs

from .support import (
    assert_destroyed,
    env_dirs,
    env_pids,
    is_destroyed,
    kill_watchdogs,
    latest,
    oldest,
    pid_dead,
    processes_of,
    wait_until,
)

PY = "import sys, json, os; "


def nothing_created(home: Path) -> None:
    """No state file, no storage dir, no watchdog: a refused request leaves no trace."""
    state = home / "run" / "envs"
    assert not state.exists() or list(state.iterdir()) == []
    assert env_dirs(home / "envs") == []
    assert gestvenv.list_environments() == []


# --- the issue's examples ---

async def test_issue_example_end_to_end(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import os, sys\n"
        "import requests, six\n"
        "print('six', six.__version__)\n"
        "print('requests', requests.__version__)\n"
        "print('cwd', os.getcwd())\n"
        "print('done', file=sys.stderr)\n"
    )
    async with gestvenv.ephemeral("test-env", packages=["requests"]) as env:
        path, env_id = env.path, env.id
        assert env.name == "test-env"
        assert path.is_dir()
        await env.install(["six>=1.0"])
        result = await env.execute("python script.py", cwd=tmp_path)
        [listed] = gestvenv.list_environments()
        assert listed["name"] == "test-env"
        assert listed["state"] == "ready"
        assert listed["path"] == str(path)
        assert listed["packages"] == ["requests", "six>=1.0"]

    assert result.returncode == 0
    assert result.ok
    assert result.killed_by is None
    assert result.stdout.splitlines() == [
        f"six {latest('six')}",  # ">=1.0" respected: not the older one in the wheelhouse
        f"requests {latest('requests')}",
        f"cwd {tmp_path}",
    ]
    assert latest("six") != oldest("six")
    assert result.stderr == "done\n"
    assert 0 < result.duration < 10
    assert result.argv == (str(path / "bin" / "python"), "script.py")
    assert_destroyed(path, env_id)


def test_ephemeral_sync_example() -> None:
    with gestvenv.ephemeral_sync("quick", packages=["requests"]) as env:
        assert isinstance(env, SyncEnvironment)
        path, env_id = env.path, env.id
        result = env.execute(["python", "-c", "import requests"])
        failed = env.execute(["python", "-c", "import six"])  # not installed
        assert env.aio.name == "quick"
    assert result.ok
    assert failed.returncode == 1
    assert "ModuleNotFoundError" in failed.stderr
    assert_destroyed(path, env_id)


@pytest.mark.local_runtime  # a background process outlives its command
def test_ephemeral_sync_cleans_up_after_an_exception() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), gestvenv.ephemeral_sync("sync-boom") as env:  # noqa: PT012
        path, env_id = env.path, env.id
        env.execute("sleep 300 >/dev/null 2>&1 &", shell=True)
        assert env_pids(env_id)
        raise Boom
    assert_destroyed(path, env_id)


# --- commands ---

async def test_exit_codes_are_exact() -> None:
    async with gestvenv.ephemeral("codes") as env:
        for code in (0, 1, 3, 42, 255):
            result = await env.execute(["python", "-c", f"import sys; sys.exit({code})"])
            assert result.returncode == code
            assert result.ok is (code == 0)
            assert result.killed_by is None
        shell = await env.execute("exit 7", shell=True)
        assert shell.returncode == 7
        killed = await env.execute(["python", "-c", "import os; os.kill(os.getpid(), 15)"])
        assert killed.returncode == -signal.SIGTERM
        assert killed.describe() == "was killed by SIGTERM"


async def test_stdout_and_stderr_are_captured_separately() -> None:
    async with gestvenv.ephemeral("streams") as env:
        result = await env.execute([
            "python", "-c",
            "import sys; print('to out'); print('to err', file=sys.stderr); "
            "sys.stdout.write('é' * 100000)",
        ])
    assert result.stdout == "to out\n" + "é" * 100000
    assert result.stderr == "to err\n"


async def test_output_limit_keeps_that_much_and_the_stream_gets_everything() -> None:
    """A command that prints 3 MB: the result keeps 1000 bytes of each stream, the stream
    callback sees all of it (the API streams output and keeps little)."""
    seen = {"stdout": 0, "stderr": 0}

    def count(name: str, text: str) -> None:
        seen[name] += len(text)

    async with gestvenv.ephemeral("bounded-output") as env:
        result = await env.execute(
            ["python", "-c", "import sys; sys.stdout.write('x' * 3_000_000); "
                             "sys.stderr.write('y' * 5000)"],
            stream=count, output_limit=1000)
        with pytest.raises(gestvenv.ValidationError, match="output_limit"):
            await env.execute(["true"], output_limit=-1)
    assert result.ok
    assert result.stdout == "x" * 1000 and result.stderr == "y" * 1000
    assert seen == {"stdout": 3_000_000, "stderr": 5000}


async def test_stream_callback_sees_output_and_it_is_still_captured() -> None:
    seen: list[tuple[str, str]] = []
    async with gestvenv.ephemeral("streaming") as env:
        result = await env.execute(
            ["python", "-c", "import sys; print('a'); print('b', file=sys.stderr)"],
            stream=lambda name, text: seen.append((name, text)))
    assert result.stdout == "a\n"
    assert "".join(t for n, t in seen if n == "stdout") == "a\n"
    assert "".join(t for n, t in seen if n == "stderr") == "b\n"


async def test_stream_callback_gets_characters_split_across_reads_whole() -> None:
    seen: list[str] = []
    split_euro = ("import sys, time; out = sys.stdout.buffer; "
                  "out.write(b'\\xe2\\x82'); out.flush(); time.sleep(0.2); "
                  "out.write(b'\\xac!\\n'); out.flush()")
    async with gestvenv.ephemeral("streaming-utf8") as env:
        result = await env.execute(["python", "-c", split_euro],
                                   stream=lambda name, text: seen.append(text))
    assert result.stdout == "\u20ac!\n"
    assert "".join(seen) == "\u20ac!\n"
    assert "\ufffd" not in "".join(seen)


async def test_input_as_str_and_bytes_and_none() -> None:
    async with gestvenv.ephemeral("stdin") as env:
        text = await env.execute(["python", "-c", "import sys; print(sys.stdin.read().upper())"],
                                 input="héllo\nworld")
        data = await env.execute(
            ["python", "-c", "import sys; print(sys.stdin.buffer.read().hex())"],
            input=b"\x00\x01\xfe\xff")
        none = await env.execute(["python", "-c", "import sys; print(repr(sys.stdin.read()))"])
        big = await env.execute(["python", "-c", "import sys; print(len(sys.stdin.read()))"],
                                input="x" * 1_000_000)
        ignored = await env.execute(["python", "-c", "print('did not read')"],
                                    input=b"y" * 1_000_000)
    assert text.stdout == "HÉLLO\nWORLD\n"
    assert data.stdout == "0001feff\n"
    assert none.stdout == "''\n"  # stdin is /dev/null, not the test's terminal
    assert big.stdout == "1000000\n"
    assert ignored.ok
    assert ignored.stdout == "did not read\n"


async def test_env_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GV_OUTER", "inherited")
    show = ["python", "-c", PY + "print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))",
            "GV_OUTER", "GV_CREATED", "GV_CALL", "GESTVENV_ENV_NAME", "GESTVENV_ENV_ID"]
    async with gestvenv.ephemeral("vars", env={"GV_CREATED": "at creation",
                                               "GV_CALL": "overridden"}) as env:
        result = await env.execute(show, env={"GV_CALL": "per call with spaces"})
        env_id = env.id
    values = json.loads(result.stdout)
    assert values == {
        "GV_OUTER": "inherited",
        "GV_CREATED": "at creation",
        "GV_CALL": "per call with spaces",
        "GESTVENV_ENV_NAME": "vars",
        "GESTVENV_ENV_ID": env_id,
    }


async def test_bad_env_mapping_is_refused(gv_home: Path) -> None:
    for bad in ({"A": 1}, {"": "x"}, {"A=B": "x"}):
        with pytest.raises(ValidationError, match="env must map"):
            gestvenv.ephemeral("badenv", env=bad)  # type: ignore[arg-type]
    nothing_created(gv_home)


async def test_path_and_virtual_env_point_at_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with gestvenv.ephemeral("paths") as env:
        # a caller that is itself inside another venv must not leak it into the environment
        monkeypatch.setenv("VIRTUAL_ENV", "/somewhere/else")
        monkeypatch.setenv("PYTHONHOME", "/nonexistent/home")
        result = await env.execute([
            "python", "-c",
            PY + "import shutil; print(json.dumps([sys.prefix, sys.executable, "
            "os.environ['VIRTUAL_ENV'], os.environ['PATH'].split(os.pathsep)[0], "
            "shutil.which('python'), shutil.which('python3'), shutil.which('pip'), "
            "os.environ.get('PYTHONHOME')]))",
        ])
        shell = await env.execute("command -v python", shell=True)
        bin_dir = str(env.bin_dir)
        path = str(env.path)
    assert result.ok, result.stderr
    prefix, executable, venv, first, which_py, which_py3, which_pip, home = json.loads(
        result.stdout)
    assert prefix == path
    assert executable == str(Path(bin_dir) / "python")
    assert venv == path
    assert first == bin_dir
    assert which_py == str(Path(bin_dir) / "python")
    assert which_py3 == str(Path(bin_dir) / "python3")
    assert which_pip == str(Path(bin_dir) / "pip")
    assert home is None
    assert shell.stdout.strip() == str(Path(bin_dir) / "python")


async def test_pip_list_shows_installed_packages() -> None:
    async with gestvenv.ephemeral("piplist", packages=["requests", "gvdemo"]) as env:
        result = await env.execute("pip list")
    assert result.ok, result.stderr
    listed = {}
    for line in result.stdout.splitlines()[2:]:
        name, version = line.split()
        listed[name] = version
    assert listed == {
        "requests": latest("requests"),
        "urllib3": latest("urllib3"),  # a dependency of requests
        "gvdemo": latest("gvdemo"),
        "gvdep": latest("gvdep"),
    }


async def test_requirements_file(tmp_path: Path) -> None:
    reqs = tmp_path / "requirements.txt"
    reqs.write_text(f"gvdemo\ngvdep=={oldest('gvdep')}\n")
    assert oldest("gvdep") != latest("gvdep")
    async with gestvenv.ephemeral("reqs", requirements=reqs) as env:
        result = await env.execute(["python", "-c", "import gvdep, gvdemo; "
                                    "print(gvdep.__version__, gvdemo.VALUE)"])
    assert result.stdout.split() == [oldest("gvdep"), "42"]
    with pytest.raises(ValidationError, match="does not exist"):
        gestvenv.ephemeral("reqs", requirements=tmp_path / "missing.txt")


async def test_console_script_runs() -> None:
    async with gestvenv.ephemeral("tool", packages=["gvtool"]) as env:
        result = await env.execute("gvtool")
        bin_dir = env.bin_dir
    assert result.ok, result.stderr
    assert result.stdout == "gvtool ran\n"
    assert result.argv == (str(bin_dir / "gvtool"),)


async def test_string_command_is_split_not_given_to_a_shell() -> None:
    async with gestvenv.ephemeral("split") as env:
        printf = await env.execute("printf '[%s]\\n' 'a b' c")
        argv = await env.execute(
            """python -c 'import sys, json; print(json.dumps(sys.argv[1:]))' """
            """'a b' "c  d" '$HOME' '*' '|' wc ';' true""")
        echo = await env.execute("echo a | wc -l")
    assert printf.stdout == "[a b]\n[c]\n"
    assert json.loads(argv.stdout) == ["a b", "c  d", "$HOME", "*", "|", "wc", ";", "true"]
    assert echo.stdout == "a | wc -l\n"


async def test_shell_true_runs_pipes_and_expansions() -> None:
    async with gestvenv.ephemeral("shell") as env:
        result = await env.execute(
            "echo hello | tr a-z A-Z; echo $((6 * 7)); echo $GESTVENV_ENV_NAME", shell=True)
        with pytest.raises(ValidationError, match="one string"):
            await env.execute(["echo", "x"], shell=True)
    assert result.stdout == "HELLO\n42\nshell\n"


async def test_timeout_kills_the_whole_tree_including_a_detached_grandchild(
        tmp_path: Path) -> None:
    pids_file = tmp_path / "pids.json"
    spawner = tmp_path / "spawner.py"
    spawner.write_text(
        "import json, os, subprocess, sys, time\n"
        "detached = subprocess.Popen(['setsid', 'sleep', '300'])\n"  # a new session
        "child = subprocess.Popen(['sleep', '300'])\n"
        "tmp = sys.argv[1] + '.tmp'\n"
        "with open(tmp, 'w') as f:\n"
        "    json.dump({'detached': detached.pid, 'child': child.pid, 'me': os.getpid()}, f)\n"
        "os.rename(tmp, sys.argv[1])\n"
        "print('spawned', flush=True)\n"
        "time.sleep(300)\n"
    )
    async with gestvenv.ephemeral("timeout") as env:
        task = asyncio.ensure_future(
            env.execute(["python", str(spawner), str(pids_file)], timeout=2.0))
        await wait_until(pids_file.exists, 5, "the spawner wrote its pids")
        pids = json.loads(pids_file.read_text())
        # the grandchild really left the command's session
        await wait_until(lambda: os.getsid(pids["detached"]) == pids["detached"], 2,
                         "setsid ran")
        assert os.getsid(pids["me"]) != os.getsid(pids["detached"])
        result = await task
        for name, pid in pids.items():
            assert pid_dead(pid), f"{name} (pid {pid}) survived the timeout"
        after = await env.execute(["python", "-c", "print('still usable')"])
    assert result.killed_by == "timeout"
    assert result.timed_out
    assert result.returncode < 0
    assert not result.ok
    assert result.stdout == "spawned\n"  # output read before the kill is kept
    assert 2.0 <= result.duration < 5.0
    assert result.describe().startswith("timed out after")
    assert after.stdout == "still usable\n"


async def test_bad_timeout_and_cwd_are_refused(tmp_path: Path) -> None:
    async with gestvenv.ephemeral("badargs") as env:
        for timeout in (0, -1):
            with pytest.raises(ValidationError, match="timeout"):
                await env.execute("true", timeout=timeout)
        with pytest.raises(ValidationError, match="working directory"):
            await env.execute("true", cwd=tmp_path / "missing")
        with pytest.raises(ValidationError, match="empty command"):
            await env.execute("")
        with pytest.raises(ValidationError, match="empty command"):
            await env.execute([])


async def test_check_true_raises_command_error() -> None:
    async with gestvenv.ephemeral("check") as env:
        with pytest.raises(CommandError) as info:
            await env.execute(["python", "-c", "import sys; print('partial'); sys.exit(4)"],
                              check=True)
        with pytest.raises(CommandError) as timed:
            await env.execute(["sleep", "30"], timeout=0.3, check=True)
        fine = await env.execute(["python", "-c", "print('ok')"], check=True)
    assert info.value.result.returncode == 4
    assert info.value.result.stdout == "partial\n"
    assert "exited with status 4" in str(info.value)
    assert timed.value.result.timed_out
    assert "timed out" in str(timed.value)
    assert fine.stdout == "ok\n"


async def test_unknown_program_raises_command_not_found() -> None:
    async with gestvenv.ephemeral("notfound") as env:
        with pytest.raises(CommandNotFoundError, match="gv-no-such-program"):
            await env.execute("gv-no-such-program --flag")
        with pytest.raises(ValidationError):  # CommandNotFoundError is a ValidationError
            await env.execute(["gv-no-such-program"])


async def test_program_given_by_path(tmp_path: Path) -> None:
    """A path is run as given (relative to cwd); a missing or non-executable one is refused."""
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\necho \"hello from $0\"\n")
    script.chmod(0o755)
    plain = tmp_path / "plain.txt"
    plain.write_text("echo not executable\n")
    async with gestvenv.ephemeral("notfound-path") as env:
        by_abs = await env.execute([str(script)])
        by_rel = await env.execute("./hello.sh", cwd=tmp_path)
        with pytest.raises(CommandNotFoundError):
            await env.execute([str(tmp_path / "no-such-program")])
        with pytest.raises(CommandNotFoundError):
            await env.execute("./no-such-program", cwd=tmp_path)
        with pytest.raises(CommandNotExecutableError, match="is not executable"):
            await env.execute([str(plain)])
    assert by_abs.stdout == f"hello from {script}\n"
    # A script's $0 is the path the kernel ran: as given locally; made absolute under systemd,
    # whose units need an absolute program path (argv[0] itself is kept as given).
    assert by_rel.stdout in ("hello from ./hello.sh\n", f"hello from {script}\n")


async def test_capture_false_shares_our_output(capfd: pytest.CaptureFixture[str]) -> None:
    async with gestvenv.ephemeral("uncaptured") as env:
        result = await env.execute(["python", "-c", "import sys; print('shown'); sys.exit(5)"],
                                   capture=False)
    assert result.returncode == 5
    assert result.stdout == ""
    assert "shown\n" in capfd.readouterr().out


async def test_generated_name_ttl_zero_and_single_use_context() -> None:
    context = gestvenv.ephemeral(ttl=0)
    async with context as env:
        assert env.name.startswith("env-")
        assert env.expires_at is None
        assert env.info()["ttl"] is None
        with pytest.raises(RuntimeError, match="already in use"):
            await context.__aenter__()
        path, env_id = env.path, env.id
    assert_destroyed(path, env_id)


async def test_attach_and_destroy_by_name() -> None:
    with pytest.raises(gestvenv.EnvironmentNotFoundError):
        gestvenv.attach("nobody-here")
    with pytest.raises(InvalidNameError):
        gestvenv.attach("../x")
    async with gestvenv.ephemeral("by-name") as env:
        handle = gestvenv.attach("by-name")
        assert handle.id == env.id
        assert (await handle.execute(["python", "-c", "print(1)"])).stdout == "1\n"
        await gestvenv.destroy_environment("by-name")
        assert not env.path.exists()
        with pytest.raises(EnvironmentClosedError, match="no longer exists"):
            await env.execute("true")
        with pytest.raises(EnvironmentClosedError):
            await env.usage()
        with pytest.raises(gestvenv.EnvironmentNotFoundError):
            await gestvenv.destroy_environment("by-name")
    # leaving the block after someone else destroyed the env is not an error
    assert_destroyed(env.path, env.id)


# --- cleanup guarantees ---

@pytest.mark.local_runtime  # a background process outlives its command
async def test_cleanup_after_an_exception_in_the_block() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):  # noqa: PT012
        async with gestvenv.ephemeral("boom", packages=["six"]) as env:
            path, env_id = env.path, env.id
            # a background process that outlives its command
            await env.execute("sleep 300 >/dev/null 2>&1 &", shell=True)
            [background] = env_pids(env_id)
            raise Boom
    assert pid_dead(background)
    assert_destroyed(path, env_id)
    assert env.closed
    with pytest.raises(EnvironmentClosedError):
        await env.execute("true")
    with pytest.raises(EnvironmentClosedError):
        await env.install(["six"])
    await env.aclose()  # idempotent


async def test_cleanup_after_cancellation_during_execute() -> None:
    holder: dict[str, gestvenv.Environment] = {}

    async def body() -> None:
        async with gestvenv.ephemeral("cancelled") as env:
            holder["env"] = env
            await env.execute(["python", "-c", "import time; time.sleep(300)"])

    task = asyncio.ensure_future(body())
    await wait_until(lambda: "env" in holder and env_pids(holder["env"].id), 10,
                     "the long command started")
    env = holder["env"]
    [pid] = env_pids(env.id)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pid_dead(pid)
    assert_destroyed(env.path, env.id)


def _blocked_on(lock_file: Path) -> bool:
    """A thread of ours waits for ``lock_file``: "N: -> FLOCK ADVISORY WRITE PID MAJ:MIN:INO"."""
    inode = lock_file.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and len(fields) >= 7:
            pid, where = fields[-4], fields[-3]
            if pid == str(os.getpid()) and where.rsplit(":", 1)[-1] == str(inode):
                return True
    return False


async def _body_never_entered() -> None:
    async with gestvenv.ephemeral("cancel-early"):
        pytest.fail("the block must not be entered")


async def test_cleanup_after_cancellation_during_reservation(gv_home: Path) -> None:
    state = gv_home / "run" / "envs"
    try:
        with registry.locked():  # reserve() in its worker thread waits for this lock
            task = asyncio.ensure_future(_body_never_entered())
            await wait_until(lambda: _blocked_on(gv_home / "run" / "registry.lock"), 10,
                             "reserve() waits for the registry lock")
            task.cancel()
        # Released before the task is awaited: undoing the reservation needs the lock too.
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done, "the cancelled creation did not finish"
        with pytest.raises(asyncio.CancelledError):
            task.result()
        with registry.locked():  # the worker thread is done with the registry
            assert list(state.glob("*.json")) == []
    finally:
        for leaked in state.glob("*.json"):
            leaked.unlink()


async def test_cancellation_waits_for_a_slow_reservation_before_undoing(
        gv_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_reserve = registry.reserve
    go = threading.Event()
    entered = threading.Event()

    finished = threading.Event()

    def slow_reserve(*args: object, **kwargs: object) -> None:
        entered.set()
        try:
            go.wait(10)
            real_reserve(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            finished.set()

    monkeypatch.setattr(registry, "reserve", slow_reserve)
    state = gv_home / "run" / "envs"
    task = asyncio.ensure_future(_body_never_entered())
    try:
        await wait_until(entered.is_set, 10, "reserve() started")
        task.cancel()
        # Buggy: the undo runs at once and the task ends. Fixed: the task waits for the
        # reservation it started (and undoes it then), so it does not end within this wait.
        await asyncio.wait({task}, timeout=2)
        go.set()
        await asyncio.wait({task}, timeout=10)
        assert task.done()
        await wait_until(finished.is_set, 10, "the reservation finished")
        with registry.locked():
            assert list(state.glob("*.json")) == []
    finally:
        go.set()
        if not task.done():
            await asyncio.wait({task}, timeout=10)
        with registry.locked():
            for leaked in state.glob("*.json"):
                leaked.unlink()


@pytest.mark.local_runtime
async def test_cleanup_when_the_owner_process_is_sigkilled(tmp_path: Path) -> None:
    code = (
        "import asyncio, gestvenv\n"
        "async def main():\n"
        "    async with gestvenv.ephemeral('owned') as env:\n"
        "        print(env.id, env.path, flush=True)\n"
        "        await env.execute(['sleep', '300'])\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, cwd=tmp_path)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        env_id, path_text = line.decode().split()
        path = Path(path_text)
        await wait_until(lambda: env_pids(env_id), 10, "the command started")
        [listed] = gestvenv.list_environments()
        assert listed["owner_pid"] == proc.pid
        assert listed["state"] == "ready"
        [sleeper] = env_pids(env_id)
    finally:
        proc.kill()
        await proc.wait()
    elapsed = await wait_until(lambda: is_destroyed(path, env_id), 3.0,
                               "the watchdog removed the orphaned environment")
    assert elapsed < 3.0
    assert pid_dead(sleeper)
    assert_destroyed(path, env_id)


HOLDER = """\
import asyncio, sys, gestvenv
async def main():
    async with gestvenv.ephemeral("victim") as env:
        print(env.id, env.path, flush=True)
        await asyncio.to_thread(sys.stdin.readline)
asyncio.run(main())
"""


@pytest.mark.local_runtime
async def test_next_invocation_sweeps_what_a_killed_watchdog_left(gv_home: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        env_id, path_text = line.decode().split()
        # Both just spawned, maybe still exec'ing Python (not yet recognisable): waited for.
        await wait_until(lambda: marked_pids(HOLDER_MARKER, env_id) and processes_of(
            gv_home / "run", marked_only=False, cmd="gestvenv.watchdog"), 5,
            "the env's own watchdog and the per-user one running")
        kill_watchdogs(gv_home / "run")
        # ...and the env's own watchdog: nothing is left to watch it.
        for pid in marked_pids(HOLDER_MARKER, env_id):
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        await proc.wait()
    [listed] = gestvenv.list_environments()
    assert listed["state"] == "orphaned"  # nobody is left to remove it...
    assert env_dirs(gv_home / "envs") == [Path(path_text)]
    async with gestvenv.ephemeral("next") as env:  # ...until gestvenv runs again
        await wait_until(lambda: [e["name"] for e in gestvenv.list_environments()] == ["next"],
                         3, "the new watchdog removed the orphan")
        assert env_dirs(gv_home / "envs") == [env.path]
        assert env_pids(env_id) == []
        assert (await env.execute("true")).ok


@pytest.mark.local_runtime
async def test_ttl_kills_running_command_and_removes_environment() -> None:
    async with gestvenv.ephemeral("short-lived", ttl=2) as env:
        path, env_id = env.path, env.id
        expires = env.expires_at
        assert expires is not None
        assert abs(expires - (time.time() + 2)) < 1.0
        result = await env.execute(["sleep", "30"])
        assert result.killed_by == "ttl"
        assert result.returncode < 0
        assert not result.ok
        assert "TTL" in result.describe()
        await wait_until(lambda: is_destroyed(path, env_id), 3.0, "the expired env is removed")
        assert time.time() - expires <= 1.5
        with pytest.raises(EnvironmentClosedError, match="TTL"):
            await env.execute("true")
    assert_destroyed(path, env_id)


@pytest.mark.local_runtime
async def test_watchdog_removes_files_of_an_env_with_another_storage_root(
        tmp_path: Path) -> None:
    """The watchdog runs with its own config; it must still delete an env created elsewhere."""
    other_root = tmp_path / "other-root"
    config = gestvenv.load_config().replace(storage_root=str(other_root))
    env = await gestvenv.create_environment("elsewhere", ttl=1, config=config)
    try:
        assert env.path.parent == other_root
        await wait_until(lambda: not gestvenv.list_environments(), 4,
                         "the watchdog removed the expired env")
        assert not env.path.exists()
    finally:
        await env.aclose()  # with the creating config: allowed to delete there
        assert not env.path.exists()


@pytest.mark.local_runtime
async def test_idle_timeout_removes_an_unused_environment_but_not_a_busy_one() -> None:
    async with gestvenv.ephemeral("idle", idle_timeout=1) as env, \
            gestvenv.ephemeral("busy", idle_timeout=1) as busy:
        path, env_id = env.path, env.id
        result = await busy.execute(["sleep", "2.5"])  # longer than the idle timeout
        assert result.ok
        assert result.killed_by is None
        assert busy.path.exists()
        await wait_until(lambda: not path.exists(), 2, "the idle environment is removed")
        assert env_pids(env_id) == []
        assert [e["name"] for e in gestvenv.list_environments()] == ["busy"]
        with pytest.raises(EnvironmentClosedError):
            await env.execute("true")
        busy_path, busy_id = busy.path, busy.id
    assert_destroyed(busy_path, busy_id)


# --- refusals ---

async def test_bad_input_creates_nothing(gv_home: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError):
        gestvenv.ephemeral("../escape", packages=["six"])
    with pytest.raises(InvalidNameError):
        gestvenv.ephemeral("a;rm -rf ~")
    refusals = [
        {"packages": "requests"},
        {"packages": ["--index-url=http://evil.invalid"]},
        {"packages": [""]},
        {"ttl": -1},
        {"ttl": True},
        {"ttl": 1.5},
        {"idle_timeout": -3},
        {"resource_limits": {"max_memory": 100}},
        {"isolation_level": "vm"},
        {"storage_backend": "floppy"},
        {"requirements": tmp_path / "nope.txt"},
    ]
    for kwargs in refusals:
        with pytest.raises(ValidationError):
            gestvenv.ephemeral("fine-name", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(RuntimeUnavailableError):
        async with gestvenv.ephemeral("fine-name", runtime="docker"):
            pytest.fail("entered")
    with pytest.raises(ValidationError, match=r"9\.99"):
        async with gestvenv.ephemeral("fine-name", python="9.99"):
            pytest.fail("entered")
    nothing_created(gv_home)


async def test_name_collision_raises_and_spares_the_first() -> None:
    async with gestvenv.ephemeral("dup") as first:
        with pytest.raises(EnvironmentExistsError, match="dup"):
            async with gestvenv.ephemeral("dup"):
                pytest.fail("entered")
        result = await first.execute(["python", "-c", "print('first is fine')"])
        assert result.stdout == "first is fine\n"
        assert [e["id"] for e in gestvenv.list_environments()] == [first.id]
        assert env_dirs(first.path.parent) == [first.path]
        first_id = first.id
    async with gestvenv.ephemeral("dup") as again:  # the name is free again
        assert again.id != first_id
        again_path, again_id = again.path, again.id
    assert_destroyed(again_path, again_id)


async def test_max_concurrent_is_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_MAX_CONCURRENT", "2")
    async with contextlib.AsyncExitStack() as stack:
        one = await stack.enter_async_context(gestvenv.ephemeral("one"))
        await stack.enter_async_context(gestvenv.ephemeral("two"))
        with pytest.raises(QuotaExceededError, match="max_concurrent is 2"):
            async with gestvenv.ephemeral("three"):
                pytest.fail("entered")
        assert sorted(e["name"] for e in gestvenv.list_environments()) == ["one", "two"]
        assert len(env_dirs(one.path.parent)) == 2
        await one.aclose()
        three = await stack.enter_async_context(gestvenv.ephemeral("three"))
        assert (await three.execute("true")).ok
        assert sorted(e["name"] for e in gestvenv.list_environments()) == ["three", "two"]
    assert gestvenv.list_environments() == []


async def test_max_total_memory_is_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_MAX_TOTAL_MEMORY_MB", "300")
    limits = ResourceLimits(max_memory=200)
    async with gestvenv.ephemeral("mem-a", resource_limits=limits):
        with pytest.raises(QuotaExceededError, match="max_total_memory_mb"):
            async with gestvenv.ephemeral("mem-b", resource_limits=limits):
                pytest.fail("entered")
        async with gestvenv.ephemeral("mem-c", resource_limits=ResourceLimits(max_memory=100)):
            assert len(gestvenv.list_environments()) == 2


@pytest.mark.parametrize("limits", [
    ResourceLimits(max_cpu_percent=50),
    # (max_disk: held by root's own mounts, refused for others: tests/integration/
    # test_disk_limits.py)
])
@pytest.mark.local_runtime
async def test_unenforceable_limits_are_refused_unless_allowed(
        gv_home: Path, limits: ResourceLimits, monkeypatch: pytest.MonkeyPatch) -> None:
    [key] = limits.requested()
    with pytest.raises(UnenforceableLimitError, match=key) as info:
        async with gestvenv.ephemeral("limited", resource_limits=limits):
            pytest.fail("entered")
    assert "allow_unenforced" in str(info.value)
    nothing_created(gv_home)

    async with gestvenv.ephemeral("limited", resource_limits=limits,
                                  allow_unenforced=True) as env:
        status = env.enforcement.limits[key]
        assert status.enforced is False
        assert status.requested == limits.requested()[key]
        assert status.mechanism
        assert set(env.enforcement.unenforced) == {key}
        assert env.resource_limits == limits
        assert env.info()["enforcement"]["limits"][key]["enforced"] is False
        assert (await env.execute("true")).ok

    # the configuration can allow it too
    monkeypatch.setenv("GESTVENV_EPHEMERAL_ALLOW_UNENFORCED_LIMITS", "true")
    async with gestvenv.ephemeral("limited", resource_limits=limits) as env:
        assert env.enforcement.limits[key].enforced is False


@pytest.mark.local_runtime
async def test_max_memory_is_enforced_with_rlimit_as() -> None:
    mb = 1 << 20
    allocate = "b = bytearray({} * 1024 * 1024); print(len(b))"
    async with gestvenv.ephemeral("mem", resource_limits=ResourceLimits(max_memory=200)) as env, \
            gestvenv.ephemeral("nolimit") as free:
        assert env.enforcement.limits["max_memory"].enforced is True
        big = await env.execute(["python", "-c", allocate.format(400)])
        small = await env.execute(["python", "-c", allocate.format(20)])
        limit = await env.execute(["python", "-c", "import resource; "
                                   "print(*resource.getrlimit(resource.RLIMIT_AS))"])
        control = await free.execute(["python", "-c", allocate.format(400)])
    assert big.returncode != 0
    assert "MemoryError" in big.stderr
    assert small.ok, small.stderr
    assert small.stdout == f"{20 * mb}\n"
    assert limit.stdout.split() == [str(200 * mb)] * 2
    assert control.ok, control.stderr  # the failure above is the limit's doing
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != 200 * mb  # the test process is untouched


@pytest.mark.local_runtime
async def test_namespace_isolation_is_reported_honestly_on_local() -> None:
    from gestvenv.runtime import bwrap

    why_not = bwrap.probe_for(os.geteuid(), True)  # None: bubblewrap can sandbox here
    expected = IsolationLevel.NAMESPACE if why_not is None else IsolationLevel.PROCESS
    async with gestvenv.ephemeral("ns", isolation_level="namespace") as env:
        assert env.runtime == "local"
        assert env.isolation is expected
        assert env.enforcement.isolation_requested is IsolationLevel.NAMESPACE
        assert env.enforcement.isolation_applied is expected
        info = env.info()
        assert info["enforcement"]["isolation_applied"] == expected.value
        if why_not is not None:  # the fallback says why
            assert any("namespace" in note for note in info["notes"])
        assert (await env.execute("true")).ok


@pytest.mark.parametrize("backend", ["memory", "tmpfs", "disk"])
async def test_storage_backends(backend: str, gv_home: Path, shared_cache: Path) -> None:
    async with gestvenv.ephemeral(f"store-{backend}", packages=["six"],
                                  storage_backend=backend) as env:
        path, env_id = env.path, env.id
        assert env.storage_backend is StorageBackend(backend)
        assert env.info()["storage_backend"] == backend
        result = await env.execute(["python", "-c", "import six; print(six.__version__)"])
        installed = next(path.glob("lib/python*/site-packages/six/__init__.py"))
        links = installed.stat().st_nlink
        if backend == "memory":
            assert str(path).startswith("/dev/shm/")
        if backend == "disk":
            assert path.parent == gv_home / "envs"
            assert is_tmpfs(path) == is_tmpfs(gv_home)  # where the test put the disk root
        else:
            assert is_tmpfs(path)
        if backend == "tmpfs" and path.parent != gv_home / "run" / "storage":
            assert any("not a tmpfs" in note for note in env.info()["notes"])
        same_fs = os.stat(shared_cache).st_dev == os.stat(path).st_dev
    assert result.stdout == f"{latest('six')}\n"
    # files are the env's own (reflinked or copied from the shared cache), never hardlinks,
    # whether or not the cache is on the env's filesystem
    assert links == 1, (links, same_fs)
    assert_destroyed(path, env_id)


async def test_failed_install_raises_build_error_and_leaves_nothing(gv_home: Path) -> None:
    with pytest.raises(BuildError) as info:
        async with gestvenv.ephemeral("broken", packages=["six", "gv-no-such-package"]):
            pytest.fail("entered")
    assert "gv-no-such-package" in str(info.value)
    assert info.value.output  # the installer's own message
    nothing_created(gv_home)


async def test_failed_install_into_a_live_environment_keeps_it_usable() -> None:
    async with gestvenv.ephemeral("keeps", packages=["six"]) as env:
        with pytest.raises(BuildError, match="gv-no-such-package"):
            await env.install(["gv-no-such-package"])
        with pytest.raises(ValidationError):
            await env.install("six")  # type: ignore[arg-type]
        result = await env.execute(["python", "-c", "import six"])
        assert result.ok
        assert env.info()["packages"] == ["six"]


async def test_environments_with_the_same_packages_are_independent() -> None:
    """The second env may come from a snapshot of the first install: it must stand alone."""
    packages = ["gvtool", "six"]
    async with gestvenv.ephemeral("first-set", packages=packages) as first:
        first_path, first_id = first.path, first.id
        async with gestvenv.ephemeral("second-set", packages=packages) as second:
            await first.aclose()
            first_gone = not first_path.exists()
            shebang = (second.bin_dir / "gvtool").read_text().splitlines()[0]
            tool = await second.execute("gvtool")
            six = await second.execute(["python", "-c", "import six; print(six.__file__)"])
            listed = await second.execute("pip list")
            removed = await second.execute("pip uninstall six")
            gone = await second.execute(["python", "-c", "import six"])
            second_path = second.path
    assert first_gone
    assert shebang == f"#!{second_path / 'bin' / 'python'}"
    assert tool.stdout == "gvtool ran\n"
    assert six.stdout.startswith(str(second_path))
    assert "gvtool" in listed.stdout
    assert removed.ok, removed.stderr
    assert gone.returncode == 1
    assert env_pids(first_id) == []


async def test_installed_files_are_never_hardlinks_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # link_mode = "auto" (the default) reflinks or copies: no inode shared with the cache or a
    # snapshot, so an in-place edit stays in its env (it used to be hardlinks: shared inodes).
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CACHE_DIR", str(tmp_path / "cache" / "uv"))
    async with gestvenv.ephemeral("linked", packages=["six"]) as env:   # installed by uv
        init = next(env.path.glob("lib/python*/site-packages/six/__init__.py"))
        assert init.stat().st_nlink == 1
        await env.execute(["python", "-c", "import six; "
                           "open(six.__file__, 'a').write('TAMPERED = True\\n')"], check=True)
    async with gestvenv.ephemeral("cloned", packages=["six"]) as env:   # from the snapshot
        init = next(env.path.glob("lib/python*/site-packages/six/__init__.py"))
        assert init.stat().st_nlink == 1
        result = await env.execute(["python", "-c", "import six; print(hasattr(six, 'TAMPERED'))"])
    assert result.stdout == "False\n"


async def test_link_mode_copy_keeps_an_in_place_change_out_of_later_envs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a cache of this test's own, so that any damage stays here
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CACHE_DIR", str(tmp_path / "cache" / "uv"))
    monkeypatch.setenv("GESTVENV_EPHEMERAL_LINK_MODE", "copy")
    async with gestvenv.ephemeral("tamper", packages=["six"]) as env:
        init = next(env.path.glob("lib/python*/site-packages/six/__init__.py"))
        assert init.stat().st_nlink == 1
        await env.execute(["python", "-c", "import six; "
                           "open(six.__file__, 'a').write('TAMPERED = True\\n')"], check=True)
    async with gestvenv.ephemeral("victim", packages=["six"]) as env:
        result = await env.execute(["python", "-c", "import six; print(hasattr(six, 'TAMPERED'))"])
    assert result.stdout == "False\n"


@pytest.mark.slow
async def test_venv_builder_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_BUILDER", "venv")
    async with gestvenv.ephemeral("venv-built", packages=["six>=1.0"]) as env:
        path, env_id = env.path, env.id
        assert env.info()["builder"] == "venv"
        await env.install(["gvtool"])
        result = await env.execute(["python", "-c", "import six; print(six.__version__)"])
        tool = await env.execute("gvtool")
        pip = await env.execute(["pip", "--version"])
        seeded = list(path.glob("lib/python*/site-packages/pip"))
    assert result.stdout == f"{latest('six')}\n"
    assert tool.stdout == "gvtool ran\n"
    assert pip.ok and pip.stdout.startswith("pip ")  # the one pip, run by the env's python
    assert seeded == []  # no pip copied into the env (ensurepip): its pip is a shim
    assert_destroyed(path, env_id)


@pytest.mark.local_runtime
async def test_usage_reports_processes_and_disk() -> None:
    async with gestvenv.ephemeral("usage", packages=["six"]) as env:
        await env.execute("sleep 300 >/dev/null 2>&1 &", shell=True)
        usage = await env.usage()
        [pid] = env_pids(env.id)
    assert usage.processes == 1
    assert usage.memory_bytes > 0
    assert usage.disk_bytes > 0
    assert pid_dead(pid)
