"""``gestvenv config``: show, get, set and unset the [ephemeral] settings."""

from __future__ import annotations

import click

from ..config import (
    OPTIONS,
    load_config,
    set_value,
    system_config_path,
    unset_value,
    user_config_path,
)
from ._common import UserError, echo_json, handle_errors


def _target(system: bool):  # type: ignore[no-untyped-def]
    return system_config_path() if system else user_config_path()


@click.group("config")
def config_group() -> None:
    """Show and edit configuration (comments in the files are kept)."""
    from .remote import refuse

    refuse("config")


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def show(as_json: bool) -> None:
    """Every setting, its effective value and where it comes from."""
    config = load_config()
    values = config.as_dict()
    if as_json:
        echo_json({"values": values, "sources": dict(config.sources),
                   "files": {"system": str(system_config_path()),
                             "user": str(user_config_path())}})
        return
    # Valid TOML, as the file takes it: what is printed can be copied into a config file.
    import tomlkit

    click.echo(f"# system file: {system_config_path()}\n# user file:   {user_config_path()}")
    click.echo("[ephemeral]")
    for key, value in values.items():
        source = config.sources.get(key, "default")
        setting = f"# {key} =   (unset)" if value is None else \
            f"{key} = {tomlkit.item(value).as_string()}"
        click.echo(setting.ljust(48) + f"  # {source}; {OPTIONS[key].help}")


def _complete_key(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Config keys for shell completion (``config get|set|unset <TAB>``)."""
    return sorted(k for k in OPTIONS if k.startswith(incomplete))


@config_group.command("get")
@click.argument("key", shell_complete=_complete_key)
@handle_errors
def get(key: str) -> None:
    """Print the effective value of KEY."""
    values = load_config().as_dict()
    if key not in values:
        raise UserError(f"unknown key {key!r}; known keys: {', '.join(sorted(values))}")
    value = values[key]
    click.echo("" if value is None else (" ".join(value) if isinstance(value, list) else value))


@config_group.command("set")
@click.argument("key", shell_complete=_complete_key)
@click.argument("value")
@click.option("--system", is_flag=True, help="Edit the system-wide file instead of yours.")
@handle_errors
def set_(key: str, value: str, system: bool) -> None:
    """Set KEY to VALUE in your config file (or the system one)."""
    path = _target(system)
    stored = set_value(key, value, path)
    click.echo(f"{path}: [ephemeral] {key} = {stored!r}")


@config_group.command("unset")
@click.argument("key", shell_complete=_complete_key)
@click.option("--system", is_flag=True, help="Edit the system-wide file instead of yours.")
@handle_errors
def unset(key: str, system: bool) -> None:
    """Remove KEY from your config file (or the system one)."""
    path = _target(system)
    if not unset_value(key, path):
        raise UserError(f"{key} is not set in {path}")
    click.echo(f"{path}: [ephemeral] {key} removed")
