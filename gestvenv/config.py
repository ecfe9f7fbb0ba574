"""Configuration: defaults < /etc/gestvenv/config.toml < user file < GESTVENV_EPHEMERAL_* < flags.

Files are read with :mod:`tomllib`; ``gestvenv config set`` edits them with tomlkit so that
comments and layout survive. Every value is checked by one table of options, and a bad value
names its source, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .exceptions import ConfigError, ValidationError
from .models import IsolationLevel, StorageBackend

TABLE = "ephemeral"
ENV_PREFIX = "GESTVENV_EPHEMERAL_"
RUNTIMES = ("auto", "systemd", "local")
BUILDERS = ("auto", "uv", "venv")


def system_config_path() -> Path:
    return Path(os.environ.get("GESTVENV_SYSTEM_CONFIG", "/etc/gestvenv/config.toml"))


def user_config_path() -> Path:
    explicit = os.environ.get("GESTVENV_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gestvenv" / "config.toml"


# --- value parsers: each takes a TOML value or an environment string, returns the typed value ---

def _int(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str):
            value = value.strip()
            if not value.lstrip("-").isdigit():
                raise ValueError
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError
        return value
    parse.__doc__ = f"an integer >= {minimum}"
    return parse


def _bool(value: Any) -> bool:
    """true or false"""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in allowed:
            raise ValueError
        return value.lower()
    parse.__doc__ = "one of " + ", ".join(repr(a) for a in allowed)
    return parse


def _enum(cls: type[IsolationLevel] | type[StorageBackend]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        try:
            return cls.parse(value)
        except ValidationError:
            raise ValueError from None
    parse.__doc__ = "one of " + ", ".join(repr(m.value) for m in cls)
    return parse


def _opt_str(value: Any) -> str | None:
    """a non-empty string"""
    if not isinstance(value, str) or not value.strip():
        raise ValueError
    return value


def _opt_path(value: Any) -> Path | None:
    """an absolute path"""
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError
    return Path(value)


def _storage_root(value: Any) -> Path | None:
    """an absolute path without ':' (each env's bin dir goes on PATH, which ':' splits)"""
    path = _opt_path(value)
    if ":" in str(path):
        raise ValueError
    return path


def _str_list(value: Any) -> tuple[str, ...]:
    """a list of strings (in a variable: separated by spaces)"""
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError


@dataclass(frozen=True)
class Option:
    parse: Callable[[Any], Any]
    help: str


OPTIONS: dict[str, Option] = {
    "default_ttl": Option(_int(0), "seconds an environment lives at most (0: no TTL)"),
    "idle_timeout": Option(_int(0), "seconds without a command before an env is removed (0: off)"),
    "max_ttl": Option(_int(0), "seconds an env may live with its TTL extended (0: a TTL is fixed; "
                               "above it, systemd's RuntimeMaxSec is this and the TTL is held "
                               "by the env's holder)"),
    "max_concurrent": Option(_int(1), "environments a user may have at once"),
    "max_total_memory_mb": Option(_int(1), "sum of max_memory over a user's environments"),
    "storage_backend": Option(_enum(StorageBackend), "where environments live by default"),
    "default_isolation_level": Option(_enum(IsolationLevel), "isolation requested by default"),
    "cleanup_interval": Option(_int(1), "seconds between cleanup sweeps"),
    "runtime": Option(_choice(*RUNTIMES), "which runtime runs environments"),
    "builder": Option(_choice(*BUILDERS), "uv, or python -m venv + pip ('auto': uv if found)"),
    "allow_unenforced_limits": Option(_bool, "create envs even if a limit cannot be enforced"),
    "compile_bytecode": Option(_bool, "write .pyc files when installing packages"),
    "link_mode": Option(_choice("auto", "copy"),
                        "how installed files are made, never as hardlinks the env can write "
                        "(each env's files are its own): auto: reflink (copy-on-write clone) "
                        "where the filesystem has them, else copy, and for root at process "
                        "isolation an overlay of the package set's snapshot; copy: always a "
                        "byte copy"),
    "template_ttl": Option(_int(0), "seconds a resolved package set is reused (0: never)"),
    "python": Option(_opt_str, "default interpreter (a version like '3.12' or a path)"),
    "storage_root": Option(_storage_root, "directory of disk-backed environments"),
    "cache_dir": Option(_opt_path, "the shared package cache (keep it on the disk root's FS)"),
    "find_links": Option(_str_list, "extra local dirs or URLs to find packages in"),
    "index_url": Option(_opt_str, "package index URL (default: the installer's)"),
    "offline": Option(_bool, "never touch the network when installing"),
    "container_engine": Option(_choice("auto", "podman", "docker"),
                               "what runs container isolation: 'auto' is podman, else docker"),
    "preallocate": Option(_bool, "disk backend with max_disk: reserve the image's max_disk MB "
                                 "at creation (false: a sparse image, still capped)"),
    "pool_size": Option(_int(0), "systemd runtime: pre-started env units kept ready for the "
                                 "envs a process owns (0: off)"),
    "pool_idle": Option(_int(1), "seconds an unclaimed pool unit lives before it ends"),
}


@dataclass(frozen=True)
class Config:
    """The effective configuration; ``sources`` says where each non-default value came from."""

    default_ttl: int = 3600
    idle_timeout: int = 0
    max_ttl: int = 0
    max_concurrent: int = 50
    max_total_memory_mb: int = 8192
    storage_backend: StorageBackend = StorageBackend.DISK
    default_isolation_level: IsolationLevel = IsolationLevel.PROCESS
    cleanup_interval: int = 60
    runtime: str = "auto"
    builder: str = "auto"
    allow_unenforced_limits: bool = False
    compile_bytecode: bool = True  # measured: with snapshots, 2x faster first imports
    template_ttl: int = 86400
    link_mode: str = "auto"
    python: str | None = None
    storage_root: Path | None = None
    cache_dir: Path | None = None
    find_links: tuple[str, ...] = ()
    index_url: str | None = None
    offline: bool = False
    # Measured: fallocate of 1 GB costs <10 ms on ext4 (unwritten extents), and an env that
    # was promised max_disk MB gets them even if the host disk fills later.
    preallocate: bool = True
    container_engine: str = "auto"
    pool_size: int = 2
    pool_idle: int = 300
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` (validated; ``None`` values are ignored) from ``source``."""
        source = changes.pop("_source", "argument")
        values: dict[str, Any] = {}
        for key, raw in changes.items():
            if raw is None:
                continue
            values[key] = _parse(key, raw, source)
        sources = {**self.sources, **dict.fromkeys(values, source)}
        return dataclasses.replace(self, **values, sources=sources)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in OPTIONS:
            value = getattr(self, key)
            if isinstance(value, IsolationLevel | StorageBackend):
                value = value.value
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out


def _parse(key: str, raw: Any, source: str) -> Any:
    option = OPTIONS.get(key)
    if option is None:
        known = ", ".join(sorted(OPTIONS))
        raise ConfigError(f"{source}: unknown key {key!r} in [{TABLE}]; known keys: {known}")
    try:
        return option.parse(raw)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{source}: [{TABLE}] {key} = {raw!r} is invalid; allowed: {option.parse.__doc__}"
        ) from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return {}  # the usual case: no file, and no TOML parser to import (CLI start-up)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    import tomllib

    try:
        with f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    table = data.get(TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{TABLE}] must be a table")
    return table


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Read the system file, the user file and the environment, in that order of precedence."""
    environ = os.environ if environ is None else environ
    config = Config()
    for path in (system_config_path(), user_config_path()):
        table = _read_file(path)
        if table:
            config = config.replace(_source=str(path), **table)
    from_env = {
        key[len(ENV_PREFIX):].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX)
    }
    for key, value in from_env.items():
        config = config.replace(_source=f"${ENV_PREFIX}{key.upper()}", **{key: value})
    return config


# --- editing with tomlkit: comments and layout survive ---

def _to_toml_value(value: Any) -> Any:
    if isinstance(value, IsolationLevel | StorageBackend):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def set_value(key: str, raw: str, path: Path) -> Any:
    """Set ``[ephemeral] key`` in the TOML file at ``path`` (created if missing); return the value.

    ``raw`` is parsed as a TOML value when it is one (``3600``, ``true``, ``["a"]``), else taken as
    a string, then checked like any other source.
    """
    import tomlkit  # (only here and in unset_value: the editor, not the reader)

    try:
        parsed: Any = tomlkit.parse(f"v = {raw}")["v"]
        parsed = parsed.unwrap() if hasattr(parsed, "unwrap") else parsed
    except Exception:
        parsed = raw
    source = f"gestvenv config set {key}"
    try:
        value = _to_toml_value(_parse(key, parsed, source))
    except ConfigError:
        if parsed == raw:
            raise
        value = _to_toml_value(_parse(key, raw, source))  # "3.12" meant as a string
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    try:
        doc = tomlkit.parse(text)
    except Exception as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    table = doc.get(TABLE)
    if table is None:
        table = tomlkit.table()
        doc[TABLE] = table
    table[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(tomlkit.dumps(doc))
    os.replace(tmp, path)
    return value


def unset_value(key: str, path: Path) -> bool:
    if key not in OPTIONS:
        raise ConfigError(f"unknown key {key!r}; known keys: {', '.join(sorted(OPTIONS))}")
    import tomlkit

    try:
        doc = tomlkit.parse(path.read_text())
    except FileNotFoundError:
        return False
    table = doc.get(TABLE)
    if table is None or key not in table:
        return False
    del table[key]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(tomlkit.dumps(doc))
    os.replace(tmp, path)
    return True
