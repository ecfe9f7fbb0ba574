"""Shell completion: click's scripts, sourced by the real shells, calling a real ``gestvenv``.

Completion runs the CLI at every <TAB>: it must answer from the click tree and the names of the
state files, and do nothing else (no directory, no watchdog, no systemd).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gestvenv import config, registry
from gestvenv.cli import cli, docs
from gestvenv.cli import ephemeral as ephemeral_cli
from gestvenv.cli._complete import complete_env_name, env_names
from gestvenv.registry import EnvRecord
from gestvenv.storage import runtime_dir_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("completions")
    paths = {}
    for name, text in docs.completion_scripts().items():
        (out / name).write_text(text)
        paths[name] = out / name
    return paths


@pytest.fixture
def shell_env(tmp_path: Path, gv_home: Path) -> dict[str, str]:
    """A ``gestvenv`` on PATH running this checkout with this interpreter, and a HOME of its own
    (so that anything created under ~ would show)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "gestvenv"
    exe.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m gestvenv \"$@\"\n")
    exe.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home),
            "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}


def add_env(name: str) -> None:
    """A state file, written as the registry writes it (completion reads only the names)."""
    registry.save(EnvRecord(
        name=name, id=f"{name}-0123456789", path=f"/nonexistent/{name}", backend="disk",
        runtime="local", interpreter=sys.executable, python_version="3.11",
        created_at=time.time(), ttl=3600, idle_timeout=None, limits={}, enforcement={},
        status="ready"))


def tree(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots if root.exists() for p in [root, *root.rglob("*")])


def needs(program: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(program) is None, reason=f"{program} is not installed")


# --- bash ------------------------------------------------------------------------------------

def bash_complete(script: Path, line: str, env: dict[str, str]) -> list[str]:
    """COMPREPLY for ``line`` (its last word is the one being completed, maybe empty), as bash
    computes it when <TAB> is pressed: the function the script registered, with COMP_WORDS."""
    words = line.split(" ")
    code = (f"source {shlex.quote(str(script))}\n"
            f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
            f"COMP_CWORD={len(words) - 1}\n"
            "_gestvenv_completion gestvenv\n"
            "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", code], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


@needs("bash")
def test_bash_completes_commands_and_options(scripts: dict[str, Path],
                                             shell_env: dict[str, str]) -> None:
    bash = scripts["gestvenv.bash"]
    registered = subprocess.run(["bash", "--norc", "-c", f"source {bash}; complete -p gestvenv"],
                                env=shell_env, capture_output=True, text=True, check=True)
    assert "-F _gestvenv_completion gestvenv" in registered.stdout
    assert bash_complete(bash, "gestvenv ephemeral cr", shell_env) == ["create"]
    assert bash_complete(bash, "gestvenv e", shell_env) == ["ephemeral"]
    options = bash_complete(bash, "gestvenv ephemeral cleanup --", shell_env)
    assert {"--all", "--expired", "--idle", "--orphans", "--json", "--quiet", "--help"} == \
        set(options)
    assert set(bash_complete(bash, "gestvenv ephemeral timer ", shell_env)) == \
        {"install", "uninstall", "status"}
    assert bash_complete(bash, "gestvenv ephemeral create --runtime s", shell_env) == ["systemd"]
    assert bash_complete(bash, "gestvenv config set max_to", shell_env) == ["max_total_memory_mb"]
    assert len(bash_complete(bash, "gestvenv config get ", shell_env)) == len(config.OPTIONS)


@needs("bash")
def test_bash_completes_environment_names_without_side_effects(
        scripts: dict[str, Path], shell_env: dict[str, str], gv_home: Path) -> None:
    for name in ("alpha", "beta", "ci-test"):
        add_env(name)
    before = tree(gv_home, Path(shell_env["HOME"]))
    bash = scripts["gestvenv.bash"]
    assert bash_complete(bash, "gestvenv ephemeral show ", shell_env) == \
        ["alpha", "beta", "ci-test"]
    assert bash_complete(bash, "gestvenv ephemeral exec c", shell_env) == ["ci-test"]
    assert bash_complete(bash, "gestvenv ephemeral cleanup alpha ", shell_env) == \
        ["beta", "ci-test"]  # a name already given is not offered again
    assert bash_complete(bash, "gestvenv run --env b", shell_env) == ["beta"]
    assert bash_complete(bash, "gestvenv ephemeral create ", shell_env) == []  # a new name
    assert tree(gv_home, Path(shell_env["HOME"])) == before


