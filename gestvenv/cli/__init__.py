"""The ``gestvenv`` command: a thin shell over the library, one module per command group."""

from __future__ import annotations

import click

from .. import __version__
from ._common import handle_errors, run_foreground
from ._complete import complete_env_name
from .config import config_group
from .ephemeral import ephemeral_group
from .images import images_group
from .manifest import manifest_command
from .serve import serve_command
from .timer import timer_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gestvenv")
@click.option("--host", metavar="URL",
              help="Act through a gestvenv service (`gestvenv serve`), e.g. "
                   "unix:///run/gestvenv/api.sock; default: GESTVENV_HOST, else this machine.")
@click.pass_context
def cli(ctx: click.Context, host: str | None) -> None:
    """Ephemeral Python environments, destroyed with a guarantee."""
    if host:
        ctx.meta["gestvenv.host"] = host


# Everything after the options is the command's, "--" or not: "run --env x python --help".
_COMMAND_SETTINGS = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@cli.command("run", context_settings=_COMMAND_SETTINGS)
@click.option("--env", "env_name", required=True, metavar="NAME",
              shell_complete=complete_env_name, help="The environment to run in.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Kill the command (and its children) after this many seconds.")
@click.option("--cwd", type=click.Path(exists=True, file_okay=False), help="Working directory.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def run_command(env_name: str, timeout: float | None, cwd: str | None,
                command: tuple[str, ...]) -> None:
    """Run COMMAND in environment NAME; exit with the command's status.

    \b
    Example: gestvenv run --env ci-test -- pytest tests/
    """
    from . import remote

    if remote.host() is not None:
        raise SystemExit(remote.execute(env_name, command, timeout=timeout, cwd=cwd))
    from ..context import attach

    raise SystemExit(run_foreground(attach(env_name), command, timeout=timeout, cwd=cwd))


ephemeral_group.add_command(timer_group)  # gestvenv ephemeral timer install|uninstall|status
ephemeral_group.add_command(images_group)  # gestvenv ephemeral images [prune|save|load]
ephemeral_group.add_command(manifest_command)  # gestvenv ephemeral manifest NAME
cli.add_command(ephemeral_group)
cli.add_command(config_group)
cli.add_command(serve_command)  # gestvenv serve: the REST API


def main() -> None:
    cli(prog_name="gestvenv")
