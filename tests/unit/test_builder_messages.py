"""A failed install names what it was given (a requirements file too, not an empty list); the
builder without uv finds its pip and gives each env a pip of gestvenv's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from gestvenv.builder import _install_what


def test_an_install_names_its_requirements_files_and_packages() -> None:
    assert _install_what([], [Path("/w/requirements.txt")]) == "-r /w/requirements.txt"
    assert _install_what(["six", "rich>=13"], [Path("/w/r.txt")]) == "-r /w/r.txt six rich>=13"
    assert _install_what(["six"], []) == "six"


def test_an_install_inside_gets_the_proxy_and_ca_settings_and_nothing_else() -> None:
    from gestvenv.builder import _passed_inside

    for name in ("UV_INDEX_URL", "LANG", "LC_ALL", "HTTPS_PROXY", "no_proxy", "SSL_CERT_FILE"):
        assert _passed_inside(name, "UV_"), name
    for name in ("AWS_SECRET_ACCESS_KEY", "HOME", "PIP_INDEX_URL", "GITHUB_TOKEN"):
        assert not _passed_inside(name, "UV_"), name
    assert _passed_inside("PIP_INDEX_URL", "PIP_")


def test_a_refusal_to_build_is_recognised_even_wrapped_by_a_terminal() -> None:
    from gestvenv.builder import _NEEDS_BUILD, _PIP_NO_WHEEL, _one_line

    uv = ("hint: Wheels are required for `gvevil` because building from\r\n      source is "
          "disabled for all packages (i.e., with `--no-build`)")
    assert _NEEDS_BUILD.search(_one_line(uv))
    pip = "ERROR: No matching distribution\n found for gvevil"
    assert _PIP_NO_WHEEL.search(_one_line(pip))
    assert not _PIP_NO_WHEEL.search(_one_line("ERROR: [Errno 28] No space left on device"))


def test_without_a_pip_of_its_own_python_the_newest_ensurepip_wheel_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from gestvenv import builder

    for name in ("pip-9.0.1-py2.py3-none-any.whl", "pip-23.0.1-py3-none-any.whl",
                 "setuptools-66.1.1-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "pip" else real(name))
    monkeypatch.setattr(builder, "_wheel_dirs", lambda: [str(tmp_path / "none"), str(tmp_path)])
    wheel = str(tmp_path / "pip-23.0.1-py3-none-any.whl")
    assert builder.find_pip.__wrapped__() == builder.Pip(f"{wheel}/pip", wheel, "23.0.1")
    monkeypatch.setattr(builder, "_wheel_dirs", lambda: [str(tmp_path / "none")])
    assert builder.find_pip.__wrapped__() is None


def test_the_pip_of_gestvenvs_python_is_run_by_its_runner() -> None:
    from gestvenv.builder import find_pip

    pip = find_pip()
    assert pip is not None and pip.runner == f"{pip.location}/__pip-runner__.py"
    assert Path(pip.runner).is_file() and pip.version[0].isdigit()


def test_the_envs_pip_runs_the_one_pip_with_gestvenvs_settings(tmp_path: Path) -> None:
    from gestvenv.builder import Interpreter, Pip, write_pip_runner_shim
    from gestvenv.config import Config

    env = tmp_path / "my env"
    (env / "bin").mkdir(parents=True)
    config = Config(find_links=("/w1", "/w2"), offline=True, compile_bytecode=False)
    write_pip_runner_shim(env, Interpreter("/usr/bin/python3.11", "3.11.2"),
                          Pip("/p/pip/__pip-runner__.py", "/p/pip", "23.0.1"), config)
    names = sorted(p.name for p in (env / "bin").iterdir())
    assert names == ["pip", "pip3", "pip3.11"]
    text = (env / "bin" / "pip").read_text()
    assert text.startswith("#!/bin/sh\n")
    last = text.splitlines()[-1]
    assert last == (f"PIP_CACHE_DIR='{env}/.gestvenv/pip-cache' PIP_DISABLE_PIP_VERSION_CHECK=1 "
                    "PIP_COMPILE=0 PIP_NO_INDEX=1 PIP_FIND_LINKS='/w1 /w2' "
                    f"exec '{env}/bin/python' /p/pip/__pip-runner__.py \"$@\"")
