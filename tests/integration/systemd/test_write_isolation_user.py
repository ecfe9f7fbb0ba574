"""Write isolation (tests/integration/test_write_isolation.py) as a non-root user.

Inside the test host (root): the check runs as its user gvtest, as a script of the system
python3 with the checkout on PYTHONPATH (as test_cleanup_timer.py runs gvtest's commands),
under gvtest's own systemd --user and under the local runtime. In the cgroup v2 VM tier
(``-m v2``, run as the non-root user tester): the same check, in-process.
"""

from __future__ import annotations

import json
import os
import pwd
import textwrap
from pathlib import Path

import pytest

from ..support import run_as_gvtest
from ..test_write_isolation import write_isolation_problems

BACKENDS = ("disk", "tmpfs", "memory")

# Everything in a temp dir of gvtest's own: runtime dir, storage root, config, uv cache (and the
# snapshots beside it), a wheelhouse. Prints the problems found, as JSON, on its last line.
SCRIPT = textwrap.dedent("""
    import asyncio, json, os, shutil, sys, tempfile, time
    from pathlib import Path

    runtime, backends = sys.argv[1], sys.argv[2:]
    base = Path(tempfile.mkdtemp(prefix="gv-write-isolation-"))
    from tests.harness.wheels import build_wheelhouse
    wheelhouse = build_wheelhouse(base / "wheelhouse")
    cache = base / "cache" / "uv"
    for key in [k for k in os.environ if k.startswith(("GESTVENV_", "UV_"))]:
        del os.environ[key]
    from tests.harness.gv_env import gestvenv_environ
    os.environ.update(gestvenv_environ(base, cache=cache, wheelhouse=wheelhouse),
                      GESTVENV_EPHEMERAL_RUNTIME=runtime)
    from tests.integration.test_write_isolation import write_isolation_problems

    async def main():
        problems = []
        for backend in backends:
            problems += await write_isolation_problems(backend, cache)
        return problems

    problems = asyncio.run(main())
    # The local runtime's watchdog for this runtime dir exits ~2 s after the last env.
    needle = f"GESTVENV_RUNTIME_DIR={base / 'run'}".encode()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        mine = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle in f.read().split(b"\\0") and int(pid) != os.getpid():
                        mine.append(pid)
            except OSError:
                pass
        if not mine:
            break
        time.sleep(0.1)
    else:
        problems.append(f"processes of the runtime dir left: {mine}")
    for sub in ("envs", "run/storage"):
        d = base / sub
        left = [n for n in os.listdir(d) if n != ".gestvenv-root"] if d.is_dir() else []
        if left:
            problems.append(f"{d} not empty: {left}")
    shutil.rmtree(base)
    print(json.dumps({"uid": os.geteuid(), "problems": problems}))
""")


def _has_gvtest() -> bool:
    try:
        pwd.getpwnam("gvtest")
    except KeyError:
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0 or not _has_gvtest(),
                    reason="runs the check as the test host's user gvtest (needs root)")
@pytest.mark.parametrize("runtime", ["auto", "local"])
def test_an_in_place_edit_by_a_user_reaches_nothing_shared(runtime: str) -> None:
    """gvtest's envs (auto: under gvtest's systemd --user), edited in place from inside."""
    done = run_as_gvtest("/usr/bin/python3", "-c", SCRIPT, runtime, *BACKENDS)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["uid"] == pwd.getpwnam("gvtest").pw_uid
    assert not result["problems"], "\n".join(result["problems"])


@pytest.mark.v2
@pytest.mark.skipif(os.geteuid() == 0, reason="as root, the gvtest test above covers it")
@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_in_place_edit_by_this_user_reaches_nothing_shared(
        backend: str, shared_cache: Path) -> None:
    problems = await write_isolation_problems(backend, shared_cache)
    assert not problems, "\n".join(problems)
