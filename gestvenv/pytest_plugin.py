"""The pytest plugin: a fresh environment for each test that asks for one.

Loaded by pytest through the ``pytest11`` entry point once gestvenv is installed (``-p
no:gestvenv`` turns it off). Two fixtures: ``ephemeral_env`` (a :class:`SyncEnvironment`) and
``async_ephemeral_env`` (an :class:`Environment`, created in the test's own event loop, under
pytest-asyncio or anyio's plugin). What the environment is comes from, by precedence: the
closest ``@pytest.mark.gestvenv(...)``, the ``gestvenv_*`` ini options, gestvenv's own
configuration. ``--gestvenv-keep-failed`` keeps a failed test's environment (until its TTL).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import re
import secrets
import time
import types
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any, NoReturn, TypeVar

import pytest

from .context import Environment, ephemeral
from .exceptions import GestvenvError, ValidationError
from .models import ResourceLimits
from .sync import SyncEnvironment, ephemeral_sync

MARKER = "gestvenv"
KEEP_OPTION = "--gestvenv-keep-failed"
LIMIT_FIELDS: dict[str, type] = {f.name: f.type if isinstance(f.type, type) else object
                                 for f in fields(ResourceLimits)}
# The marker's keywords and the ephemeral() argument each one is.
KEYWORDS: dict[str, str] = {
    "packages": "packages", "requirements": "requirements", "python": "python",
    "isolation": "isolation_level", "storage": "storage_backend", "ttl": "ttl",
    "idle_timeout": "idle_timeout", "runtime": "runtime", "allow_unenforced": "allow_unenforced",
    "env": "env", "limits": "resource_limits",
}
# ini option -> (marker keyword, how its text is read)
INI: dict[str, tuple[str, str, str]] = {
    "gestvenv_packages": ("packages", "linelist", "packages of each test's environment, one "
                          "spec per line"),
    "gestvenv_requirements": ("requirements", "string", "a requirements file for each test's "
                              "environment (relative to the rootdir)"),
    "gestvenv_python": ("python", "string", "interpreter of each test's environment"),
    "gestvenv_isolation": ("isolation", "string", "isolation level: process, namespace, "
                           "container or chroot"),
    "gestvenv_storage": ("storage", "string", "storage backend: disk, tmpfs or memory"),
    "gestvenv_ttl": ("ttl", "string", "seconds each test's environment lives at most (what "
                     "bounds one kept by --gestvenv-keep-failed)"),
    "gestvenv_runtime": ("runtime", "string", "runtime: auto, systemd or local"),
    "gestvenv_limits": ("limits", "args", "resource limits, e.g. max_memory=512 "
                        "max_processes=64 network_access=false"),
}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_NAME_ROOM = 64 - len("pytest--") - 8
KEEP_MAX = "gestvenv_keep_max"
KEEP_MAX_DEFAULT = 5
NOTE = "gestvenv"  # the user property of a teardown report that carries a kept env's note
_outcomes = pytest.StashKey[dict[str, pytest.TestReport]]()
_note = pytest.StashKey[str]()
_kept_count = pytest.StashKey[int]()
T = TypeVar("T")


# --- what the environment is (pure: unit-tested without pytest's machinery) ---

def parse_limits(words: list[str]) -> ResourceLimits:
    """``["max_memory=512", "network_access=false"]`` (the ini option) as ResourceLimits."""
    values: dict[str, Any] = {}
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or key not in LIMIT_FIELDS:
            raise ValidationError(
                f"gestvenv_limits: {word!r} is not KEY=VALUE with KEY one of "
                f"{', '.join(LIMIT_FIELDS)}")
        if key == "network_access":
            if raw.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValidationError(f"gestvenv_limits: network_access={raw!r}: true or false")
            values[key] = raw.lower() in ("true", "yes", "1")
            continue
        try:
            values[key] = float(raw) if key == "max_cpu_percent" else int(raw)
        except ValueError:
            raise ValidationError(f"gestvenv_limits: {key}={raw!r} is not a number") from None
    return ResourceLimits(**values)


def from_ini(ini: Mapping[str, Any]) -> dict[str, Any]:
    """The marker keywords the ini options give (only those set)."""
    out: dict[str, Any] = {}
    for option, (keyword, _, _) in INI.items():
        value = ini.get(option)
        if not value:
            continue
        if keyword == "limits":
            out[keyword] = parse_limits(list(value))
        elif keyword == "ttl":
            try:
                out[keyword] = int(value)
            except ValueError:
                raise ValidationError(f"gestvenv_ttl: {value!r} is not a number of "
                                      "seconds") from None
        else:
            out[keyword] = value
    return out


def merge(ini: Mapping[str, Any], markers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``ephemeral()`` keywords for a test: its markers (closest first: function, class,
    module) over the ini options, keyword by keyword. ``limits=`` replaces the limits from
    farther away (the ini's too); a single limit (``max_memory=...``) changes that one field
    of the limits from farther away or of its own marker's ``limits``."""
    chosen: dict[str, Any] = {k: v for k, v in ini.items() if k != "limits"}
    limits: dict[str, Any] | None = _limit_fields(ini["limits"]) if "limits" in ini else None
    for marker in reversed(markers):  # farthest first, so that the closest wins
        unknown = [key for key in marker if key not in KEYWORDS and key not in LIMIT_FIELDS]
        if unknown:
            valid = ", ".join([*KEYWORDS, *LIMIT_FIELDS])
            raise ValidationError(f"@pytest.mark.gestvenv: unknown keyword {unknown[0]!r}; "
                                  f"valid ones: {valid}")
        if "limits" in marker:
            limits = _limit_fields(marker["limits"])
        singles = {key: value for key, value in marker.items() if key in LIMIT_FIELDS}
        if singles:
            limits = {**(limits or {}), **singles}
        chosen.update({k: v for k, v in marker.items() if k in KEYWORDS and k != "limits"})
    if limits is not None:
        chosen["limits"] = ResourceLimits(**limits)  # (its own checks: a ValidationError)
    packages = chosen.get("packages")
    if isinstance(packages, str):
        chosen["packages"] = [packages]
    elif packages is not None and not (isinstance(packages, list | tuple)
                                       and all(isinstance(p, str) for p in packages)):
        raise ValidationError(f"@pytest.mark.gestvenv: packages must be a list of specs, not "
                              f"{packages!r}")
    return {KEYWORDS[key]: value for key, value in chosen.items()}


