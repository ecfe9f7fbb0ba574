"""The pytest plugin (gestvenv/pytest_plugin.py), run by pytest itself (pytester, in a
process of its own, with the plugin loaded by its entry point as a user's pytest loads it),
and the product's own fixture example, verbatim.

Each run writes what its tests saw (env name, path, id) to a file; afterwards the env must be
gone: no state, dir, unit, process, mount or container (support.leftovers), unless kept.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gestvenv
from tests.integration.support import env_names, leftover_count, leftover_summary, leftovers

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow

RECORD = textwrap.dedent("""\
    import json, os, pathlib

    def record(env, **more):
        with open(os.environ["SEEN"], "a") as f:
            f.write(json.dumps({"name": env.name, "path": str(env.path), "id": env.id,
                                **more}) + "\\n")
""")


@pytest.fixture
def seen(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "seen.jsonl"
    monkeypatch.setenv("SEEN", str(path))
    pytester.makepyfile(record=RECORD)
    return path


def envs_seen(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def nothing_left() -> None:
    left = leftovers()
    assert leftover_count(left) == 0, (leftover_summary(left), left)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=600)
    print(result.stdout.str()[-5000:])
    return result


def test_sync_fixture_a_fresh_env_per_test_gone_after_each(pytester: pytest.Pytester,
                                                           seen: Path) -> None:
    pytester.makepyfile(test_sync="""
        import pytest
        from record import record

        @pytest.mark.gestvenv(packages=["six"])
        def test_one(ephemeral_env):
            done = ephemeral_env.execute(["python", "-c", "import six, sys; print(sys.prefix)"])
            assert done.ok and done.stdout.strip() == str(ephemeral_env.path)
            record(ephemeral_env, packages=ephemeral_env.info()["packages"])

        def test_two(ephemeral_env):
            assert not ephemeral_env.execute(["python", "-c", "import six"]).ok
            record(ephemeral_env)
    """)
    run(pytester).assert_outcomes(passed=2)
    one, two = envs_seen(seen)
    assert one["name"].startswith("pytest-test_one-") and two["name"].startswith("pytest-test_two")
    assert one["packages"] == ["six"] and one["id"] != two["id"]
    assert not Path(one["path"]).exists() and not Path(two["path"]).exists()
    assert env_names() == set()
    nothing_left()


ASYNC_TESTS = """
    import asyncio
    import pytest
    import gestvenv
    from record import record

    @pytest.mark.{mark}
    async def test_async(async_ephemeral_env):
        assert isinstance(async_ephemeral_env, gestvenv.Environment)
        done = await async_ephemeral_env.execute(["python", "-c", "print(6 * 7)"])
        assert done.stdout.strip() == "42"
        usage = await async_ephemeral_env.usage()   # in the test's loop, as the env was made
        record(async_ephemeral_env, loop=id(asyncio.get_running_loop()))

    @pytest.mark.{mark}
    @pytest.mark.gestvenv(packages=["six"])
    async def test_fails(async_ephemeral_env):
        record(async_ephemeral_env)
        assert False, "failing on purpose"
