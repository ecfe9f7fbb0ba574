"""Every code block of README.md and docs/ runs (tests/integration/doc_snippets.py says how),
and every gestvenv command line the prose quotes names options that exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from gestvenv.cli import cli
from tests.integration import doc_snippets
from tests.integration.doc_snippets import ROOT, SnippetSyntaxError, blocks, markdown_files
from tests.integration.support import env_names, leftover_count, leftover_summary, leftovers

pytestmark = pytest.mark.slow


def runnable(path: Path) -> bool:
    """A doc with something to run (or that breaks the convention: its test says how)."""
    try:
        return any(b.language in ("python", "sh", "toml") and "norun" not in b.attrs
                   for b in blocks(path))
    except SnippetSyntaxError:
        return True


RUNNABLE = [p for p in markdown_files() if runnable(p)]


def run_doc(path: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.doc_snippets", str(path)], cwd=ROOT,
        env={**os.environ, "GESTVENV_DOC_REPORT": str(report)}, capture_output=True, text=True,
        timeout=900, check=False)
    print(done.stdout[-6000:], done.stderr[-3000:])
    return done, json.loads(report.read_text()) if report.exists() else []


def test_the_docs_follow_the_convention() -> None:
    """Each fenced block names a language the runner knows, and valid attributes: a block
    cannot drop out of the test by a typo."""
    found = {p.name: blocks(p) for p in markdown_files()}
    assert {"README.md", "ephemeral-environments.md", "ephemeral.md",
            "migration-to-ephemeral.md"} <= set(found)
    assert sum(b.language in ("python", "sh") for bs in found.values() for b in bs) >= 20


def test_a_block_outside_the_convention_is_an_error(tmp_path: Path) -> None:
    for text, message in (("```\nls\n```\n", "must name its language"),
                          ("```bash\nls\n```\n", "not 'bash'"),
                          ("```sh needs=docker\nls\n```\n", "needs='docker'"),
                          ("```sh norun=because\nls\n```\n", "norun='because'"),
                          ("```sh\n$ gestvenv ephemeral list\n```\n", "no prompt")):
        doc = tmp_path / "doc.md"
        doc.write_text(text)
        with pytest.raises(SnippetSyntaxError, match=re.escape(message)):
            blocks(doc)


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_of_the_doc_runs(path: Path, tmp_path: Path) -> None:
    done, report = run_doc(path, tmp_path)
    failed = [f"{r['where']}: {r['detail']}" for r in report if r["status"] == "failed"]
    assert failed == [], "\n\n".join(failed)
    assert done.returncode == 0, done.stderr[-3000:]
    # Skipped only for what this host lacks (CI's systemd tier has systemd, podman and root).
    for item in report:
        if item["status"] == "skipped":
            need = item["detail"].removeprefix("needs ")
            assert all(doc_snippets.missing(n) for n in need.split(",")), item
    ran = [r for r in report if r["status"] == "passed"]
    assert ran, f"nothing of {path} ran"


def test_a_doc_that_uses_an_option_the_code_lacks_fails(tmp_path: Path) -> None:
    """What keeps docs true: a block with an option that does not exist (as a removed one
    would) fails, and so does an env left behind."""
    doc = tmp_path / "doc.md"
    doc.write_text("```sh\ngestvenv ephemeral create doc-gone --ttl 60 --no-such-option 1\n"
                   "```\n\n```python\nimport gestvenv\n"
                   "env = await gestvenv.create_environment('doc-left', ttl=60)\n```\n")
    try:
        done, report = run_doc(doc, tmp_path)
    finally:
        subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "cleanup", "doc-left"],
                       check=False, capture_output=True)
    assert done.returncode == 1
    by_line = {r["where"].rsplit(":", 1)[1]: r for r in report}
    assert by_line["1"]["status"] == "failed"
    assert "No such option" in by_line["1"]["detail"]
    assert "--no-such-option" in by_line["1"]["detail"]
    assert by_line["5"]["status"] == "passed"
    assert by_line["0"]["detail"] == "environments left behind: doc-left"


# --- command lines quoted in prose (`gestvenv ... --option`) ---

_INLINE = re.compile(r"`(gestvenv [^`]+)`")


def command_of(words: list[str]) -> tuple[click.Command, list[str]]:
    """The deepest command of the click tree that ``words`` name, and the words after it."""
    command: click.Command = cli
    rest = list(words)
    while rest and isinstance(command, click.Group) and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    return command, rest


def options_of(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def quoted_commands() -> list[tuple[str, str]]:
    found = []
    for path in markdown_files():
        text = path.read_text()
        for match in _INLINE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match[1]))
    for path in markdown_files():
        for block in blocks(path):
            if block.language in ("sh", "text"):
                for offset, line in enumerate(block.code.splitlines(), 1):
                    if line.lstrip().startswith("gestvenv "):
                        found.append((f"{block.where}+{offset}", line.split("#", 1)[0]))
    return found


def unknown_options(quoted: str) -> list[str]:
    """The options (long and short) and subcommands of a quoted ``gestvenv ...`` line that the
    click tree does not have. Stops at ``--``, and at the command it runs (a variadic
    argument: ``run``, ``exec``)."""
    line = re.split(r"\s(?:\||;|&&|\|\||>|2>)\s", quoted)[0]  # this command, not a pipe's
    words = [w for w in line.split()[1:] if not w.startswith("[")]  # ([--json]: optional)
    if words and words[0].endswith(":"):
        return []  # a log line ("gestvenv reaper: ..."), not a command
    command, rest = command_of(words)
    if isinstance(command, click.Group):
        first = next((w for w in rest if not w.startswith("-")), None)
        if first is not None and not re.fullmatch(r"[A-Z_|\[\]-]+", first):  # (a placeholder)
            return [f"subcommand {first!r}"]
    params = {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    variadic = any(isinstance(p, click.Argument) and p.nargs == -1 for p in command.params)
    bad: list[str] = []
    i = 0
    while i < len(rest):
        word = rest[i]
        i += 1
        if word == "--":
            break
        name = word.split("=", 1)[0]
        if re.fullmatch(r"--[a-z][a-z0-9-]*|-[a-zA-Z]", name):
            if name == "--help" or name == "-h":
                continue
            param = params.get(name)
            if param is None:
                bad.append(name)
            elif isinstance(param, click.Option) and not param.is_flag and "=" not in word:
                i += 1  # its value
        elif not word.startswith("-") and variadic:
            break  # the command it runs, with options of its own
    return bad


def test_every_option_the_docs_quote_exists() -> None:
    quoted = quoted_commands()
    assert len(quoted) >= 30
    bad = [f"{where}: {text!r}: {unknown_options(text)}" for where, text in quoted
           if unknown_options(text)]
    assert bad == []


def test_the_option_check_catches_a_removed_option() -> None:
    assert unknown_options("gestvenv ephemeral create x --ttl 60") == []
    assert unknown_options("gestvenv ephemeral create x --time-to-live 60") == ["--time-to-live"]
    assert unknown_options("gestvenv run --env x -- python -V") == []
    assert unknown_options("gestvenv run --env x pytest -x --maxfail 1") == []
    assert unknown_options("gestvenv ephemeral create x -p six -q") == ["-q"]
    assert unknown_options("gestvenv ephemeral destroy x") == ["subcommand 'destroy'"]
    assert unknown_options("gestvenv ephemeral timer install") == []


def test_make_demo_the_readmes_first_command_works() -> None:
    """README's first block (`make demo`, `make test`) is not run by the runner (`make test`
    is this suite): `make demo` is run here, as written, with the test's offline home."""
    venv = Path(sys.executable).parent.parent
    if not (venv / ".installed").exists():
        pytest.skip(f"{venv} is not the Makefile's venv")
    # -o: the venv is taken as it is (never reinstalled from this tree, whatever the mtimes).
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT),
                           "-o", f"{venv}/.installed", "demo", f"VENV={venv}"],
                          capture_output=True, text=True, timeout=600, check=False)
    print(done.stdout, done.stderr)
    assert done.returncode == 0
    assert re.search(r"^six 1\.16\.0 in /\S+/demo-[0-9a-f]{8}$", done.stdout, re.MULTILINE)
    assert "removed demo" in done.stdout
    assert env_names() == set()