def _limit_fields(limits: object) -> dict[str, Any]:
    if isinstance(limits, ResourceLimits):
        return limits.to_dict()
    if isinstance(limits, Mapping):
        unknown = [key for key in limits if key not in LIMIT_FIELDS]
        if unknown:
            raise ValidationError(f"@pytest.mark.gestvenv: limits: unknown field "
                                  f"{unknown[0]!r}; fields: {', '.join(LIMIT_FIELDS)}")
        return dict(limits)
    raise ValidationError("@pytest.mark.gestvenv: limits must be a ResourceLimits or a dict of "
                          f"its fields, not {limits!r}")


def env_name(test_name: str) -> str:
    """``pytest-<the test's name, made a valid env name>-<8 hex>``: unique (32 random bits, as
    generated names), and readable in ``gestvenv ephemeral list`` and ``systemctl``."""
    readable = _UNSAFE.sub("-", test_name).strip("-.")[:_NAME_ROOM].rstrip("-.") or "test"
    return f"pytest-{readable}-{secrets.token_hex(4)}"


def kept_line(nodeid: str, name: str, path: str, expires_at: float | None,
              idle_timeout: int) -> str:
    """The report's line about a kept environment: where it is, until when, how to reach it."""
    ends = []
    if expires_at:
        ends.append(f"until {time.strftime('%H:%M:%S', time.localtime(expires_at))} (its TTL)")
    if idle_timeout:
        ends.append(f"until idle for {idle_timeout}s")
    return (f"{nodeid}: environment {name!r} at {path}, kept {' or '.join(ends)}; inspect: "
            f"gestvenv ephemeral show {name}; remove: gestvenv ephemeral cleanup {name}")


# --- pytest's side ---

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gestvenv", "gestvenv: an ephemeral environment per test")
    group.addoption(KEEP_OPTION, action="store_true", default=False,
                    help="keep the environment of a failed test for inspection (until its "
                         "TTL), at most gestvenv_keep_max of them; the report names them")
    for option, (_, kind, text) in INI.items():
        parser.addini(option, text, type=kind)  # type: ignore[arg-type]
    parser.addini(KEEP_MAX, "environments --gestvenv-keep-failed keeps at most, per pytest "
                  f"process (each xdist worker): beyond, they are destroyed (default "
                  f"{KEEP_MAX_DEFAULT})", default=str(KEEP_MAX_DEFAULT))