"""


@pytest.mark.parametrize(("runner", "mark", "args"), [
    ("pytest-asyncio (strict mode)", "asyncio", ()),
    ("pytest-asyncio (auto mode)", "asyncio", ("-o", "asyncio_mode=auto")),
    ("anyio's plugin", "anyio", ()),
])
def test_async_fixture_under_each_runner(pytester: pytest.Pytester, seen: Path, runner: str,
                                         mark: str, args: tuple[str, ...]) -> None:
    """Both async runners loaded, as in a user's venv; the env is gone after a passing and
    after a failing test; no warning from pytest-asyncio about the fixture."""
    pytester.makepyfile(test_async=ASYNC_TESTS.format(mark=mark))
    result = run(pytester, "-W", "error:asyncio test:pytest.PytestDeprecationWarning", *args)
    # anyio runs each test on every backend installed: on trio, the fixture skips.
    on_trio = mark == "anyio" and importlib.util.find_spec("trio") is not None
    result.assert_outcomes(passed=1, failed=1, skipped=2 if on_trio else 0)
    result.stdout.no_fnmatch_line("*kept*")
    assert len(envs_seen(seen)) == 2
    for env in envs_seen(seen):
        assert not Path(env["path"]).exists(), (runner, env)
    assert env_names() == set()
    nothing_left()


def test_pytest_x_stops_the_run_and_leaves_nothing(pytester: pytest.Pytester,
                                                   seen: Path) -> None:
    pytester.makepyfile(test_x="""
        import pytest
        from record import record

        def test_first(ephemeral_env):
            record(ephemeral_env)
            assert False

        @pytest.mark.asyncio
        async def test_second(async_ephemeral_env):
            record(async_ephemeral_env)
    """)
    result = run(pytester, "-x")
    result.assert_outcomes(failed=1)
    [first] = envs_seen(seen)
    assert not Path(first["path"]).exists()
    nothing_left()


def test_keep_failed_keeps_only_failed_tests_envs_until_their_ttl(pytester: pytest.Pytester,
                                                                  seen: Path) -> None:
    pytester.makepyfile(test_keep="""
        import pytest
        from record import record

        @pytest.mark.gestvenv(ttl=120)
        def test_passes(ephemeral_env):
            record(ephemeral_env, outcome="passed")

        @pytest.mark.gestvenv(ttl=120)
        def test_fails(ephemeral_env):
            ephemeral_env.execute(["python", "-c", "open('evidence.txt', 'w').write('x')"],
                                  cwd=ephemeral_env.path)
            record(ephemeral_env, outcome="failed")
            assert False

        @pytest.mark.asyncio
        @pytest.mark.gestvenv(ttl=120)
        async def test_fails_async(async_ephemeral_env):
            record(async_ephemeral_env, outcome="failed")
            assert False

        @pytest.mark.gestvenv(ttl=0)
        def test_fails_without_ttl(ephemeral_env):
            record(ephemeral_env, outcome="unbounded")
            assert False
    """)
    result = run(pytester, "--gestvenv-keep-failed")
    result.assert_outcomes(passed=1, failed=3)
    by_outcome: dict[str, list[dict[str, str]]] = {}
    for env in envs_seen(seen):
        by_outcome.setdefault(env["outcome"], []).append(env)
    [passed], failed, [unbounded] = by_outcome["passed"], by_outcome["failed"], \
        by_outcome["unbounded"]
    assert not Path(passed["path"]).exists()
    assert not Path(unbounded["path"]).exists()  # no TTL: kept, it would never end
    result.stdout.fnmatch_lines([
        "*gestvenv: environments kept for inspection*",
        f"*environment '{failed[0]['name']}' at *, kept until *; inspect: gestvenv ephemeral "
        f"show {failed[0]['name']}; remove: gestvenv ephemeral cleanup {failed[0]['name']}",
        f"*test_fails_without_ttl: not kept: environment '{unbounded['name']}' has no TTL*",
    ])
    try:
        listed = {e["name"]: e for e in gestvenv.list_environments()
                  if e["state"] != "unit-only"}
        assert set(listed) == {e["name"] for e in failed}
        for env in failed:
            assert Path(env["path"]).is_dir()
            assert listed[env["name"]]["state"] == "ready"
            assert listed[env["name"]]["owner_pid"] is None  # the pytest run has ended
            assert listed[env["name"]]["expires_at"] is not None  # still bounded by its TTL
        assert (Path(failed[0]["path"]) / "evidence.txt").exists() or \
            (Path(failed[1]["path"]) / "evidence.txt").exists()
        # Usable after the run, by name, as the report says.
        done = subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "exec",
                               failed[0]["name"], "--", "python", "-c", "print('inspected')"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.stdout.strip() == "inspected", done.stderr
    finally:
        for env in failed:
            subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "cleanup",
                            env["name"]], capture_output=True, timeout=120, check=False)
    nothing_left()


def test_marker_and_ini_options(pytester: pytest.Pytester, seen: Path) -> None:
    pytester.makeini("""
        [pytest]
        gestvenv_packages =
            six
        gestvenv_ttl = 300
        gestvenv_limits = network_access=false
    """)
    pytester.makepyfile(test_options="""
        import pytest
        from record import record

        def test_ini(ephemeral_env):
            assert ephemeral_env.execute(["python", "-c", "import six"]).ok
            assert ephemeral_env.resource_limits.network_access is False
            assert ephemeral_env.info()["ttl"] == 300
            record(ephemeral_env)

        @pytest.mark.gestvenv(packages=["requests"], ttl=200, network_access=True)
        class TestClass:
            @pytest.mark.gestvenv(ttl=100)
            def test_closest_wins(self, ephemeral_env):
                assert ephemeral_env.info()["packages"] == ["requests"]
                assert ephemeral_env.info()["ttl"] == 100
                assert ephemeral_env.resource_limits.network_access is True
                record(ephemeral_env)

        @pytest.mark.gestvenv(isolation="nonsense")
        def test_bad_isolation(ephemeral_env):
            pass

        @pytest.mark.gestvenv(memory=512)
        def test_unknown_keyword(ephemeral_env):
            pass

        def test_sync_test_asks_for_the_async_fixture(async_ephemeral_env):
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=3)
    result.stdout.fnmatch_lines([
        "gestvenv: unknown isolation level 'nonsense'; allowed: *",
        "gestvenv: @pytest.mark.gestvenv: unknown keyword 'memory'; valid ones: packages, *",
        "*is not async: async_ephemeral_env is for async tests, as an argument of the test*",
    ])
    assert len(envs_seen(seen)) == 2
    nothing_left()


