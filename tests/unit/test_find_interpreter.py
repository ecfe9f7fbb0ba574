"""A version is found past a candidate that cannot run it (a pyenv shim for a version not
selected), and a wrong one is not taken for it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from gestvenv.builder import find_interpreter
from gestvenv.exceptions import ValidationError

HERE = f"{sys.version_info.major}.{sys.version_info.minor}"


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr("gestvenv.builder._uv_find_python", lambda spec: None)
    monkeypatch.setenv("PATH", f"{tmp_path / 'shims'}:{tmp_path / 'real'}")
    return tmp_path


def test_a_broken_shim_first_on_path_does_not_hide_a_real_interpreter(fake_path: Path) -> None:
    _script(fake_path / "shims" / f"python{HERE}", "#!/bin/sh\necho 'not selected' >&2\nexit 127\n")
    (fake_path / "real").mkdir()
    os.symlink(sys.executable, fake_path / "real" / f"python{HERE}")
    found = find_interpreter(HERE)
    assert found.version.startswith(f"{HERE}.")


def test_what_was_tried_is_said(fake_path: Path) -> None:
    _script(fake_path / "shims" / "python3.99", "#!/bin/sh\nexit 127\n")
    (fake_path / "real").mkdir()
    os.symlink(sys.executable, fake_path / "real" / "python3.99")  # a 3.11 (say) named 3.99
    with pytest.raises(ValidationError) as raised:
        find_interpreter("3.99")
    message = str(raised.value)
    assert message.startswith("no usable Python interpreter for '3.99': ")
    assert f"{fake_path}/shims/python3.99 does not run (exit status 127)" in message
    assert f"{fake_path}/real/python3.99 is Python {sys.version.split()[0]}" in message
    with pytest.raises(ValidationError, match=r"no Python interpreter found for '3\.98'"):
        find_interpreter("3.98")