class _Summary:
    """Collects the notes about kept environments from the reports (under xdist they come from
    the workers), and prints them at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.lines += [str(value) for key, value in report.user_properties if key == NOTE]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.lines:
            terminalreporter.section("gestvenv: environments kept for inspection")
            for line in self.lines:
                terminalreporter.line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gestvenv(packages=..., isolation=..., limits=..., max_memory=..., ...): "
        "what the test's ephemeral_env / async_ephemeral_env is (see docs/ephemeral-"
        "environments.md)")
    config.stash[_kept_count] = 0
    config.pluginmanager.register(_Summary(), "gestvenv-summary")


# Old-style hook wrappers (hookwrapper=True): the new style needs pluggy >= 1.1, and Debian
# 12's pytest 7.2 has pluggy 1.0 (every pytest run of a system with the package loads this).
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    item.stash.setdefault(_outcomes, {})[report.when] = report
    if report.when == "teardown" and (note := item.stash.get(_note, None)):
        report.user_properties.append((NOTE, note))  # (xdist carries it to the controller)


def _fail(reason: str) -> NoReturn:
    pytest.fail(f"gestvenv: {reason}", pytrace=False)


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The test's ``ephemeral()`` keywords; a bad marker or ini option fails its setup with
    the reason, without a traceback into the plugin."""
    try:
        return _resolve(request)
    except ValidationError as exc:
        reason = str(exc)
    _fail(reason)  # (outside the except: no chained traceback shown)


def _resolve(request: pytest.FixtureRequest) -> dict[str, Any]:
    config = request.config
    ini = from_ini({option: config.getini(option) for option in INI})
    markers = []
    for mark in request.node.iter_markers(MARKER):
        if mark.args:
            raise ValidationError("@pytest.mark.gestvenv takes keywords only, not "
                                  f"{mark.args!r}")
        markers.append(dict(mark.kwargs))
    options = merge(ini, markers)
    requirements = options.get("requirements")
    if isinstance(requirements, str | os.PathLike) and not os.path.isabs(requirements):
        # The marker's and the ini's paths are the project's: relative to its rootdir.
        options["requirements"] = str(config.rootpath / requirements)
    return options


def _context(make: Callable[..., T], request: pytest.FixtureRequest) -> T:
    """``make(name, **options)`` (``ephemeral`` or ``ephemeral_sync``): what they refuse
    before anything exists (a bad isolation level, limit...) fails the setup with the reason."""
    options = _options(request)
    try:
        return make(env_name(request.node.name), **options)
    except ValidationError as exc:
        reason = str(exc)
    _fail(reason)


def _not_created(exc: GestvenvError) -> NoReturn:
    _fail(f"the test's environment could not be created: {exc}")


def _keep_wanted(request: pytest.FixtureRequest) -> bool:
    if not request.config.getoption(KEEP_OPTION):
        return False
    reports = request.node.stash.get(_outcomes, {})
    return any(report.failed for report in reports.values())


def _keep_max(config: pytest.Config) -> int:
    try:
        return max(0, int(config.getini(KEEP_MAX)))
    except ValueError:
        _fail(f"{KEEP_MAX} must be a number, not {config.getini(KEEP_MAX)!r}")


def _room_to_keep(request: pytest.FixtureRequest) -> bool:
    """Within gestvenv_keep_max (kept envs count against max_concurrent until their TTL)."""
    kept, most = request.config.stash[_kept_count], _keep_max(request.config)
    if kept >= most:
        request.node.stash[_note] = (f"{request.node.nodeid}: not kept: {kept} environments "
                                     f"kept already ({KEEP_MAX} = {most})")
        return False
    return True


def _kept(request: pytest.FixtureRequest, env: Environment | SyncEnvironment) -> None:
    info = env.info()
    request.config.stash[_kept_count] += 1
    request.node.stash[_note] = kept_line(request.node.nodeid, env.name, str(env.path),
                                          env.expires_at, int(info.get("idle_timeout") or 0))


def _not_kept(request: pytest.FixtureRequest, exc: GestvenvError) -> None:
    request.node.stash[_note] = f"{request.node.nodeid}: not kept: {exc}"


@pytest.fixture
def ephemeral_env(request: pytest.FixtureRequest) -> Iterator[SyncEnvironment]:
    """A fresh environment for this test (blocking API), destroyed after it."""
    context = _context(ephemeral_sync, request)
    failure: GestvenvError | None = None
    try:
        env = context.__enter__()
    except GestvenvError as exc:  # failed (after its undo): the reason, not a traceback
        failure = exc
    if failure is not None:
        _not_created(failure)
    try:
        yield env
        if _keep_wanted(request) and _room_to_keep(request):
            try:
                env.keep()
            except GestvenvError as exc:
                _not_kept(request, exc)
            else:
                _kept(request, env)
    finally:
        context.__exit__(None, None, None)