def test_trio_backend_is_skipped_with_the_reason(pytester: pytest.Pytester) -> None:
    pytest.importorskip("trio")
    pytester.makepyfile(test_trio="""
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "trio"

        @pytest.mark.anyio
        async def test_trio(async_ephemeral_env):
            pass
    """)
    result = run(pytester, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*async_ephemeral_env runs on asyncio only*not on this backend"])
    nothing_left()


# The README's and the fixture, verbatim: with @pytest.fixture (not pytest_asyncio's
# decorator), which pytest-asyncio runs in its auto mode.
PRODUCT_FIXTURE = '''\
@pytest.fixture
async def test_env():
    async with gestvenv.ephemeral("pytest") as env:
        await env.install(["pytest", "pytest-asyncio"])
        yield env
'''


def test_the_products_fixture_example_verbatim(pytester: pytest.Pytester, seen: Path) -> None:
    guide = (Path(__file__).parents[2] / "docs" / "ephemeral-environments.md").read_text()
    assert PRODUCT_FIXTURE in guide, "the guide shows the fixture as it is tested here"
    pytester.makepyfile(test_product="import pytest\nimport gestvenv\nfrom record import record"
                        "\n\n\n" + PRODUCT_FIXTURE + textwrap.dedent("""

        async def test_with_it(test_env):
            done = await test_env.execute(["python", "-c",
                                           "import pytest, pytest_asyncio; print('both')"])
            assert done.stdout.strip() == "both"
            record(test_env)
    """))
    result = run(pytester, "-o", "asyncio_mode=auto")
    result.assert_outcomes(passed=1)
    [env] = envs_seen(seen)
    assert env["name"] == "pytest"
    assert not Path(env["path"]).exists()
    nothing_left()


def test_the_plugin_is_registered_by_its_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True,
                          text=True, cwd="/", timeout=120, check=False,
                          env={**os.environ, "PYTEST_ADDOPTS": ""})
    assert "--gestvenv-keep-failed" in done.stdout
    assert "gestvenv_packages" in done.stdout


