"""Run the code blocks of Markdown docs, so that the docs cannot drift from the code.

    python -m tests.integration.doc_snippets README.md docs/guide.md ...

The convention (every fenced block of README.md and docs/**/*.md follows it):

- The info string's first word is the language. ``python`` and ``sh`` blocks are executed;
  ``toml`` blocks are loaded (an ``[ephemeral]`` table by gestvenv's config loader, and only
  known top-level tables), ``ini`` blocks' ``gestvenv_*`` pytest options are checked; the
  languages in ``INERT`` are shown, not run (output, listings, other tools' files). Any other
  language is an error: a block cannot drop out of the test by a typo.
- Attributes may follow: ``needs=systemd|podman|root`` (run only where that holds, else
  reported as skipped), ``norun=REASON`` with a reason from ``NORUN`` (shown, never run).
- The python blocks of one file run in order, in one namespace and one asyncio event loop:
  top-level ``await``, ``async with`` and ``async for`` work, as in ``python -m asyncio``.
- ``sh`` blocks run with ``bash -euo pipefail``, this interpreter's ``bin/`` first on PATH.
- Every block of a file has the same scratch dir as its cwd (``SCRATCH_FILES`` are in it).
- Packages come from the test suite's wheelhouse of stand-ins (tests/harness/wheels.py),
  offline, as for every test (CI's systemd tier has no network); run by hand, the runner
  makes such a home itself.
- A file must leave no environment behind: the envs listed after it must be those before it.
- Fences only at the top level: one in a list item, a quote or an HTML comment is an error,
  as is an indented code block (the runner would not see them).

Each file runs in a process of its own (a namespace, a loop and a scratch dir of its own).
"""

from __future__ import annotations

import ast
import asyncio
import configparser
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ("python", "sh")
INERT = frozenset({"text", "ini", "yaml", "toml", "dockerfile", "diff", "json", "systemd"})
NORUN = {
    "installs": "installs or removes system packages",
    "forever": "runs until interrupted",
    "signature": "a signature or a shape, not code",
    "recursive": "runs this test suite",
}
NEEDS = ("systemd", "podman", "root")
SCRATCH_FILES = {
    "script.py": 'print("hello from script.py")\n',
    "requirements.txt": "six>=1.0\npytest\n",
    "tests/test_example.py": "def test_ok():\n    assert True\n",
}
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
# A fence anywhere else (in a list item, a quote): rendered as code, but not a block of ours.
_NESTED_FENCE = re.compile(r"^\s*(?:>\s*)*(?:`{3,}|~{3,})")
TOML_TABLES = frozenset({"ephemeral", "tool", "project", "build-system"})


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    attrs: dict[str, str] = field(default_factory=dict)
    code: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}" \
               f":{self.line}"


class SnippetSyntaxError(ValueError):
    """A block that breaks the convention (unknown language, attribute or reason)."""


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, checked against the convention."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    in_comment = False
    while i < len(lines):
        where = Block(path, i + 1, "").where
        if in_comment or "<!--" in lines[i]:
            in_comment = "-->" not in lines[i].split("<!--")[-1]
            if _NESTED_FENCE.match(lines[i]) or "```" in lines[i] or "~~~" in lines[i]:
                raise SnippetSyntaxError(f"{where}: a fence inside an HTML comment: the "
                                         "runner would not see what it hides")
            i += 1
            continue
        opening = _FENCE.match(lines[i])
        if opening is None:
            if _NESTED_FENCE.match(lines[i]):
                raise SnippetSyntaxError(
                    f"{where}: a fenced block inside a list item or a quote: put it at the "
                    "top level (no indentation) so that the convention applies")
            if _indented_code(lines, i):
                raise SnippetSyntaxError(
                    f"{where}: an indented code block; fence it "
                    "(```sh, ```python, ```text...) so that the convention applies")
            i += 1
            continue
        fence, start = opening["fence"], i
        words = opening["info"].split()
        body: list[str] = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i])
            i += 1
        i += 1
        block = Block(path, start + 1, words[0] if words else "", {}, "\n".join(body) + "\n")
        found.append(_checked(block, words[1:]))
    return found


def _indented_code(lines: list[str], i: int) -> bool:
    """Line ``i`` opens an indented code block: four spaces after a blank line that does not
    continue a list item, or six and more in a list item (its content is indented by two)."""
    if not lines[i].startswith("    ") or not lines[i].strip() or i == 0 or lines[i - 1].strip():
        return False
    before = next((line for line in reversed(lines[:i]) if line.strip()), "")
    in_list = re.match(r"\s|[-*+] |\d+[.)] ", before) is not None
    return not in_list or lines[i].startswith("      ")


