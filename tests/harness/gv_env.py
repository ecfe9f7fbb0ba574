"""The variables that give a test's gestvenv a home of its own (runtime dir, config files,
storage root, uv cache) and an offline wheelhouse: one layout for the test fixtures and for the
scripts the tests run as other users."""

from __future__ import annotations

from pathlib import Path


def gestvenv_environ(home: Path, *, cache: Path, wheelhouse: Path) -> dict[str, str]:
    return {
        "GESTVENV_RUNTIME_DIR": str(home / "run"),
        "GESTVENV_SYSTEM_CONFIG": str(home / "etc-config.toml"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "GESTVENV_EPHEMERAL_STORAGE_ROOT": str(home / "envs"),
        "GESTVENV_EPHEMERAL_CACHE_DIR": str(cache),
        "GESTVENV_EPHEMERAL_FIND_LINKS": str(wheelhouse),
        "GESTVENV_EPHEMERAL_OFFLINE": "1",
        # No pool unit by default: tests see their envs' named units (tests that are about the
        # pool, or include it, turn it on).
        "GESTVENV_EPHEMERAL_POOL_SIZE": "0",
    }