@needs("bash")
def test_completion_without_a_runtime_dir_creates_none(scripts: dict[str, Path],
                                                       shell_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    missing = tmp_path / "no-runtime-dir"
    env = {**shell_env, "GESTVENV_RUNTIME_DIR": str(missing)}
    assert bash_complete(scripts["gestvenv.bash"], "gestvenv ephemeral show ", env) == []
    assert bash_complete(scripts["gestvenv.bash"], "gestvenv ephemeral cr", env) == ["create"]
    assert not missing.exists()
    assert tree(Path(shell_env["HOME"])) == [shell_env["HOME"]]


def test_the_bash_script_does_not_depend_on_the_build_machines_bash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """click's BashComplete.source() runs ``bash`` to check its version; the script for a
    package must not depend on the shell of the machine that builds it."""
    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("ran a program to generate the script")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setenv("PATH", "/nonexistent")
    script = docs.completion_scripts()["gestvenv.bash"]
    assert "complete -o nosort -F _gestvenv_completion gestvenv" in script
    assert "_GESTVENV_COMPLETE=bash_complete" in script


# --- what completion does not do ------------------------------------------------------------

def test_completion_mode_invokes_no_callback(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str],
                                             gv_home: Path) -> None:
    """In process: the ephemeral group's callback (config, watchdog, systemd) never runs, and
    no directory is made, even for names."""
    add_env("alpha")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("called during completion")

    for name in ("ensure_for_command", "load_config", "systemd_booted"):
        monkeypatch.setattr(ephemeral_cli, name, forbidden)
    monkeypatch.setattr("gestvenv.storage._private_dir", forbidden)
    before = tree(gv_home)
    for line, expected in (("gestvenv ephemeral cr", "plain,create"),
                           ("gestvenv ephemeral show ", "plain,alpha")):
        words = line.split(" ")
        monkeypatch.setenv("_GESTVENV_COMPLETE", "bash_complete")
        monkeypatch.setenv("COMP_WORDS", line)
        monkeypatch.setenv("COMP_CWORD", str(len(words) - 1))
        with pytest.raises(SystemExit) as done:
            cli.main([], prog_name="gestvenv")
        assert done.value.code == 0
        assert capsys.readouterr().out.splitlines() == [expected]
    assert tree(gv_home) == before


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_completion_process_makes_no_dir_no_connection_no_process(
        tmp_path: Path, shell_env: dict[str, str]) -> None:
    """Seen by the kernel: not one mkdir, connect (D-Bus) or fork in the completing process."""
    add_env("alpha")
    log = tmp_path / "strace.log"
    env = {**shell_env, "_GESTVENV_COMPLETE": "bash_complete",
           "COMP_WORDS": "gestvenv ephemeral show ", "COMP_CWORD": "3"}
    proc = subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e",
                           "trace=mkdir,mkdirat,connect,clone,clone3,fork,vfork",
                           sys.executable, "-m", "gestvenv"], env=env, capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["plain,alpha"]
    calls = [line for line in log.read_text().splitlines() if "exited with" not in line]
    assert calls == [], calls


# --- the names themselves --------------------------------------------------------------------

def test_state_dir_is_computed_as_the_registry_finds_it(gv_home: Path) -> None:
    assert runtime_dir_path() / "envs" == registry.state_dir()


def test_env_names_skip_temporary_and_invalid_files(gv_home: Path) -> None:
    add_env("alpha")
    state = registry.state_dir()
    (state / ".alpha.123.456.tmp").write_text("{}")
    (state / "bad name.json").write_text("{}")
    (state / "notes.txt").write_text("")
    assert env_names() == ["alpha"]
    assert env_names("al") == ["alpha"]
    assert env_names("x") == []


def test_env_names_are_empty_on_any_error(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setenv("GESTVENV_RUNTIME_DIR", str(tmp_path / "missing"))
    assert env_names() == []
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("GESTVENV_RUNTIME_DIR", str(not_a_dir))
    assert env_names() == []


def test_every_parameter_naming_an_existing_env_completes_names() -> None:
    hooked = {(n.name, p.name) for n in docs.walk() for p in n.command.params
              if getattr(p, "_custom_shell_complete", None) is complete_env_name}
    assert hooked == {("gestvenv run", "env_name"), ("gestvenv ephemeral show", "name"),
                      ("gestvenv ephemeral exec", "name"), ("gestvenv ephemeral cleanup", "names"),
                      ("gestvenv ephemeral extend", "name")}


# --- zsh and fish ----------------------------------------------------------------------------

@needs("zsh")
def test_zsh_script(scripts: dict[str, Path], shell_env: dict[str, str]) -> None:
    script = scripts["_gestvenv"]
    syntax = subprocess.run(["zsh", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert script.read_text().startswith("#compdef gestvenv")
    add_env("alpha")
    # The completion system's builtins stand in for what they would show, so that the
    # script's own code runs, calls gestvenv and parses its answer.
    code = ("compdef() { : }\n"
            "_describe() { print -rl -- \"${(@P)3}\" }\n"
            "compadd() { print -rl -- \"${(@P)5}\" }\n"
            f"source {shlex.quote(str(script))}\n"
            "words=(gestvenv ephemeral cr); CURRENT=3; _gestvenv_completion\n"
            "print -- ---\n"
            "words=(gestvenv ephemeral show ''); CURRENT=4; _gestvenv_completion\n")
    proc = subprocess.run(["zsh", "-f", "-c", code], env=shell_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands, _, names = proc.stdout.partition("---\n")
    assert [line.split(":")[0] for line in commands.splitlines()] == ["create"]
    assert names.split() == ["alpha"]


@needs("fish")
def test_fish_script(scripts: dict[str, Path], shell_env: dict[str, str]) -> None:
    script = scripts["gestvenv.fish"]
    syntax = subprocess.run(["fish", "--no-execute", str(script)], capture_output=True,
                            text=True)
    assert syntax.returncode == 0, syntax.stderr
    add_env("alpha")
    add_env("beta")
    code = (f"source {shlex.quote(str(script))}\n"
            "complete -C 'gestvenv ephemeral cr'\n"
            "echo ---\n"
            "complete -C 'gestvenv ephemeral show '\n")
    proc = subprocess.run(["fish", "--no-config", "-c", code], env=shell_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands, _, names = proc.stdout.partition("---\n")
    assert [line.split("\t")[0] for line in commands.splitlines()] == ["create"]
    assert "Create environment" in commands
    assert [line.split("\t")[0] for line in names.splitlines()] == ["alpha", "beta"]
