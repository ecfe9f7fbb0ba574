"""Configuration: defaults < system file < user file < GESTVENV_EPHEMERAL_* variables.

The autouse ``gv_home`` fixture points GESTVENV_SYSTEM_CONFIG and XDG_CONFIG_HOME into the test's
own directory and already sets a few GESTVENV_EPHEMERAL_* variables (storage root, cache, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gestvenv import Config, ConfigError, IsolationLevel, StorageBackend, load_config
from gestvenv.config import OPTIONS, set_value, system_config_path, unset_value, user_config_path


@pytest.fixture
def system_file() -> Path:
    path = Path(os.environ["GESTVENV_SYSTEM_CONFIG"])
    assert system_config_path() == path
    return path


@pytest.fixture
def user_file() -> Path:
    path = Path(os.environ["XDG_CONFIG_HOME"]) / "gestvenv" / "config.toml"
    assert user_config_path() == path
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_defaults_without_files_or_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("GESTVENV_EPHEMERAL_"):
            monkeypatch.delenv(key)
    config = load_config()
    assert config == Config()
    assert dict(config.sources) == {}


def test_precedence_system_user_environment(system_file: Path, user_file: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    system_file.write_text(
        "[ephemeral]\ndefault_ttl = 100\nmax_concurrent = 5\nidle_timeout = 7\n")
    user_file.write_text("[ephemeral]\ndefault_ttl = 200\nmax_concurrent = 6\n")
    monkeypatch.setenv("GESTVENV_EPHEMERAL_DEFAULT_TTL", "300")

    config = load_config()
    assert config.idle_timeout == 7        # only in the system file
    assert config.max_concurrent == 6      # user file beats system file
    assert config.default_ttl == 300       # variable beats both files
    assert config.sources["idle_timeout"] == str(system_file)
    assert config.sources["max_concurrent"] == str(user_file)
    assert config.sources["default_ttl"] == "$GESTVENV_EPHEMERAL_DEFAULT_TTL"
    assert "cleanup_interval" not in config.sources  # a default has no source

    monkeypatch.delenv("GESTVENV_EPHEMERAL_DEFAULT_TTL")
    assert load_config().default_ttl == 200
    user_file.unlink()
    config = load_config()
    assert config.default_ttl == 100
    assert config.max_concurrent == 5


def test_explicit_environ_mapping_replaces_os_environ(system_file: Path) -> None:
    system_file.write_text("[ephemeral]\nmax_concurrent = 5\n")
    config = load_config({"GESTVENV_EPHEMERAL_MAX_CONCURRENT": "9", "UNRELATED": "x"})
    assert config.max_concurrent == 9
    assert config.storage_root is None  # the fixture's variables are not read from os.environ


def test_gestvenv_config_variable_names_the_user_file(tmp_path: Path, user_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    user_file.write_text("[ephemeral]\nmax_concurrent = 6\n")
    other = tmp_path / "other.toml"
    other.write_text("[ephemeral]\nmax_concurrent = 11\n")
    monkeypatch.setenv("GESTVENV_CONFIG", str(other))
    assert user_config_path() == other
    config = load_config()
    assert config.max_concurrent == 11
    assert config.sources["max_concurrent"] == str(other)


def test_values_are_typed(user_file: Path) -> None:
    user_file.write_text(
        "[ephemeral]\n"
        'storage_backend = "MEMORY"\n'
        'default_isolation_level = "namespace"\n'
        "offline = false\n"
        'find_links = ["/a", "/b"]\n'
        'storage_root = "/srv/envs"\n'
        'python = "3.11"\n'
    )
    config = load_config({})
    assert config.storage_backend is StorageBackend.MEMORY
    assert config.default_isolation_level is IsolationLevel.NAMESPACE
    assert config.offline is False
    assert config.find_links == ("/a", "/b")
    assert config.storage_root == Path("/srv/envs")
    assert config.python == "3.11"


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("OFFLINE", "yes", True),
    ("OFFLINE", "0", False),
    ("FIND_LINKS", "/a  /b", ("/a", "/b")),
    ("MAX_CONCURRENT", " 12 ", 12),
    ("STORAGE_BACKEND", "tmpfs", StorageBackend.TMPFS),
    ("BUILDER", "VENV", "venv"),
])
def test_environment_strings_are_parsed(monkeypatch: pytest.MonkeyPatch, variable: str,
                                        value: str, expected: object) -> None:
    monkeypatch.setenv(f"GESTVENV_EPHEMERAL_{variable}", value)
    assert getattr(load_config(), variable.lower()) == expected


@pytest.mark.parametrize(("line", "key", "allowed"), [
    ("max_concurrent = 0", "max_concurrent", "an integer >= 1"),
    ("default_ttl = -1", "default_ttl", "an integer >= 0"),
    ("default_ttl = true", "default_ttl", "an integer >= 0"),
    ('default_ttl = "soon"', "default_ttl", "an integer >= 0"),
    ('storage_backend = "floppy"', "storage_backend", "one of 'tmpfs', 'memory', 'disk'"),
    ('runtime = "docker"', "runtime", "one of 'auto', 'systemd', 'local'"),
    ('offline = "maybe"', "offline", "true or false"),
    ('storage_root = "relative/dir"', "storage_root", "an absolute path"),
    ('storage_root = "/srv/a:b"', "storage_root", "an absolute path without ':'"),
    ("find_links = [1, 2]", "find_links", "a list of strings"),
])
def test_bad_file_value_names_file_key_and_allowed(user_file: Path, line: str, key: str,
                                                   allowed: str) -> None:
    user_file.write_text(f"# my settings\n[ephemeral]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config()
    message = str(info.value)
    assert str(user_file) in message
    assert key in message
    assert f"allowed: {allowed}" in message


def test_bad_system_file_value_names_the_system_file(system_file: Path) -> None:
    system_file.write_text("[ephemeral]\ncleanup_interval = 0\n")
    with pytest.raises(ConfigError, match="cleanup_interval") as info:
        load_config()
    assert str(system_file) in str(info.value)


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_MAX_CONCURRENT", "lots")
    with pytest.raises(ConfigError) as info:
        load_config()
    message = str(info.value)
    assert "$GESTVENV_EPHEMERAL_MAX_CONCURRENT" in message
    assert "'lots'" in message
    assert "an integer >= 1" in message


def test_unknown_key_in_file_lists_known_keys(user_file: Path) -> None:
    user_file.write_text("[ephemeral]\nmax_concurent = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config()
    message = str(info.value)
    assert str(user_file) in message
    assert "unknown key 'max_concurent'" in message
    for key in OPTIONS:
        assert key in message


def test_unknown_environment_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_TTL", "5")
    with pytest.raises(ConfigError, match="unknown key 'ttl'"):
        load_config()


def test_other_tables_are_ignored(user_file: Path) -> None:
    user_file.write_text('[other]\nanything = "goes"\n[ephemeral]\nmax_concurrent = 4\n')
    assert load_config().max_concurrent == 4


@pytest.mark.parametrize(("text", "match"), [
    ("[ephemeral\nmax_concurrent = 4\n", "not valid TOML"),
    ("ephemeral = 3\n", r"\[ephemeral\] must be a table"),
])
def test_broken_file_is_reported_with_its_path(user_file: Path, text: str, match: str) -> None:
    user_file.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config()
    assert str(user_file) in str(info.value)


def test_replace_validates_and_records_source() -> None:
    config = Config().replace(max_concurrent="3", default_ttl=None, _source="--flag")
    assert config.max_concurrent == 3
    assert config.default_ttl == Config().default_ttl
    assert dict(config.sources) == {"max_concurrent": "--flag"}
    with pytest.raises(ConfigError, match="--flag"):
        Config().replace(max_concurrent=0, _source="--flag")


def test_as_dict_covers_every_option_with_plain_values() -> None:
    data = Config(storage_backend=StorageBackend.MEMORY, storage_root=Path("/x"),
                  find_links=("a",)).as_dict()
    assert set(data) == set(OPTIONS)
    assert data["storage_backend"] == "memory"
    assert data["storage_root"] == "/x"
    assert data["find_links"] == ["a"]


# --- editing files: comments and layout survive ---

COMMENTED = """\
# gestvenv user settings -- keep this comment
[other]
keep = "me"  # an inline comment elsewhere