def test_the_ci_pipeline_example_as_written_passes_and_leaves_nothing(tmp_path: Path) -> None:
    """The product's CI example, its two commands as written (no `--`, no TTL), then the
    cleanup step, as a CI runner's shell step runs them."""
    for name, text in doc_snippets.SCRATCH_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    step = ("gestvenv ephemeral create ci-test --requirements requirements.txt\n"
            "gestvenv run --env ci-test pytest tests/\n"
            "gestvenv ephemeral cleanup ci-test\n")
    done = subprocess.run(["bash", "-e", "-c", step], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                     f"{os.environ['PATH']}"})
    print(done.stdout, done.stderr)
    assert done.returncode == 0
    # The env's pytest ran (the wheelhouse's stand-in prints this), not one from the PATH.
    assert "1 passed, 0 failed" in done.stdout
    assert "removed ci-test" in done.stdout
    assert env_names() == set()
    left = leftovers()
    assert leftover_count(left) == 0, leftover_summary(left)


@pytest.mark.parametrize(("text", "message"), [
    ("- item\n\n    ```sh\n    ls\n    ```\n", "inside a list item or a quote"),
    ("> ```sh\n> ls\n> ```\n", "inside a list item or a quote"),
    ("<!--\n```text\n-->\n```sh\nls\n```\n", "a fence inside an HTML comment"),
    ("- item\n\n      ls -l\n", "an indented code block"),
    ("```python file=../x.py\npass\n```\n", "file='../x.py': a path in the scratch dir"),
])
def test_code_the_runner_would_not_see_is_an_error(tmp_path: Path, text: str,
                                                   message: str) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    with pytest.raises(SnippetSyntaxError, match=re.escape(message)):
        blocks(doc)