async def _async_ephemeral_env(request: pytest.FixtureRequest) -> AsyncIterator[Environment]:
    """A fresh environment for this async test, created in its event loop, destroyed after it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        on_asyncio = False
    else:
        on_asyncio = True
    if not on_asyncio:  # anyio runs a test on every backend installed: trio's run is skipped
        pytest.skip("async_ephemeral_env runs on asyncio only (gestvenv's API is asyncio's): "
                    "not on this backend")
    context = _context(ephemeral, request)
    # pytest-asyncio runs this setup and its teardown in two runs of its loop: Ctrl-C is
    # pytest's to handle (the teardown still runs, shielded), not a handler of the first run's.
    context._hold_interrupts = False
    failure: GestvenvError | None = None
    try:
        env = await context.__aenter__()
    except GestvenvError as exc:  # failed (after its undo): the reason, not a traceback
        failure = exc
    if failure is not None:
        _not_created(failure)
    try:
        yield env
        if _keep_wanted(request) and _room_to_keep(request):
            try:
                await env.keep()
            except GestvenvError as exc:
                _not_kept(request, exc)
            else:
                _kept(request, env)
    finally:
        await context.__aexit__(None, None, None)


# --- who runs the async fixture ---
# anyio's plugin runs every async fixture of a test that has its anyio_backend. pytest-asyncio,
# in its default strict mode, runs only the fixtures marked with its decorator (and warns about
# the others). So the fixture registered is a twin of the implementation that pytest-asyncio's
# decorator marked, and for each setup (pytest_fixture_setup below) the runner of the test gets
# its own twin: anyio the unmarked implementation, pytest-asyncio one marked for the loop scope
# of the test, so that the environment is made and used in the test's own loop.

@functools.cache  # one twin per loop scope
def _twin(loop_scope: str | None) -> Callable[..., Any]:
    """A copy of the implementation, marked by pytest-asyncio's public decorator when it is
    installed (``pytest_asyncio.fixture`` marks the function it is given)."""
    impl = _async_ephemeral_env
    twin = types.FunctionType(impl.__code__, impl.__globals__, impl.__name__,
                              impl.__defaults__, impl.__closure__)
    twin.__doc__, twin.__qualname__ = impl.__doc__, impl.__qualname__
    try:
        import pytest_asyncio
    except ImportError:
        return twin
    pytest_asyncio.fixture(twin, loop_scope=loop_scope)  # type: ignore[arg-type]
    return twin


_registered = _twin(None)
async_ephemeral_env = pytest.fixture(_registered, name="async_ephemeral_env")


def _asyncio_loop_scope(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker("asyncio")
    if marker is not None:
        scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
        if scope:
            return str(scope)
    try:
        return str(request.config.getini("asyncio_default_test_loop_scope") or "function")
    except ValueError:  # a pytest-asyncio without that option
        return "function"


def _refuse(message: str) -> Callable[..., Any]:
    def refused(request: pytest.FixtureRequest) -> None:
        pytest.fail(message, pytrace=False)
    return refused


def _ours(fixturedef: pytest.FixtureDef[Any]) -> bool:
    return getattr(fixturedef.func, "__wrapped__", fixturedef.func) is _registered


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any],
                         request: pytest.FixtureRequest) -> Generator[None, Any, None]:
    if not _ours(fixturedef):
        yield
        return
    function = getattr(request.node, "obj", None)
    replacement: Callable[..., Any]
    if "anyio_backend" in request.fixturenames:
        replacement = _async_ephemeral_env
    elif function is not None and not inspect.iscoroutinefunction(function):
        # (Also what a request.getfixturevalue() from a running async test looks like: the
        # test runs in a sync wrapper then, and no loop could be entered from there anyway.)
        replacement = _refuse(f"{request.node.nodeid} is not async: async_ephemeral_env is for "
                              "async tests, as an argument of the test or of an async fixture "
                              "(not request.getfixturevalue()); use ephemeral_env (the "
                              "blocking API)")
    elif request.config.pluginmanager.has_plugin("asyncio"):
        replacement = _twin(_asyncio_loop_scope(request))
    else:
        replacement = _refuse("async_ephemeral_env needs an async test runner: pytest-asyncio "
                              "(@pytest.mark.asyncio) or anyio's plugin (@pytest.mark.anyio)")
    original = fixturedef.func
    fixturedef.func = replacement  # type: ignore[misc]
    try:
        yield
    finally:
        fixturedef.func = original  # type: ignore[misc]
