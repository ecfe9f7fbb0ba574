"""The CLI: through CliRunner for the logic, as a real subprocess for exit codes and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gestvenv.cli import cli


def gv(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gestvenv", *args], capture_output=True,
                          text=True, input=input, timeout=120)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_create_list_show_cleanup(runner: CliRunner, gv_home: Path) -> None:
    result = runner.invoke(cli, ["ephemeral", "create", "ci-test", "--packages", "six>=1.0,gvdemo",
                                 "--ttl", "3600"])
    assert result.exit_code == 0, result.output
    assert "created ci-test" in result.output

    listed = json.loads(runner.invoke(cli, ["ephemeral", "list", "--json"]).output)
    assert [e["name"] for e in listed] == ["ci-test"]
    assert listed[0]["state"] == "ready"
    assert listed[0]["packages"] == ["six>=1.0", "gvdemo"]
    assert 3590 < listed[0]["expires_at"] - listed[0]["created_at"] <= 3600

    shown = json.loads(runner.invoke(cli, ["ephemeral", "show", "ci-test", "--json"]).output)
    path = Path(shown["path"])
    assert path.is_dir() and path.parent == gv_home / "envs"
    assert shown["enforcement"]["isolation_applied"] == "process"
    assert shown["usage"]["disk_bytes"] > 0
    site = next(path.glob("lib/python*/site-packages"))
    assert (site / "six-1.16.0.dist-info").is_dir()   # ">=1.0" honoured: not 0.9.0

    text = runner.invoke(cli, ["ephemeral", "list"]).output
    assert text.splitlines()[0].split()[:2] == ["NAME", "STATE"]
    assert "ci-test" in text

    result = runner.invoke(cli, ["ephemeral", "cleanup", "ci-test"])
    assert result.exit_code == 0 and "removed ci-test" in result.output
    assert not path.exists()
    assert json.loads(runner.invoke(cli, ["ephemeral", "list", "--json"]).output) == []


def test_run_exits_with_the_commands_status(gv_home: Path, tmp_path: Path) -> None:
    assert gv("ephemeral", "create", "ci-test", "--packages", "gvdemo").returncode == 0
    (tmp_path / "tests").mkdir()
    script = tmp_path / "tests" / "check.py"
    script.write_text("import gvdemo, sys, os\nprint('value', gvdemo.VALUE, sys.prefix)\n"
                      "sys.exit(int(os.environ.get('CODE', '0')))\n")
    ok = subprocess.run([sys.executable, "-m", "gestvenv", "run", "--env", "ci-test", "--",
                         "python", "tests/check.py"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "value 42" in ok.stdout and "ci-test-" in ok.stdout
    failing = subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "exec", "ci-test",
                              "--", "sh", "-c", "exit 7"], capture_output=True, text=True)
    assert failing.returncode == 7
    timed = gv("run", "--env", "ci-test", "--timeout", "0.5", "--", "sleep", "30")
    assert timed.returncode == 124
    assert "timed out" in timed.stderr
    assert gv("run", "--env", "ci-test", "--", "no-such-program").returncode == 127
    junk = tmp_path / "junk"  # executable, but no format the kernel knows (ENOEXEC)
    junk.write_bytes(b"\x7fELF\x00garbage")
    junk.chmod(0o755)
    unexecutable = gv("run", "--env", "ci-test", "--", str(junk))
    assert unexecutable.returncode == 126, unexecutable.stderr  # as a shell: "cannot execute"
    plain = tmp_path / "plain.sh"  # a script without its x bit: 126 too, as in a shell
    plain.write_text("#!/bin/sh\necho hi\n")
    plain.chmod(0o644)
    not_executable = gv("run", "--env", "ci-test", "--", str(plain))
    assert not_executable.returncode == 126 and "is not executable" in not_executable.stderr
    assert gv("run", "--env", "ci-test", "--", str(tmp_path / "absent")).returncode == 127
    assert gv("ephemeral", "cleanup", "--all").returncode == 0


@pytest.mark.local_runtime
def test_user_errors_are_one_line_without_traceback(gv_home: Path) -> None:
    for args in (["ephemeral", "create", "../x"], ["ephemeral", "create", "a;b"],
                 ["ephemeral", "show", "nope"], ["run", "--env", "nope", "--", "true"],
                 ["ephemeral", "create", "x", "--cpu", "20"],
                 ["config", "set", "default_ttl", "soon"]):
        proc = gv(*args)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr, args
        assert proc.stderr.startswith("gestvenv: error: "), (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
    # and nothing was created by any of them
    assert json.loads(gv("ephemeral", "list", "--json").stdout) == []


@pytest.mark.local_runtime
def test_unenforced_limits_are_reported(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["ephemeral", "create", "lim", "--cpu", "20", "--memory", "256",
                                 "--allow-unenforced", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{"):])
    limits = info["enforcement"]["limits"]
    assert limits["max_cpu_percent"]["enforced"] is False
    assert limits["max_memory"]["enforced"] is True
    shown = runner.invoke(cli, ["ephemeral", "show", "lim"]).output
    assert "max_cpu_percent = 20.0: NOT enforced" in shown
    assert runner.invoke(cli, ["ephemeral", "cleanup", "lim"]).exit_code == 0


def test_cleanup_needs_a_target_and_reports(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["ephemeral", "cleanup"])
    assert result.exit_code != 0 and "say what to clean up" in result.output
    result = runner.invoke(cli, ["ephemeral", "cleanup", "--expired", "--orphans", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == {"removed": {}, "orphan_paths": [], "errors": {}}
    said = runner.invoke(cli, ["ephemeral", "cleanup", "--expired", "--orphans"])
    assert (said.exit_code, said.output) == (0, "nothing to clean up\n")
    # --quiet (the timer's sweep): nothing to say when nothing was done, but what was done is.
    quiet = runner.invoke(cli, ["ephemeral", "cleanup", "--expired", "--orphans", "--quiet"])
    assert (quiet.exit_code, quiet.output) == (0, "")
    assert runner.invoke(cli, ["ephemeral", "create", "gone"]).exit_code == 0
    quiet = runner.invoke(cli, ["ephemeral", "cleanup", "gone", "-q"])
    assert (quiet.exit_code, quiet.output) == (0, "removed gone (requested)\n")


def test_cleanup_expired(runner: CliRunner) -> None:
    assert runner.invoke(cli, ["ephemeral", "create", "short", "--ttl", "1"]).exit_code == 0
    assert runner.invoke(cli, ["ephemeral", "create", "long", "--ttl", "600"]).exit_code == 0
    import time
    time.sleep(1.2)
    result = runner.invoke(cli, ["ephemeral", "cleanup", "--expired", "--json"])
    removed = json.loads(result.output)["removed"]
    # the watchdog may have been quicker than us: either way "short" is gone and "long" is not
    names = [e["name"] for e in json.loads(runner.invoke(cli, ["ephemeral", "list",
                                                               "--json"]).output)]
    assert names == ["long"]
    assert set(removed) <= {"short"}
    runner.invoke(cli, ["ephemeral", "cleanup", "--all"])


def test_stats(runner: CliRunner) -> None:
    runner.invoke(cli, ["ephemeral", "create", "s1", "--packages", "gvdemo"])
    runner.invoke(cli, ["ephemeral", "create", "s2", "--storage", "memory"])
    data = json.loads(runner.invoke(cli, ["ephemeral", "stats", "--json"]).output)
    assert data["environments"] == 2
    assert data["by_storage"] == {"disk": 1, "memory": 1}
    assert data["disk_bytes"] > 0 and data["cache_bytes"] > 0
    assert "environments: 2 of max 50" in runner.invoke(cli, ["ephemeral", "stats"]).output
    runner.invoke(cli, ["ephemeral", "cleanup", "--all"])


def test_interactive_shell_destroys_on_exit(gv_home: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "create", "shell",
                           "--packages", "gvdemo", "--interactive"],
                          input='python -c "import gvdemo; print(gvdemo.VALUE)"\n'
                                'echo "$VIRTUAL_ENV"\nexit 3\n',
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SHELL": "/bin/sh"})
    assert proc.returncode == 3, proc.stderr
    assert "42" in proc.stdout and "shell-" in proc.stdout
    assert "destroyed" in proc.stderr
    assert json.loads(gv("ephemeral", "list", "--json").stdout) == []


def test_config_set_keeps_comments_and_show_names_sources(runner: CliRunner,
                                                          gv_home: Path) -> None:
    path = gv_home / "config" / "gestvenv" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text("# my settings\n[ephemeral]\n# keep envs short\ndefault_ttl = 60\n")
    result = runner.invoke(cli, ["config", "set", "max_concurrent", "7"])
    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert "# my settings" in text and "# keep envs short" in text and "max_concurrent = 7" in text
    assert runner.invoke(cli, ["config", "get", "max_concurrent"]).output.strip() == "7"
    shown = json.loads(runner.invoke(cli, ["config", "show", "--json"]).output)
    assert shown["values"]["default_ttl"] == 60
    assert shown["sources"]["default_ttl"] == str(path)
    bad = runner.invoke(cli, ["config", "set", "storage_backend", "floppy"])
    assert bad.exit_code == 1
    assert "storage_backend" in bad.output and "'disk'" in bad.output
    assert runner.invoke(cli, ["config", "unset", "max_concurrent"]).exit_code == 0
    assert "max_concurrent" not in path.read_text()


def test_bad_config_file_names_file_key_and_allowed(gv_home: Path) -> None:
    path = gv_home / "config" / "gestvenv" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text("[ephemeral]\nmax_concurrent = 0\n")
    proc = gv("ephemeral", "list")
    assert proc.returncode == 1
    assert str(path) in proc.stderr and "max_concurrent" in proc.stderr and ">= 1" in proc.stderr


def test_max_concurrent_enforced_at_create(runner: CliRunner,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_MAX_CONCURRENT", "1")
    assert runner.invoke(cli, ["ephemeral", "create", "one"]).exit_code == 0
    result = runner.invoke(cli, ["ephemeral", "create", "two"])
    assert result.exit_code == 1 and "max_concurrent is 1" in result.output
    runner.invoke(cli, ["ephemeral", "cleanup", "--all"])


@pytest.mark.parametrize(("given", "expected"), [
    (("six>=1.0,gvdemo",), ["six>=1.0", "gvdemo"]),
    (("six>=1.0,<2",), ["six>=1.0,<2"]),
    (("pkg[a,b]>=1, other",), ["pkg[a,b]>=1", "other"]),
    (("a", "b,c"), ["a", "b", "c"]),
    (("x!=1.5,~=1.2, y",), ["x!=1.5,~=1.2", "y"]),
])
def test_split_packages_keeps_specs_intact(given: tuple[str, ...], expected: list[str]) -> None:
    from gestvenv.cli.ephemeral import split_packages

    assert split_packages(given) == expected


def test_the_issues_cli_example_as_written(gv_home: Path, tmp_path: Path) -> None:
    """create --requirements --ttl; list from another process; run pytest; show; cleanup."""
    (tmp_path / "requirements.txt").write_text("requests\npytest\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_app.py").write_text(
        "import requests\n\ndef test_get():\n    assert requests.get('x') == 'x'\n")

    def sh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["gestvenv", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**os.environ,
                                                "PATH": f"{Path(sys.executable).parent}:"
                                                        f"{os.environ['PATH']}"})

    created = sh("ephemeral", "create", "ci-test", "--requirements", "requirements.txt",
                 "--ttl", "3600")
    assert created.returncode == 0, created.stderr
    listed = sh("ephemeral", "list")
    assert "ci-test" in listed.stdout and "ready" in listed.stdout
    ran = sh("run", "--env", "ci-test", "--", "pytest", "tests/")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "1 passed, 0 failed" in ran.stdout
    (tmp_path / "tests" / "test_app.py").write_text("def test_fails():\n    assert False\n")
    assert sh("run", "--env", "ci-test", "--", "pytest", "tests/").returncode == 1
    shown = json.loads(sh("ephemeral", "show", "ci-test", "--json").stdout)
    path = Path(shown["path"])
    assert (path / "bin" / "pytest").exists()
    stats = sh("ephemeral", "stats")
    assert "environments: 1" in stats.stdout
    assert sh("ephemeral", "cleanup", "ci-test").returncode == 0
    assert not path.exists()
    assert json.loads(sh("ephemeral", "list", "--json").stdout) == []
    assert list((gv_home / "run" / "envs").iterdir()) == []


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="systemd is PID 1 here")
def test_the_systemd_runtime_is_refused_clearly_where_systemd_does_not_run() -> None:
    proc = gv("ephemeral", "create", "nosd", "--runtime", "systemd")
    assert proc.returncode != 0
    assert proc.stderr.startswith("gestvenv: error: the systemd runtime needs systemd as PID 1")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert json.loads(gv("ephemeral", "list", "--json").stdout) == []
    # "auto" falls back to the local runtime here, and says which one it used.
    assert gv("ephemeral", "create", "auto-rt").returncode == 0
    [info] = json.loads(gv("ephemeral", "list", "--json").stdout)
    assert info["runtime"] == "local"
    assert gv("ephemeral", "cleanup", "auto-rt").returncode == 0


def test_config_show_prints_toml_that_loads_back(runner: CliRunner, gv_home: Path) -> None:
    """What `config show` prints is a config file: copied into one, it gives the same values."""
    import tomllib

    from gestvenv.config import Config, load_config

    runner.invoke(cli, ["config", "set", "find_links", '["/wheels"]'])
    shown = runner.invoke(cli, ["config", "show"]).output
    assert "# python =   (unset)" in shown and "offline = true" in shown  # (the test home's)
    table = tomllib.loads(shown)["ephemeral"]
    assert Config().replace(_source="shown", **table).as_dict() == load_config().as_dict()