def _checked(block: Block, words: list[str]) -> Block:
    where = block.where
    if block.language not in RUN and block.language not in INERT:
        raise SnippetSyntaxError(
            f"{where}: a fenced block must name its language, one of "
            f"{', '.join([*RUN, *sorted(INERT)])}; not {block.language or 'none'!r}")
    attrs: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in ("needs", "norun", "file"):
            raise SnippetSyntaxError(f"{where}: unknown attribute {word!r} (needs=, norun=, "
                                     "file=)")
        if key == "file" and (not value or value.startswith("/") or ".." in value.split("/")):
            raise SnippetSyntaxError(f"{where}: file={value!r}: a path in the scratch dir")
        if key == "needs" and not set(value.split(",")) <= set(NEEDS):
            raise SnippetSyntaxError(f"{where}: needs={value!r}: some of {', '.join(NEEDS)}, "
                                     "comma-separated")
        if key == "norun" and value not in NORUN:
            raise SnippetSyntaxError(f"{where}: norun={value!r}: one of {', '.join(NORUN)}")
        attrs[key] = value
    if block.language == "sh" and re.search(r"^\s*\$ ", block.code, re.MULTILINE):
        raise SnippetSyntaxError(f"{where}: no prompt characters in sh blocks ('$ ')")
    return Block(block.path, block.line, block.language, attrs, block.code)


def markdown_files() -> list[Path]:
    """The docs whose blocks are tested: README.md and every docs/**/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


# --- what this host has ---

def systemd_here() -> bool:
    """systemd is PID 1 and answers (what "auto" picks the systemd runtime for)."""
    from gestvenv.runtime.systemd import systemd_booted

    return systemd_booted()


def podman_here() -> bool:
    if shutil.which("podman") is None:
        return False
    done = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.returncode == 0


def missing(need: str) -> bool:
    if need == "systemd":
        return not systemd_here()
    if need == "podman":
        return not podman_here()
    return os.geteuid() != 0


# --- running ---

@dataclass
class Outcome:
    block: Block
    status: str  # "passed", "failed", "skipped", "shown"
    detail: str = ""
    seconds: float = 0.0


def environment_names() -> set[str]:
    from gestvenv import list_environments

    # (Not the unit-only entries: under systemd, units of another registry's envs.)
    return {str(info["name"]) for info in list_environments() if info["state"] != "unit-only"}


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gestvenv-docs-") as tmp:
        for name, text in SCRATCH_FILES.items():
            target = Path(tmp, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        yield Path(tmp)


def run_python(block: Block, namespace: dict[str, object],
               loop: asyncio.AbstractEventLoop) -> None:
    code = compile(block.code, block.where, "exec",
                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    result = eval(code, namespace)  # a coroutine when the block awaits at top level
    if asyncio.iscoroutine(result):
        loop.run_until_complete(result)


def run_sh(block: Block, cwd: Path) -> None:
    environ = dict(os.environ)
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                       environ.get("PATH", os.defpath)])
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=environ,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600, check=False)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise AssertionError(f"exit status {done.returncode}\n{done.stderr[-2000:]}")


def load_toml(block: Block) -> None:
    from gestvenv.config import Config

    data = tomllib.loads(block.code)
    unknown = sorted(set(data) - TOML_TABLES)
    if unknown:  # ([ephemerl] would otherwise pass unchecked)
        raise AssertionError(f"unknown top-level table(s) {unknown}: not one of "
                             f"{sorted(TOML_TABLES)}")
    if "ephemeral" in data:  # an unknown key or a bad value is a ConfigError
        Config().replace(_source=block.where, **data["ephemeral"])
    pytest_ini = data.get("tool", {}).get("pytest", {}).get("ini_options", {})
    _check_pytest_options(pytest_ini)


def load_ini(block: Block) -> None:
    """A pytest.ini: the gestvenv_* options it sets exist, and their values are read as the
    plugin reads them."""
    parser = configparser.ConfigParser()
    parser.read_string(block.code)
    for section in ("pytest", "tool:pytest"):
        if parser.has_section(section):
            _check_pytest_options(dict(parser[section]))


def _as_getini(raw: object, kind: str) -> object:
    """An ini value as pytest's getini gives it to the plugin."""
    if isinstance(raw, list):  # (a TOML array)
        return raw
    text = str(raw)
    if kind == "linelist":
        return [line.strip() for line in text.splitlines() if line.strip()]
    return shlex.split(text) if kind == "args" else text


def _check_pytest_options(options: dict[str, object]) -> None:
    from gestvenv import pytest_plugin

    known = {*pytest_plugin.INI, pytest_plugin.KEEP_MAX}
    unknown = sorted(k for k in options if k.startswith("gestvenv") and k not in known)
    if unknown:
        raise AssertionError(f"unknown gestvenv ini option(s) {unknown}; known: {sorted(known)}")
    values = {key: _as_getini(options[key], kind)
              for key, (_, kind, _) in pytest_plugin.INI.items() if key in options}
    pytest_plugin.from_ini(values)  # a bad value is a ValidationError