def test_config_blocks_are_checked_and_file_blocks_are_used(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("```toml\n[ephemerl]\ndefault_ttl = 1\n```\n\n"
                   "```ini\n[pytest]\ngestvenv_tll = 5\n```\n\n"
                   "```ini\n[pytest]\ngestvenv_limits = max_memory=lots\n```\n\n"
                   "```python file=mod.py\nVALUE = 42\n```\n\n"
                   "```python\nimport mod\nassert mod.VALUE == 42 and __name__ == '__main__'\n"
                   "```\n")
    done, report = run_doc(doc, tmp_path)
    statuses = [(r["status"], r["detail"].splitlines()[-1] if r["detail"] else "")
                for r in report]
    assert statuses[0][0] == "failed" and "unknown top-level table(s) ['ephemerl']" in \
        statuses[0][1]
    assert statuses[1][0] == "failed" and "unknown gestvenv ini option(s) ['gestvenv_tll']" in \
        statuses[1][1]
    assert statuses[2][0] == "failed" and "max_memory='lots' is not a number" in statuses[2][1]
    assert statuses[3] == ("written", "mod.py")
    assert statuses[4] == ("passed", "")
    assert done.returncode == 1


def test_the_systemd_tier_can_run_every_needs_block() -> None:
    """The blocks marked needs=... are skipped where that is missing: CI's systemd tier is
    where they run, so there nothing may be missing (else they would run nowhere)."""
    if doc_snippets.missing("systemd"):
        pytest.skip("the systemd tier's check (here systemd is not PID 1)")
    assert [need for need in doc_snippets.NEEDS if doc_snippets.missing(need)] == []
