"""Building environments: uv when present, else pip (:class:`VenvPipBuilder`).

With uv, the virtualenv itself is written here (``pyvenv.cfg``, three links to the interpreter,
an empty site-packages: no process), then one ``uv pip install --link-mode copy`` fills it from
the shared cache, and what it added is kept as a snapshot of that package set (templates.py):
the next environment asking for the same set is a clone of it (reflinks where the filesystem
has them, else copies), with no uv process at all. Never hardlinks: nothing an environment
writes may reach the cache, a snapshot or another environment.
Measured by benchmarks/bench_create.py on the development machine (create + install + run +
destroy, tiny wheels, medians, copies): 46 ms, against 52 ms for ``uv run --isolated --with``
(which reuses one cached environment), 2.7 s for virtualenv + pip and 6.3 s for
``python -m venv`` + pip; what copies cost for real packages is in benchmarks/README.md.
Without uv (Debian has none), the venv is written the same way and one pip, the system's,
fills it, with the same snapshots: in-process, a first env (three tiny wheels) in 0.6-0.7 s
where ``python -m venv`` + pip took 6.2 s, and a clone in 20-35 ms, as uv's (side by side).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import progress
from .config import Config
from .exceptions import BuildError, ValidationError
from .inside import InsideInstaller, stage_inputs, unstage
from .models import ExecResult
from .runtime.processes import ENV_MARKER
from .shield import in_thread
from .storage import templates_dir, uv_cache_dir
from .templates import (
    PRIVATE_DIR,
    TemplateCache,
    installer_part,
    retarget,
    snapshot_baseline,
    snapshottable,
    template_key,
    walk,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Interpreter:
    """A base interpreter, by its real path (never a venv's python or a shim)."""

    path: str
    version: str  # "3.11.7"

    @property
    def short_version(self) -> str:
        return ".".join(self.version.split(".")[:2])


_QUERY = ("import sys, os; print(sys.version.split()[0]); "
          "print(os.path.realpath(sys._base_executable))")


@functools.lru_cache(maxsize=16)
def find_interpreter(spec: str | None = None) -> Interpreter:
    """Resolve ``spec`` (None: the running interpreter; a path; or a version like "3.12") once.

    A version is looked for as ``python<version>`` in every dir of PATH, then by uv (without
    downloads): the first candidate that runs and is that version wins, so a shim that cannot
    run it (pyenv's, for a version not selected) does not hide a real one further on."""
    if spec is None:
        base = getattr(sys, "_base_executable", sys.executable)
        return Interpreter(os.path.realpath(base), sys.version.split()[0])
    if os.sep in spec:
        if not os.access(spec, os.X_OK):
            raise ValidationError(f"python {spec!r}: {spec} is not an executable")
        found = _query(spec)
        if isinstance(found, str):
            raise ValidationError(f"python {spec!r}: {spec} does not run: {found}")
        return found
    name = spec if spec.startswith("python") else f"python{spec}"
    wanted = name.removeprefix("python")
    tried: list[str] = []
    for candidate in _on_path(name) + [c for c in [_uv_find_python(spec)] if c]:
        found = _query(candidate)
        if isinstance(found, str):
            tried.append(f"{candidate} does not run ({found})")
        elif wanted and not _is_version(found.version, wanted):
            tried.append(f"{candidate} is Python {found.version}")
        else:
            return found
    if not tried:
        raise ValidationError(f"no Python interpreter found for {spec!r}")
    raise ValidationError(f"no usable Python interpreter for {spec!r}: " + "; ".join(tried))


def _on_path(name: str) -> list[str]:
    """Every executable ``name`` on PATH, in PATH's order (``shutil.which`` gives the first)."""
    found: list[str] = []
    for directory in os.get_exec_path():
        path = os.path.join(directory or ".", name)
        if path not in found and os.path.isfile(path) and os.access(path, os.X_OK):
            found.append(path)
    return found


def _is_version(version: str, wanted: str) -> bool:
    """``3.12.1`` is "3.12" and "3"; "3.1" is not "3.12"."""
    return version == wanted or version.startswith(f"{wanted}.")


def _query(candidate: str) -> Interpreter | str:
    """The interpreter ``candidate`` is, or why it does not run."""
    try:
        done = subprocess.run([candidate, "-I", "-c", _QUERY], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    out = done.stdout.split("\n")
    if done.returncode != 0 or len(out) < 2:
        return f"exit status {done.returncode}"
    return Interpreter(out[1], out[0])


def _uv_find_python(spec: str) -> str | None:
    uv = find_uv()
    if uv is None:
        return None
    proc = subprocess.run([uv, "python", "find", "--no-project", spec], capture_output=True,
                          text=True, env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"})
    return proc.stdout.strip() or None if proc.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def find_uv() -> str | None:
    """uv from the ``uv`` package installed beside gestvenv, else from PATH."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def site_packages(env_path: Path, interpreter: Interpreter) -> Path:
    return env_path / "lib" / f"python{interpreter.short_version}" / "site-packages"


class Builder:
    """Creates a virtualenv and installs packages into it."""

    name = "abstract"

    def __init__(self, config: Config, env_id: str | None = None,
                 inside: InsideInstaller | None = None) -> None:
        self.config = config
        self.marker = {ENV_MARKER: env_id} if env_id else {}
        # Where package code runs: a command of the env (gestvenv.inside). None: here, in the
        # creator's process (only for callers that build no env of gestvenv's).
        self.inside = inside
        self.built_inside = False  # an install had to build inside: its files are the build's
        # The env's commands run under a uid of their own and cannot write root's read-only
        # files: installed files may be hardlinks of the cache's and the snapshots' (link_mode).
        self.share_read_only = False
        # Process isolation, root creator: a snapshot's site-packages are mounted as an
        # overlay's lower layer instead of copied (overlay.chosen).
        self.overlay = False
        # The package set's snapshot the env was populated from or stored to: (key, its dir).
        self.template: tuple[str, Path] | None = None
        self.templates = TemplateCache(templates_dir(config), config.template_ttl,
                                       reflink=config.link_mode != "copy")

    async def create(self, env_path: Path, interpreter: Interpreter) -> None:
        raise NotImplementedError

    async def install(self, env_path: Path, interpreter: Interpreter, packages: Sequence[str],
                      requirements: Sequence[Path] = ()) -> None:
        raise NotImplementedError

    async def populate(self, env_path: Path, interpreter: Interpreter, packages: Sequence[str],
                       requirements: Sequence[Path] = ()) -> None:
        """The first install, at creation: a clone of the package set's snapshot when there is
        one, else a real install, whose result becomes the snapshot (templates.py)."""
        if not packages and not requirements:
            return
        if not await in_thread(snapshottable, packages, requirements):
            # Local paths, URLs, options: what they install is not in any key; resolve anew.
            await self.install(env_path, interpreter, packages, requirements)
            return
        key = template_key(
            interpreter=interpreter.path, version=interpreter.version,
            installer=self.installer_key(), packages=packages, requirements=requirements,
            settings={"find_links": list(self.config.find_links),
                      "index_url": self.config.index_url, "offline": self.config.offline,
                      "compile": self.config.compile_bytecode})
        template = await in_thread(self.templates.lookup, key)
        baseline = await in_thread(snapshot_baseline, env_path)
        if template is not None:
            if progress.current() is not None:
                progress.step(_cloning(await in_thread(self.templates.contents, template)))
            try:
                await in_thread(functools.partial(self.templates.clone, template, env_path,
                                                  share_read_only=self.share_read_only,
                                                  overlay=self.overlay))
                self.template = (key, template)
                return
            except OSError as exc:  # a pruned or damaged snapshot: install for real
                log.debug("snapshot %s unusable (%s); installing", template, exc)
                await in_thread(remove_added, env_path, baseline)
        await self.install(env_path, interpreter, packages, requirements)
        if not self.built_inside:
            # (What a build inside wrote is the env's code, not the installer's: never
            # snapshotted.)
            if self.templates.max_age > 0:
                progress.step("saving a snapshot of the package set, for the next environments")
            await in_thread(self.templates.store, key, env_path, baseline)
            stored = await in_thread(self.templates.lookup, key)
            self.template = (key, stored) if stored is not None else None

    def installer_key(self) -> dict[str, object]:
        """The installer's part of a snapshot's key (templates.installer_part)."""
        raise NotImplementedError

    def tools(self) -> list[str]:
        """Host paths the env's commands need (its pip), to expose in a sandbox or bind into
        a container."""
        return []

    async def _run_inside(self, env_path: Path, argv: Sequence[str], args: Sequence[str],
                          environ: Mapping[str, str], what: str) -> None:
        """``argv + args`` as a command of the env (gestvenv.inside), the host paths among
        ``args`` (sdists, requirements, find-links) copied into the env for it and removed
        after; a failure said plainly (:func:`_raise_for`)."""
        assert self.inside is not None
        self.built_inside = True
        progress.step(f"{what}: inside environment {self.inside.record.name!r} (its output "
                      "is shown if it fails)")
        try:
            staged, stage = await in_thread(stage_inputs, args, str(env_path),
                                            self.inside.record.sandbox_uid)
        except OSError as exc:
            raise BuildError(f"cannot copy the install's local inputs into environment "
                             f"{self.inside.record.name!r}: {exc}") from None
        try:
            result = await self.inside.run([*argv, *staged], environ)
        finally:
            await in_thread(unstage, str(env_path), stage)
        _raise_for(result, what, self.inside)

    async def _run(self, argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
        reporter = progress.current()
        if reporter is not None:
            await self._run_live(argv, what, env, reporter)
            return
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**(os.environ if env is None else env), **self.marker},
        )
        try:
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode != 0:
            text = (err or out).decode(errors="replace")
            raise BuildError(f"{what} failed (exit {proc.returncode})", text)

    async def _run_live(self, argv: list[str], what: str, env: dict[str, str] | None,
                        reporter: progress.Reporter) -> None:
        """:meth:`_run` on a terminal: the installer draws its own progress there."""
        environ = {**(os.environ if env is None else env), **self.marker}
        environ.pop("UV_NO_PROGRESS", None)
        returncode, tail = await progress.run_live(
            [arg for arg in argv if arg != "--quiet"], environ, reporter)
        if returncode != 0:
            raise BuildError(f"{what} failed (exit {returncode})", tail)


# How an install inside an env reaches the index: a proxy, a CA bundle (a company's TLS
# inspection). Everything else of the creator's environment stays out of the env's commands.
_NETWORK_VARS = frozenset({
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
    "all_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR"})


def _passed_inside(name: str, installer_prefix: str) -> bool:
    """A variable of the creator's that an install run inside the env is given: the
    installer's own (``UV_*`` or ``PIP_*``), the locale, and how to reach the index."""
    return name.startswith((installer_prefix, "LANG", "LC_")) or name in _NETWORK_VARS


def _cloning(contents: tuple[int, int] | None) -> str:
    if contents is None:
        return "cloning the package set's snapshot"
    files, nbytes = contents
    return f"cloning the package set's snapshot ({files} files, {progress.size(nbytes)})"


def _install_what(packages: Sequence[str], requirements: Sequence[Path]) -> str:
    """What an install was given, for its error: ``-r FILE`` for each requirements file."""
    return " ".join([*(f"-r {req}" for req in requirements), *packages])


def _index_args(config: Config) -> list[str]:
    args: list[str] = []
    for link in config.find_links:
        args += ["--find-links", link]
    if config.index_url:
        args += ["--index-url", config.index_url]
    return args


class UvBuilder(Builder):
    """uv with the base interpreter and ``--prefix ENV``.

    Naming the env's own python would make uv query a new interpreter path for every
    environment (~50 ms); the base interpreter's answer is cached by uv. Scripts then name the
    base interpreter in their shebang, which is rewritten to the environment's.
    """

    name = "uv"

    def __init__(self, config: Config, uv: str, env_id: str | None = None,
                 inside: InsideInstaller | None = None) -> None:
        super().__init__(config, env_id, inside)
        self.uv = uv
        self.cache = uv_cache_dir(config)

    def installer_key(self) -> dict[str, object]:
        return installer_part("uv", self.uv, "UV_")

    def tools(self) -> list[str]:
        return [self.uv]

    async def create(self, env_path: Path, interpreter: Interpreter) -> None:
        progress.step(f"writing its virtualenv (Python {interpreter.version})")
        write_venv(env_path, interpreter)
        write_pip_shim(env_path, self.uv, self.config)

    async def install(self, env_path: Path, interpreter: Interpreter, packages: Sequence[str],
                      requirements: Sequence[Path] = ()) -> None:
        if not packages and not requirements:
            return
        self.cache.mkdir(parents=True, exist_ok=True)
        before = _scripts(env_path)
        argv = [self.uv, "pip", "install", "--quiet", "--python", interpreter.path,
                "--prefix", str(env_path), "--cache-dir", str(self.cache),
                "--link-mode", self.link_mode(env_path)]
        if self.config.compile_bytecode:
            argv.append("--compile-bytecode")
        if self.config.offline:
            argv.append("--offline")
        argv += _index_args(self.config)
        for req in requirements:
            argv += ["--requirement", str(req)]
        argv += list(packages)
        env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
        for key in ("VIRTUAL_ENV", "UV_PYTHON", "UV_SYSTEM_PYTHON"):
            env.pop(key, None)
        what = "uv pip install " + _install_what(packages, requirements)
        progress.step(f"installing with {what}")
        if self.inside is None:
            await self._run(argv, what, env)
        elif self.inside.everything:
            await self._install_inside(env_path, packages, requirements, env)
            return  # (its uv wrote the env's own python into the scripts)
        else:
            try:
                # Wheels only, here: resolving, downloading and unpacking run no package code.
                await self._run([*argv[:3], "--no-build", *argv[3:]], what, env)
            except BuildError as exc:
                if not _NEEDS_BUILD.search(_one_line(exc.output)):
                    raise
                progress.step(_MOVES_INSIDE)
                await self._install_inside(env_path, packages, requirements, env)
                return
        await in_thread(_fix_shebangs, env_path, interpreter, before)

    async def _install_inside(self, env_path: Path, packages: Sequence[str],
                              requirements: Sequence[Path], env: dict[str, str]) -> None:
        """The install as a command of the env, which builds what must be built: under its
        limits, isolation, uid and network, with a uv cache of its own that it removes itself.
        It names the env's own python, so that scripts need no rewriting afterwards: after
        package code has run in the env, nothing writes there by path but the env's uid."""
        assert self.inside is not None
        cache = str(shim_cache_dir(env_path))
        # (The cache goes with the env's own python, not rm: a container's image has no rm.)
        python = str(env_path / "bin" / "python")
        argv = ["/bin/sh", "-c", 'cache=$1; py=$2; shift 2; "$@"; rc=$?; "$py" -I -S -c '
                '"import shutil, sys; shutil.rmtree(sys.argv[1], True)" "$cache"; exit $rc',
                "gestvenv-install", cache, python,
                self.uv, "pip", "install", "--quiet", "--python", str(env_path / "bin" / "python"),
                "--cache-dir", cache, "--link-mode", "copy"]
        if self.config.compile_bytecode:
            argv.append("--compile-bytecode")
        if self.config.offline or not self.inside.network:
            argv.append("--offline")  # downloads only from what is local (find-links, paths)
        uv_env = {k: v for k, v in env.items() if _passed_inside(k, "UV_")}
        await self._run_inside(env_path, argv, self._install_args(packages, requirements),
                               uv_env, "uv pip install " + _install_what(packages, requirements))

    def _install_args(self, packages: Sequence[str], requirements: Sequence[Path]) -> list[str]:
        args = _index_args(self.config)
        for req in requirements:
            args += ["--requirement", str(req)]
        return args + list(packages)

    def link_mode(self, env_path: Path) -> str:
        """"copy", whatever ``link_mode`` says: a hardlink would share the cache's inode (an
        in-place edit of an installed file would reach the cache and every later env), and
        uv's "clone" falls back to hardlinks where reflinks fail (uv PR 18104). uv copies with
        copy_file_range, which the kernel turns into a reflink on btrfs and XFS.

        But "hardlink" for an env whose commands run under a uid of their own (a root
        creator's, namespace isolation and above: ``share_read_only``): there the cache's files
        are root's and read-only to them, and the hand-over keeps them so (sandbox.hand_over),
        so a link holds as a copy does, at the cost of a link."""
        if self.share_read_only:
            try:
                if os.stat(self.cache).st_dev == os.stat(env_path).st_dev:
                    return "hardlink"
            except OSError:
                pass
        return "copy"


# Said on a terminal, after the installer's refusal to build was shown there.
_MOVES_INSIDE = ("not everything has a wheel: the install moves inside the environment, "
                 "where package code may run (builds)")


def _one_line(output: str) -> str:
    """An installer's output with its lines joined: a terminal's width may wrap its words."""
    return " ".join(output.split())


# uv's words when --no-build refuses an sdist or a source tree that would have to be built.
_NEEDS_BUILD = re.compile(r"(?i)(building source distributions is disabled|building from source "
                          r"is disabled|--no-build)")


def _raise_for(result: ExecResult, what: str, inside: InsideInstaller) -> None:
    """An install run inside the env that failed, said plainly: above all an OOM kill."""
    if result.returncode == 0 and result.killed_by is None:
        return
    name = inside.record.name
    output = result.stderr or result.stdout
    if result.killed_by == "memory" or result.oom_killed:
        raise BuildError(f"{what} in environment {name!r}: the build was killed by the "
                         f"environment's memory limit (max_memory={inside.memory_limit} MB)",
                         output)
    if result.killed_by is not None:
        raise BuildError(f"{what} in environment {name!r}: {result.describe()}", output)
    raise BuildError(f"{what} failed inside environment {name!r} (exit {result.returncode})",
                     output)


def _scripts(env_path: Path) -> dict[str, int]:
    out = {}
    with os.scandir(env_path / "bin") as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                out[entry.name] = entry.stat(follow_symlinks=False).st_ino
    return out


def _fix_shebangs(env_path: Path, interpreter: Interpreter, before: dict[str, int]) -> None:
    """Point scripts the install just wrote at the environment's python, not the base one."""
    base = interpreter.path.encode()
    own = str(env_path / "bin" / "python").encode()
    for name, inode in _scripts(env_path).items():
        if before.get(name) == inode:
            continue
        path = env_path / "bin" / name
        with open(path, "rb") as f:
            fixed = retarget(f.read(), base, own)
        if fixed is not None:
            mode = path.stat().st_mode
            tmp = path.with_name(f".{name}.gestvenv")
            tmp.write_bytes(fixed)
            tmp.chmod(stat.S_IMODE(mode))
            os.replace(tmp, path)


def remove_added(env_path: Path, baseline: set[str]) -> None:
    """Undo a half-done clone: remove what is not in ``baseline`` (the venv as written)."""
    # Bottom-up: a directory is empty by the time it is reached.
    for relname, path, is_dir in walk(env_path, topdown=False):
        if relname in baseline:
            continue
        if is_dir:
            os.rmdir(path)
        else:
            os.unlink(path)


class VenvPipBuilder(Builder):
    """Without uv: the virtualenv written here as the uv builder writes it (no ensurepip, no
    pip of its own), filled by one pip, the one of the Python that runs gestvenv
    (:func:`find_pip`), run by the env's own python: so pip installs into the env with the
    env's scheme and writes the env's python into the scripts' shebangs (pip's ``--python``
    does the same: it re-runs pip's ``__pip-runner__.py`` under the target interpreter).

    At creation, a set of plain requirements is installed here with ``--only-binary :all:``:
    resolving, downloading and unpacking wheels run no package code, and the env's python runs
    nothing of the env's yet (its site-packages is empty: no ``.pth``). A set that needs a build
    (pip found no wheel), names paths, URLs or options, and every install after creation, run
    inside the env (gestvenv.inside): pip builds what it installs, it honours
    ``--only-binary`` neither for a local project nor for a URL, and once the env has packages
    its python would run their ``.pth`` files. Package sets are snapshotted as with uv.
    """

    name = "venv"

    def __init__(self, config: Config, env_id: str | None = None,
                 inside: InsideInstaller | None = None, pip: Pip | None = None) -> None:
        super().__init__(config, env_id, inside)
        found = pip or find_pip()
        if found is None:
            raise BuildError("builder 'venv' needs pip: none found for this Python (install "
                             "python3-pip, or uv: pip install uv)")
        self.pip = found
        self.cache = pip_cache_dir(config)

    def installer_key(self) -> dict[str, object]:
        return installer_part("pip", self.pip.runner, "PIP_")

    def tools(self) -> list[str]:
        return [self.pip.location]

    async def create(self, env_path: Path, interpreter: Interpreter) -> None:
        progress.step(f"writing its virtualenv (Python {interpreter.version})")
        write_venv(env_path, interpreter)
        write_pip_runner_shim(env_path, interpreter, self.pip, self.config)

    async def install(self, env_path: Path, interpreter: Interpreter, packages: Sequence[str],
                      requirements: Sequence[Path] = ()) -> None:
        if not packages and not requirements:
            return
        what = "pip install " + _install_what(packages, requirements)
        args = _index_args(self.config)
        for req in requirements:
            args += ["--requirement", str(req)]
        args += list(packages)
        progress.step(f"installing with {what}")
        here = [*self._pip(env_path), "--cache-dir", str(self.cache), *self._options()]
        if self.inside is None:
            await self._run([*here, *args], what)
            return
        if not self.inside.everything and await in_thread(
                self._wheels_here, env_path, interpreter, packages, requirements):
            try:
                # Wheels only: pip resolves everything before it installs anything, so a
                # refusal leaves the env as it was.
                await self._run([*here, "--only-binary", ":all:", *args], what, _pip_environ())
                return
            except BuildError as exc:
                if not _PIP_NO_WHEEL.search(_one_line(exc.output)):
                    raise
                progress.step(_MOVES_INSIDE)
        await self._install_inside(env_path, args, what)

    def _pip(self, env_path: Path) -> list[str]:
        """pip run by the env's python (-I: no PYTHONPATH, nor the user's site)."""
        return [str(env_path / "bin" / "python"), "-I", self.pip.runner, "install"]

    def _options(self, *, offline: bool = False) -> list[str]:
        """pip's options: gestvenv's settings, never a question (no terminal to answer)."""
        argv = ["--quiet", "--disable-pip-version-check", "--no-input"]
        if not self.config.compile_bytecode:
            argv.append("--no-compile")
        if self.config.offline or offline:
            argv.append("--no-index")
        return argv

    def _wheels_here(self, env_path: Path, interpreter: Interpreter, packages: Sequence[str],
                     requirements: Sequence[Path]) -> bool:
        """Whether the install may run here, wheels only: the env's site-packages is still
        empty (its python starts without any code of the env's), and the set is plain
        requirements, also by the creator's own pip variables (which could add a project
        to build: ``--only-binary`` does not hold for those)."""
        if any(os.environ.get(f"PIP_{name}") for name in _PIP_ADDING):
            return False
        if any(os.scandir(site_packages(env_path, interpreter))):
            return False
        return snapshottable(packages, requirements)

    async def _install_inside(self, env_path: Path, args: list[str], what: str) -> None:
        """The install as a command of the env, which builds what must be built: under its
        limits, isolation, uid and network, with no cache (a build cannot write the shared
        one, nor leave one behind)."""
        assert self.inside is not None
        argv = [*self._pip(env_path), "--no-cache-dir",
                *self._options(offline=not self.inside.network)]
        await self._run_inside(env_path, argv, args,
                               {k: v for k, v in os.environ.items()
                                if _passed_inside(k, "PIP_")}, what)


# The creator's pip variables that add requirements (files, editable projects, constraints):
# with any of them set, nothing is installed here.
_PIP_ADDING = ("REQUIREMENT", "EDITABLE", "CONSTRAINT")
# pip's words when no wheel satisfies a requirement (with --only-binary: maybe an sdist does).
_PIP_NO_WHEEL = re.compile(r"(?i)(no matching distribution found|could not find a version "
                           r"that satisfies)")


def _pip_environ() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    return env


@dataclass(frozen=True)
class Pip:
    """A pip that any environment's python can run, from where it is installed.

    ``runner``: what ``python RUNNER ARGS...`` runs: a pip package's ``__pip-runner__.py``
    (pip >= 22.3; it imports that pip and nothing else of the tree it sits in) or a wheel's
    ``pip`` dir (pip runs from its wheel as a zip). ``location``: the package dir or the wheel,
    what a sandbox must show and a container must bind."""

    runner: str
    location: str
    version: str


@functools.lru_cache(maxsize=1)
def find_pip() -> Pip | None:
    """The pip of the Python that runs gestvenv (Debian's ``python3 -m pip``, a venv's own),
    else the pip wheel its ``ensurepip`` would install (Debian's python3-pip-whl): slower, as
    a zip's modules are compiled at every run."""
    import importlib.util

    spec = importlib.util.find_spec("pip")
    if spec is not None and spec.origin:
        location = os.path.dirname(spec.origin)
        runner = os.path.join(location, "__pip-runner__.py")
        if os.path.isfile(runner):
            return Pip(runner, location, _pip_version(location))
    wheels = []
    for directory in _wheel_dirs():
        with contextlib.suppress(OSError):
            wheels += [os.path.join(directory, n) for n in os.listdir(directory)
                       if n.startswith("pip-") and n.endswith(".whl")]
    if not wheels:
        return None
    best = max(wheels, key=lambda w: _numbers(os.path.basename(w).split("-")[1]))
    return Pip(os.path.join(best, "pip"), best, os.path.basename(best).split("-")[1])


def _wheel_dirs() -> list[str]:
    """Where ensurepip keeps its wheels: its own ``_bundled``, Debian's shared dir."""
    import importlib.util

    spec = importlib.util.find_spec("ensurepip")
    dirs = ["/usr/share/python-wheels"]
    if spec is not None and spec.origin:
        dirs.insert(0, os.path.join(os.path.dirname(spec.origin), "_bundled"))
    return dirs


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def _pip_version(location: str) -> str:
    try:
        with open(os.path.join(location, "__init__.py")) as f:
            found = re.search(r"__version__\s*=\s*[\"']([^\"']+)", f.read())
    except OSError:
        return "unknown"
    return found.group(1) if found else "unknown"


def pip_cache_dir(config: Config) -> Path:
    """The shared cache of the pip that installs wheels here: beside uv's (and as hidden)."""
    return uv_cache_dir(config).parent / "gestvenv-pip"


def make_builder(config: Config, env_id: str | None = None,
                 inside: InsideInstaller | None = None) -> Builder:
    """The configured builder; ``env_id`` marks its processes as the environment's, so that
    destroying the environment mid-install kills them and the idle check sees them."""
    if config.builder == "venv":
        return VenvPipBuilder(config, env_id, inside)
    uv = find_uv()
    if uv is not None:
        return UvBuilder(config, uv, env_id, inside)
    if config.builder == "uv":
        raise BuildError("builder = 'uv' but uv is not installed (pip install uv)")
    # (No warning: the second env of a set is a clone either way, and a warning on every
    # command of a Debian install, which has no uv, would only be noise.)
    return VenvPipBuilder(config, env_id, inside)


_ACTIVATE = """\
# Generated by gestvenv; use: . {env}/bin/activate
deactivate () {{
    [ -n "${{_GESTVENV_OLD_PATH:-}}" ] && PATH="$_GESTVENV_OLD_PATH" && export PATH
    unset VIRTUAL_ENV _GESTVENV_OLD_PATH
    unset -f deactivate
}}
_GESTVENV_OLD_PATH="$PATH"
VIRTUAL_ENV={env_q}
PATH="$VIRTUAL_ENV/bin:$PATH"
export VIRTUAL_ENV PATH
unset PYTHONHOME
hash -r 2>/dev/null || true
"""


def write_venv(env_path: Path, interpreter: Interpreter) -> None:
    """Write a virtualenv by hand: what ``python -m venv --symlinks --without-pip`` makes."""
    import shlex

    short = interpreter.short_version
    bin_dir = env_path / "bin"
    bin_dir.mkdir(parents=True)  # env_path itself may exist already (claimed by lifecycle)
    site_packages(env_path, interpreter).mkdir(parents=True)
    if sysconfig.get_config_var("SIZEOF_VOID_P") == 8:
        (env_path / "lib64").symlink_to("lib")
    (env_path / "pyvenv.cfg").write_text(
        f"home = {os.path.dirname(interpreter.path)}\n"
        "include-system-site-packages = false\n"
        f"version = {interpreter.version}\n"
        f"executable = {interpreter.path}\n"
        f"command = gestvenv (venv written in-process) {env_path}\n"
    )
    for link in ("python", "python3", f"python{short}"):
        (bin_dir / link).symlink_to(interpreter.path)
    (bin_dir / "activate").write_text(
        _ACTIVATE.format(env=env_path, env_q=shlex.quote(str(env_path)))
    )


_PIP_SHIM = """\
#!/bin/sh
# gestvenv: this environment was built with uv; pip here is uv's pip interface for it,
# with gestvenv's index settings and a cache of its own, inside it: what runs under this pip
# (an sdist's build) cannot write gestvenv's shared cache. (There is no "python -m pip".)
{settings} exec {uv} pip "$@"
"""


def shim_cache_dir(env_path: Path) -> Path:
    """The pip shim's uv cache: the environment's own (left out of snapshots)."""
    return env_path / PRIVATE_DIR / "uv-cache"


def write_pip_shim(env_path: Path, uv: str, config: Config) -> None:
    import shlex

    settings = {
        "UV_PYTHON": str(env_path / "bin" / "python"),
        "UV_CACHE_DIR": str(shim_cache_dir(env_path)),
        "UV_LINK_MODE": "copy",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_COMPILE_BYTECODE": "1" if config.compile_bytecode else "0",
    }
    if config.offline:
        settings["UV_OFFLINE"] = "1"
    if config.find_links:
        settings["UV_FIND_LINKS"] = ",".join(config.find_links)
    if config.index_url:
        settings["UV_INDEX_URL"] = config.index_url
    text = _PIP_SHIM.format(
        settings=" ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items()),
        uv=shlex.quote(uv))
    for name in ("pip", "pip3"):
        shim = env_path / "bin" / name
        shim.write_text(text)
        shim.chmod(0o755)


_PIP_RUNNER_SHIM = """\
#!/bin/sh
# gestvenv: this environment has no pip of its own; pip here is {location} (pip {version}), run
# by this environment's python, with gestvenv's index settings and a cache of its own, inside
# it: what runs under this pip (an sdist's build) cannot write gestvenv's shared cache.
# (There is no "python -m pip".)
{settings} exec {python} {runner} "$@"
"""


def write_pip_runner_shim(env_path: Path, interpreter: Interpreter, pip: Pip,
                          config: Config) -> None:
    import shlex

    settings = {
        "PIP_CACHE_DIR": str(env_path / PRIVATE_DIR / "pip-cache"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        # (PIP_COMPILE, not PIP_NO_COMPILE: pip reads a variable by its option's name, and a
        # "no-" option's value as is, so PIP_NO_COMPILE=1 would turn compiling on.)
        "PIP_COMPILE": "1" if config.compile_bytecode else "0",
    }
    if config.offline:
        settings["PIP_NO_INDEX"] = "1"
    if config.find_links:
        settings["PIP_FIND_LINKS"] = " ".join(config.find_links)
    if config.index_url:
        settings["PIP_INDEX_URL"] = config.index_url
    text = _PIP_RUNNER_SHIM.format(
        location=pip.location, version=pip.version,
        settings=" ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items()),
        python=shlex.quote(str(env_path / "bin" / "python")), runner=shlex.quote(pip.runner))
    for name in ("pip", "pip3", f"pip{interpreter.short_version}"):
        shim = env_path / "bin" / name
        shim.write_text(text)
        shim.chmod(0o755)
