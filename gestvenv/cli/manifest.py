"""``gestvenv ephemeral manifest``: the Kubernetes objects that would run an env.

It takes ``create``'s options (:func:`env_options`) and prints JSON; it creates nothing and asks
no cluster (docs/scale-out.md). Light: gestvenv.manifest is pure (no event loop, runtime,
builder or YAML).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import click

from ..config import load_config
from ..manifest import KINDS, as_document, render
from ._common import UserError, handle_errors
from .ephemeral import env_options, env_request


@click.command("manifest")
@click.argument("name")
@env_options
@click.option("--kind", type=click.Choice(KINDS), default="pod", show_default=True,
              help="pod: a Pod; sandbox: an agent-sandbox Sandbox (agents.x-k8s.io) whose "
                   "podTemplate is that Pod.")
@click.option("--runtime-class", metavar="NAME",
              help="The Pod's runtimeClassName: gVisor or Kata for untrusted code (a "
                   "RuntimeClass the cluster has).")
@click.option("--image", metavar="IMAGE",
              help="The image the env runs (one with its packages, e.g. from `gestvenv "
                   "ephemeral images save`); default: python:VERSION-slim with an init "
                   "container that installs the packages.")
@handle_errors
def manifest_command(name: str, kind: str, runtime_class: str | None, image: str | None,
                     **options: Any) -> None:
    """Print, as JSON, the Kubernetes objects that would run environment NAME on a cluster.

    A Pod (or a Sandbox) with the env's limits, TTL, storage and a locked-down security
    context, and a NetworkPolicy denying all traffic with --no-network; several objects come
    as a v1 List. Nothing is created and no cluster is asked: pipe it to `kubectl apply -f -`.
    What a Pod cannot enforce (--processes, --idle-timeout) is refused unless
    --allow-unenforced, then named in an annotation.

    \b
    Example: gestvenv ephemeral manifest demo -p six --memory 256
    """
    config = load_config()
    request = env_request(options)
    if request["requirements"] is not None:
        raise UserError("--requirements is not rendered: the file is on this host (and may "
                        "name others); pass its specs with --packages, or use an --image "
                        "that holds them")
    if request["runtime"] not in (None, "auto"):
        raise UserError(f"--runtime {request['runtime']}: a manifest's Pod is run by the "
                        "cluster, not by a runtime of this host")
    if image is not None and request["python"] is not None:
        raise UserError("--python and --image: the image's interpreter is the one that runs; "
                        "give one of them")
    python = request["python"] or config.python or "{}.{}".format(*sys.version_info[:2])
    ttl = config.default_ttl if request["ttl"] is None else request["ttl"]
    idle = config.idle_timeout if request["idle_timeout"] is None else request["idle_timeout"]
    allow = request["allow_unenforced"]
    objects = render(
        name, packages=request["packages"], limits=request["resource_limits"],
        isolation=request["isolation_level"] or config.default_isolation_level,
        storage=request["storage_backend"] or config.storage_backend, ttl=ttl,
        idle_timeout=idle, python=None if image is not None else python, image=image,
        runtime_class=runtime_class, kind=kind, env=request["env"],
        index_url=config.index_url,
        allow_unenforced=config.allow_unenforced_limits if allow is None else allow,
        now=datetime.now(UTC))
    click.echo(json.dumps(as_document(objects), indent=2))