def run_file(path: Path) -> list[Outcome]:
    """Every block of ``path``, in order; then the check that no environment is left."""
    outcomes: list[Outcome] = []
    try:
        blocks(path)
    except SnippetSyntaxError as exc:
        return [Outcome(Block(path, 0, "convention"), "failed", str(exc))]
    before = environment_names()
    namespace: dict[str, object] = {"__name__": "__main__"}  # (as a script the reader runs)
    loop = asyncio.new_event_loop()
    home = Path.cwd()
    try:
        with scratch_dir() as cwd:
            os.chdir(cwd)
            sys.path.insert(0, str(cwd))  # as for a reader's `python` there: its files import
            for block in blocks(path):
                outcomes.append(run_block(block, namespace, loop, cwd))
            os.chdir(home)
    finally:
        os.chdir(home)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    left = sorted(environment_names() - before)
    if left:
        outcomes.append(Outcome(Block(path, 0, "cleanup"), "failed",
                                f"environments left behind: {', '.join(left)}"))
    return outcomes


def run_block(block: Block, namespace: dict[str, object], loop: asyncio.AbstractEventLoop,
              cwd: Path) -> Outcome:
    if "norun" in block.attrs:
        return Outcome(block, "shown", NORUN[block.attrs["norun"]])
    if "file" in block.attrs:  # the block is a file that later blocks use (run, import...)
        target = cwd / block.attrs["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code)
        return Outcome(block, "written", str(target.relative_to(cwd)))
    if block.language not in RUN and block.language not in ("toml", "ini"):
        return Outcome(block, "shown")
    lacking = [n for n in block.attrs.get("needs", "").split(",") if n and missing(n)]
    if lacking:
        return Outcome(block, "skipped", f"needs {','.join(lacking)}")
    started = time.monotonic()
    try:
        if block.language == "python":
            run_python(block, namespace, loop)
        elif block.language == "sh":
            run_sh(block, cwd)
        elif block.language == "ini":
            load_ini(block)
        else:
            load_toml(block)
    except BaseException as exc:  # a doc's SystemExit is a failure too
        if isinstance(exc, KeyboardInterrupt):
            raise
        text = io.StringIO()
        traceback.print_exception(exc, file=text)
        return Outcome(block, "failed", text.getvalue()[-3000:], time.monotonic() - started)
    return Outcome(block, "passed", "", time.monotonic() - started)


@contextlib.contextmanager
def offline_home() -> Iterator[None]:
    """What the test suite gives every test (tests/conftest.py): a gestvenv home of its own and
    the wheelhouse of stand-in packages, offline. Run by hand, the runner makes one, so that
    it runs the blocks as CI does (the systemd tier has no network)."""
    if "GESTVENV_EPHEMERAL_FIND_LINKS" in os.environ:
        yield
        return
    from tests.harness.gv_env import gestvenv_environ
    from tests.harness.wheels import build_wheelhouse

    saved = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="gestvenv-docs-home-") as tmp:
        home = Path(tmp, "gv")
        (home / "config").mkdir(parents=True)
        wheels = build_wheelhouse(Path(tmp, "wheels"))
        os.environ.update(gestvenv_environ(home, cache=Path(tmp, "cache"), wheelhouse=wheels))
        try:
            yield
        finally:
            _wait_for_watchdog(home / "run")  # (lingering, it would make its dirs again)
            os.environ.clear()
            os.environ.update(saved)


def _wait_for_watchdog(runtime_dir: Path, timeout: float = 10.0) -> None:
    """Until no process of gestvenv's (a watchdog lingers a little) has this runtime dir."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        users = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and \
                        proc.environ().get("GESTVENV_RUNTIME_DIR") == str(runtime_dir):
                    users.append(proc)
            except psutil.Error:
                continue
        if not users:
            return
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    with offline_home():
        return _main(argv)


def _main(argv: list[str]) -> int:
    if len(argv) > 1:  # one process per file: a namespace, a loop and a scratch dir each
        statuses = [subprocess.run([sys.executable, "-m", __spec__.name, arg],  # type: ignore[name-defined]
                                   check=False).returncode for arg in argv]
        return max(statuses)
    outcomes = run_file(Path(argv[0]).resolve())
    report = [{"where": o.block.where, "language": o.block.language, "status": o.status,
               "detail": o.detail, "seconds": round(o.seconds, 2)} for o in outcomes]
    for item in report:
        print(f"{item['status']:>7} {item['where']} ({item['language']}, {item['seconds']}s)"
              + (f": {item['detail']}" if item["detail"] else ""), flush=True)
    if path := os.environ.get("GESTVENV_DOC_REPORT"):
        Path(path).write_text(json.dumps(report))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