def test_after_the_async_fixture_ctrl_c_is_pytests_again(pytester: pytest.Pytester,
                                                        seen: Path) -> None:
    """The fixture's setup and teardown are two runs of pytest-asyncio's loop: no SIGINT
    handler of the first may stay installed for the later tests."""
    pytester.makepyfile(test_sigint="""
        import signal
        import pytest
        from record import record

        @pytest.mark.asyncio
        async def test_uses_it(async_ephemeral_env):
            record(async_ephemeral_env)

        def test_later():
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        @pytest.mark.asyncio
        async def test_later_async():
            pass
    """)
    run(pytester).assert_outcomes(passed=3)
    nothing_left()


def test_keep_failed_under_xdist_reports_from_the_workers_and_has_a_maximum(
        pytester: pytest.Pytester, seen: Path) -> None:
    pytest.importorskip("xdist")
    pytester.makeini("""
        [pytest]
        gestvenv_keep_max = 2
        gestvenv_ttl = 120
    """)
    pytester.makepyfile(test_many="""
        import pytest
        from record import record

        @pytest.mark.parametrize("i", range(3))
        def test_fails(ephemeral_env, i):
            record(ephemeral_env)
            assert False
    """)
    result = run(pytester, "-n", "2", "--gestvenv-keep-failed")
    result.assert_outcomes(failed=3)
    envs = envs_seen(seen)
    try:
        kept = env_names()
        assert 2 <= len(kept) <= 3  # at most 2 per process: each of the 2 workers kept some
        result.stdout.fnmatch_lines(["*gestvenv: environments kept for inspection*"])
        reported = [line for line in result.stdout.lines
                    if ", kept until " in line and "(its TTL)" in line]
        assert {n for n in kept if any(f"'{n}'" in line for line in reported)} == kept
    finally:
        for env in envs:
            subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "cleanup",
                            env["name"]], capture_output=True, timeout=120, check=False)
    nothing_left()


def test_keep_max_destroys_beyond_it_and_says_so(pytester: pytest.Pytester,
                                                 seen: Path) -> None:
    pytester.makeini("""
        [pytest]
        gestvenv_keep_max = 1
        gestvenv_ttl = 120
    """)
    pytester.makepyfile(test_two="""
        from record import record

        def test_a(ephemeral_env):
            record(ephemeral_env)
            assert False

        def test_b(ephemeral_env):
            record(ephemeral_env)
            assert False
    """)
    result = run(pytester, "--gestvenv-keep-failed")
    result.assert_outcomes(failed=2)
    first, second = envs_seen(seen)
    try:
        assert env_names() == {first["name"]}
        assert not Path(second["path"]).exists()
        result.stdout.fnmatch_lines(["*test_b: not kept: 1 environments kept already "
                                     "(gestvenv_keep_max = 1)"])
    finally:
        subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "cleanup",
                        first["name"]], capture_output=True, timeout=120, check=False)
    nothing_left()


def test_a_creation_that_fails_is_one_clear_line_and_leaves_nothing(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bad="""
        import pytest

        @pytest.mark.gestvenv(packages=["no-such-package-anywhere"])
        def test_it(ephemeral_env):
            pass

        @pytest.mark.asyncio
        @pytest.mark.gestvenv(runtime="bogus")
        async def test_async(async_ephemeral_env):
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "gestvenv: the test's environment could not be created: *no-such-package-anywhere*",
        "gestvenv: the test's environment could not be created: unknown runtime 'bogus'*",
    ])
    result.stdout.no_fnmatch_line("*pytest_plugin.py*")  # no traceback into the plugin
    nothing_left()


def test_a_requirements_path_is_the_projects_from_any_dir(pytester: pytest.Pytester) -> None:
    pytester.makefile(".txt", requirements="six\n")
    pytester.makeini("[pytest]\n")
    pytester.mkdir("tests")
    (pytester.path / "tests" / "test_req.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gestvenv(requirements="requirements.txt")
        def test_it(ephemeral_env):
            assert ephemeral_env.execute(["python", "-c", "import six"]).ok
    """))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           "test_req.py"], cwd=pytester.path / "tests", capture_output=True,
                          text=True, timeout=600, check=False)
    print(done.stdout[-3000:])
    assert done.returncode == 0
    nothing_left()
