"""Every test runs against its own runtime dir, storage root, cache and config files.

Installs come from a wheelhouse the session builds itself (tests/harness/wheels.py), offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness.gv_env import gestvenv_environ
from tests.harness.wheels import build_wheelhouse


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uv cache for the session (as in real use), on the same filesystem as the envs."""
    return tmp_path_factory.mktemp("uv-cache")


@pytest.fixture(autouse=True)
def gv_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wheelhouse: Path,
            shared_cache: Path, request: pytest.FixtureRequest) -> Path:
    home = tmp_path / "gv"
    (home / "config").mkdir(parents=True)
    env = gestvenv_environ(home, cache=shared_cache, wheelhouse=wheelhouse)
    for key in list(os.environ):
        if key.startswith("GESTVENV_") or key.startswith("UV_"):
            monkeypatch.delenv(key)
    if request.node.get_closest_marker("local_runtime"):
        # Elsewhere the runtime is "auto": local on this host, systemd inside the test host.
        env["GESTVENV_EPHEMERAL_RUNTIME"] = "local"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return home
