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
import inspect
import re
import secrets
import time
import types
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

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
_NAME_ROOM = 64 - len("pytest--") - 4
_outcomes = pytest.StashKey[dict[str, pytest.TestReport]]()
_kept = pytest.StashKey[list[str]]()
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
    module) over the ini options. Limits given one by one (``max_memory=...``) refine the
    ``limits`` they are given with, or the ini's."""
    chosen: dict[str, Any] = dict(ini)
    single: dict[str, Any] = {}
    for marker in reversed(markers):  # farthest first, so that the closest wins
        for key, value in marker.items():
            if key in LIMIT_FIELDS:
                single[key] = value
            elif key in KEYWORDS:
                chosen[key] = value
            else:
                valid = ", ".join([*KEYWORDS, *LIMIT_FIELDS])
                raise ValidationError(f"@pytest.mark.gestvenv: unknown keyword {key!r}; valid "
                                      f"ones: {valid}")
    limits = chosen.get("limits")
    if isinstance(limits, Mapping):
        limits = ResourceLimits(**limits)
    if limits is not None and not isinstance(limits, ResourceLimits):
        raise ValidationError("@pytest.mark.gestvenv: limits must be a ResourceLimits or a dict "
                              f"of its fields, not {limits!r}")
    if single:
        base = (limits or ResourceLimits()).to_dict()
        limits = ResourceLimits(**{**base, **single})
    if limits is not None:
        chosen["limits"] = limits
    if isinstance(chosen.get("packages"), str):
        chosen["packages"] = [chosen["packages"]]
    return {KEYWORDS[key]: value for key, value in chosen.items()}


def env_name(test_name: str) -> str:
    """``pytest-<the test's name, made a valid env name>-<4 hex>``: unique per run, and
    readable in ``gestvenv ephemeral list`` and ``systemctl``."""
    readable = _UNSAFE.sub("-", test_name).strip("-.")[:_NAME_ROOM].rstrip("-.") or "test"
    return f"pytest-{readable}-{secrets.token_hex(2)}"


# --- pytest's side ---

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gestvenv", "gestvenv: an ephemeral environment per test")
    group.addoption(KEEP_OPTION, action="store_true", default=False,
                    help="keep the environment of a failed test for inspection (until its "
                         "TTL); the report names it")
    for option, (_, kind, text) in INI.items():
        parser.addini(option, text, type=kind)  # type: ignore[arg-type]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gestvenv(packages=..., isolation=..., limits=..., max_memory=..., ...): "
        "what the test's ephemeral_env / async_ephemeral_env is (see docs/ephemeral-"
        "environments.md)")
    config.stash[_kept] = []


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
        item: pytest.Item,
        call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    item.stash.setdefault(_outcomes, {})[report.when] = report
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    kept = config.stash.get(_kept, [])
    if kept:
        terminalreporter.section("gestvenv: environments kept for inspection")
        for line in kept:
            terminalreporter.line(line)


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The test's ``ephemeral()`` keywords; a bad marker or ini option fails its setup with
    the reason, without a traceback into the plugin."""
    try:
        return _resolve(request)
    except ValidationError as exc:
        reason = str(exc)
    pytest.fail(f"gestvenv: {reason}", pytrace=False)  # (outside the except: no chain shown)


def _resolve(request: pytest.FixtureRequest) -> dict[str, Any]:
    config = request.config
    ini = from_ini({option: config.getini(option) for option in INI})
    if "requirements" in ini:  # the ini's path is the project's: relative to its rootdir
        ini["requirements"] = str(config.rootpath / ini["requirements"])
    markers = []
    for mark in request.node.iter_markers(MARKER):
        if mark.args:
            raise ValidationError("@pytest.mark.gestvenv takes keywords only, not "
                                  f"{mark.args!r}")
        markers.append(dict(mark.kwargs))
    return merge(ini, markers)


def _checked(make: Callable[..., T], request: pytest.FixtureRequest) -> T:
    """``make(name, **options)`` (``ephemeral`` or ``ephemeral_sync``): what they refuse
    before anything exists (a bad isolation level, limit...) fails the setup with the reason."""
    options = _options(request)
    try:
        return make(env_name(request.node.name), **options)
    except ValidationError as exc:
        reason = str(exc)
    pytest.fail(f"gestvenv: {reason}", pytrace=False)


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_outcomes, {})
    return any(report.failed for report in reports.values())


def _keep_wanted(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption(KEEP_OPTION)) and _failed(request)


def _kept_line(request: pytest.FixtureRequest, env: Environment | SyncEnvironment) -> str:
    until = time.strftime("%H:%M:%S", time.localtime(env.expires_at)) if env.expires_at else "?"
    line = (f"{request.node.nodeid}: environment {env.name!r} at {env.path}, kept until "
            f"{until} (its TTL); inspect: gestvenv ephemeral show {env.name}; remove: "
            f"gestvenv ephemeral cleanup {env.name}")
    request.config.stash[_kept].append(line)
    return line


def _not_kept(request: pytest.FixtureRequest, exc: GestvenvError) -> None:
    request.config.stash[_kept].append(f"{request.node.nodeid}: not kept: {exc}")


@pytest.fixture
def ephemeral_env(request: pytest.FixtureRequest) -> Iterator[SyncEnvironment]:
    """A fresh environment for this test (blocking API), destroyed after it."""
    with _checked(ephemeral_sync, request) as env:
        yield env
        if _keep_wanted(request):
            try:
                env.keep()
            except GestvenvError as exc:
                _not_kept(request, exc)
            else:
                _kept_line(request, env)


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
    async with _checked(ephemeral, request) as env:
        yield env
        if _keep_wanted(request):
            try:
                await env.keep()
            except GestvenvError as exc:
                _not_kept(request, exc)
            else:
                _kept_line(request, env)


# --- who runs the async fixture ---
# anyio's plugin runs every async fixture of a test that has its anyio_backend. pytest-asyncio,
# in its default strict mode, runs only the fixtures marked with its decorator (and warns about
# the others). So the fixture registered is a twin of the implementation that pytest-asyncio's
# decorator marked, and for each setup (pytest_fixture_setup below) the runner of the test gets
# its own twin: anyio the unmarked implementation, pytest-asyncio one marked for the loop scope
# of the test, so that the environment is made and used in the test's own loop.

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


@dataclass
class _Twins:
    made: dict[str, Callable[..., Any]]

    def for_scope(self, scope: str) -> Callable[..., Any]:
        if scope not in self.made:
            self.made[scope] = _twin(scope)
        return self.made[scope]


_twins = _Twins({})
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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any],
                         request: pytest.FixtureRequest) -> Generator[None, object, object]:
    if not _ours(fixturedef):
        return (yield)
    function = getattr(request.node, "obj", None)
    replacement: Callable[..., Any]
    if "anyio_backend" in request.fixturenames:
        replacement = _async_ephemeral_env
    elif function is not None and not inspect.iscoroutinefunction(function):
        replacement = _refuse(f"{request.node.nodeid} is not async: async_ephemeral_env is for "
                              "async tests; use ephemeral_env (the blocking API)")
    elif request.config.pluginmanager.has_plugin("asyncio"):
        replacement = _twins.for_scope(_asyncio_loop_scope(request))
    else:
        replacement = _refuse("async_ephemeral_env needs an async test runner: pytest-asyncio "
                              "(@pytest.mark.asyncio) or anyio's plugin (@pytest.mark.anyio)")
    original = fixturedef.func
    fixturedef.func = replacement  # type: ignore[misc]
    try:
        return (yield)
    finally:
        fixturedef.func = original  # type: ignore[misc]