[ephemeral]
# how long environments live
default_ttl = 60  # one minute
"""


def test_set_value_keeps_comments_and_other_keys(user_file: Path) -> None:
    user_file.write_text(COMMENTED)
    assert set_value("max_concurrent", "7", user_file) == 7
    text = user_file.read_text()
    for comment in ("# gestvenv user settings -- keep this comment",
                    "# an inline comment elsewhere", "# how long environments live",
                    "# one minute"):
        assert comment in text
    assert 'keep = "me"' in text
    config = load_config({})
    assert config.max_concurrent == 7
    assert config.default_ttl == 60
    assert config.sources["max_concurrent"] == str(user_file)


def test_set_value_replaces_an_existing_key(user_file: Path) -> None:
    user_file.write_text(COMMENTED)
    set_value("default_ttl", "120", user_file)
    assert load_config({}).default_ttl == 120
    assert user_file.read_text().count("default_ttl") == 1
    assert "# how long environments live" in user_file.read_text()


@pytest.mark.parametrize(("key", "raw", "expected"), [
    ("storage_backend", "memory", StorageBackend.MEMORY),
    ("storage_backend", '"tmpfs"', StorageBackend.TMPFS),
    ("offline", "true", True),
    ("find_links", '["/w1", "/w2"]', ("/w1", "/w2")),
    ("storage_root", "/srv/gv", Path("/srv/gv")),
    ("index_url", "https://example.invalid/simple", "https://example.invalid/simple"),
])
def test_set_value_parses_and_stores_typed_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  key: str, raw: str, expected: object) -> None:
    path = tmp_path / "new" / "config.toml"  # created, with its directory
    set_value(key, raw, path)
    assert not list(path.parent.glob(".*.tmp"))
    monkeypatch.setenv("GESTVENV_CONFIG", str(path))
    assert getattr(load_config({}), key) == expected


@pytest.mark.parametrize("version", ["3.12", "3", "3.11.7"])
def test_set_value_python_version_stays_a_string(user_file: Path, version: str) -> None:
    """A version like 3.12 parses as a TOML float; for a string key the string is meant."""
    set_value("python", version, user_file)
    assert load_config({}).python == version


def test_set_value_refuses_bad_values_and_leaves_file_alone(user_file: Path) -> None:
    user_file.write_text(COMMENTED)
    with pytest.raises(ConfigError, match="max_concurrent") as info:
        set_value("max_concurrent", "0", user_file)
    assert "an integer >= 1" in str(info.value)
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        set_value("nope", "1", user_file)
    assert user_file.read_text() == COMMENTED


def test_set_value_refuses_to_edit_a_broken_file(user_file: Path) -> None:
    user_file.write_text("[ephemeral\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        set_value("max_concurrent", "3", user_file)
    assert user_file.read_text() == "[ephemeral\n"


def test_unset_value(user_file: Path) -> None:
    user_file.write_text(COMMENTED)
    assert unset_value("default_ttl", user_file) is True
    assert unset_value("default_ttl", user_file) is False
    assert "# gestvenv user settings -- keep this comment" in user_file.read_text()
    assert load_config({}).default_ttl == Config().default_ttl
    assert unset_value("default_ttl", user_file.parent / "missing.toml") is False
    with pytest.raises(ConfigError, match="unknown key"):
        unset_value("nope", user_file)
