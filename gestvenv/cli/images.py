"""``gestvenv ephemeral images``: the container images gestvenv generated (list, prune, save,
load)."""

from __future__ import annotations

import datetime
from pathlib import Path

import click

from ..config import load_config
from ._common import UserError, echo_json, handle_errors, human_bytes, table


@click.group("images", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def images_group(ctx: click.Context, as_json: bool) -> None:
    """The images of container isolation: a base image per interpreter and one per package
    set, generated here (no registry). Without a subcommand: list them."""
    from .remote import refuse

    refuse("ephemeral images")
    from ..container import images
    from ..runtime import container

    if ctx.invoked_subcommand is not None:
        return
    engine = container.engine_for(load_config().container_engine)
    found = images.list_images(engine)
    if as_json:
        echo_json([vars(i) for i in found])
        return
    if not found:
        click.echo(f"no gestvenv image ({engine.name})")
        return
    rows = [(i.ref, i.kind, i.key[:12], human_bytes(i.size_bytes),
             datetime.datetime.fromtimestamp(i.created).strftime("%Y-%m-%d %H:%M"))
            for i in found]
    table(rows, ("IMAGE", "KIND", "KEY", "SIZE", "CREATED"))


@images_group.command("prune")
@click.option("--all", "everything", is_flag=True,
              help="Every gestvenv image no container uses, not only those of package sets "
                   "no longer snapshotted.")
@handle_errors
def prune(everything: bool) -> None:
    """Remove the images of package sets whose snapshot has expired (``template_ttl``), and
    base images nothing uses; an image a container uses is kept."""
    from .. import storage
    from ..container import images
    from ..runtime import container

    config = load_config()
    engine = container.engine_for(config.container_engine)
    removed = images.prune(engine, container.live_template_keys(config),
                           everything=everything,
                           snapshots=None if everything else
                           str(storage.templates_dir(config)))
    for ref in removed:
        click.echo(f"removed {ref}")
    if not removed:
        click.echo("nothing to remove")


@images_group.command("save")
@click.argument("image", required=False)
@click.option("--env", "env_name", metavar="NAME",
              help="The image of this environment's package set.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), required=True,
              help="The archive to write (docker-archive format).")
@handle_errors
def save(image: str | None, env_name: str | None, output: str) -> None:
    """Write IMAGE (or an environment's package-set image) to an archive that `podman load`
    or `docker load` takes elsewhere."""
    from ..container import images
    from ..context import attach
    from ..runtime import container

    if (image is None) == (env_name is None):
        raise UserError("give an IMAGE or --env NAME (one of them)")
    engine = container.engine_for(load_config().container_engine)
    if env_name is not None:
        facts = attach(env_name).container or {}
        image = facts.get("packages_image") or facts.get("image")
        if not image:
            raise UserError(f"environment {env_name!r} has no container image (its isolation "
                            "is not container)")
    assert image is not None
    images.save(engine, image, Path(output))
    click.echo(f"saved {image} to {output}")


@images_group.command("load")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@handle_errors
def load(archive: str) -> None:
    """Load images from an archive written by `images save` (or `podman save`)."""
    from ..container import images
    from ..runtime import container

    engine = container.engine_for(load_config().container_engine)
    for ref in images.load(engine, Path(archive)):
        click.echo(f"loaded {ref}")
