"""``gestvenv ephemeral``: create, list, show, top, exec, cleanup, stats."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from .. import registry
from ..config import RUNTIMES, load_config
from ..models import NOT_HELD, IsolationLevel, ResourceLimits, StorageBackend, in_threat_order
from ..runtime.systemd.booted import systemd_booted
from ..watch import ensure_for_command
from . import remote
from ._common import (
    F,
    UserError,
    echo_json,
    handle_errors,
    human_bytes,
    human_seconds,
    remaining,
    run_foreground,
    table,
)
from ._complete import complete_env_name

if TYPE_CHECKING:  # What a command runs is imported when it runs: `list`, `show`, `--help`
    # start without asyncio, dbus-next, psutil or the builder (tests/unit/test_import_cost.py).
    from ..monitor import EnvUsage
    from ..registry import EnvRecord


@click.group("ephemeral")
@click.pass_context
@handle_errors
def ephemeral_group(ctx: click.Context) -> None:
    """Create, inspect and destroy ephemeral environments."""
    if remote.host() is not None:
        return  # (the service's machine sweeps its own)
    config = load_config()  # a bad setting is reported by every command, not only those using it
    # Without systemd (and its cleanup timer), commands make sure the watchdog runs: it sweeps
    # orphans at once, restarts the watch of local envs if it was killed, and exits by itself
    # when there is nothing left to watch (watchdog.needed says when).
    ensure_for_command(config.cleanup_interval, systemd_booted(),
                       sweeping=ctx.invoked_subcommand == "cleanup")


def split_packages(values: tuple[str, ...]) -> list[str]:
    """``--packages a,b`` and ``--packages a --packages b``, keeping every spec intact.

    A comma also appears inside specs (``six>=1.0,<2``, ``pkg[a,b]``): it separates two packages
    only outside brackets and when a name (a letter or digit) follows it.
    """
    out: list[str] = []
    for value in values:
        depth, current = 0, ""
        for i, char in enumerate(value):
            depth += char == "["
            depth -= char == "]"
            if char == "," and depth == 0 and value[i + 1:].lstrip()[:1].isalnum():
                out.append(current.strip())
                current = ""
            else:
                current += char
        out.append(current.strip())
    return [p for p in out if p]


def _env_pairs(values: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env expects NAME=VALUE, not {item!r}")
        pairs[key] = value
    return pairs


# The options that say what an environment is: shared by `create` and `run`.
_ENV_OPTIONS = (
    click.option("-p", "--packages", multiple=True, metavar="SPECS",
                 help="Packages to install, comma-separated (repeatable)."),
    click.option("-r", "--requirements", type=click.Path(exists=True, dir_okay=False),
                 help="A requirements file to install."),
    click.option("--python", help="Interpreter: a version (3.12) or a path."),
    click.option("--ttl", type=click.IntRange(min=0),
                 help="Seconds before it is destroyed (0: none)."),
    click.option("--idle-timeout", type=click.IntRange(min=0),
                 help="Destroy after this many seconds without a command."),
    click.option("--memory", type=click.IntRange(min=1), help="Memory limit in MB."),
    click.option("--cpu", type=click.FloatRange(min=0, min_open=True),
                 help="CPU limit, percent of one CPU."),
    click.option("--processes", type=click.IntRange(min=1), help="Maximum number of processes."),
    click.option("--disk", type=click.IntRange(min=1), help="Disk limit in MB."),
    click.option("--no-network", is_flag=True, help="Cut the environment off the network."),
    click.option("--isolation", type=click.Choice([i.value for i in IsolationLevel]),
                 help="How far it is fenced off (default: default_isolation_level); the level "
                      "really applied is reported by `show`."),
    click.option("--storage", type=click.Choice([s.value for s in StorageBackend]),
                 help="Where its files live: disk, tmpfs (RAM, in the runtime dir) or memory "
                      "(/dev/shm) (default: storage_backend)."),
    click.option("--runtime", type=click.Choice(list(RUNTIMES)),
                 help="systemd (transient units, kernel-enforced limits), local, or auto"),
    click.option("--allow-unenforced", is_flag=True, default=None,
                 help="Create it even if a limit cannot be enforced here (see `show`)."),
    click.option("-e", "--env", "env_vars", multiple=True, metavar="NAME=VALUE",
                 help="A variable for every command run in it (repeatable)."),
)


def env_options(func: F) -> F:
    """Decorate a command with :data:`_ENV_OPTIONS` (their values: :func:`env_request`)."""
    for option in reversed(_ENV_OPTIONS):
        func = option(func)
    return func


def env_request(options: dict[str, Any]) -> dict[str, Any]:
    """The keywords of ``ephemeral()``/``create_environment()`` from :func:`env_options`'
    values (popped from ``options``)."""
    take = options.pop
    limits = ResourceLimits(max_memory=take("memory"), max_disk=take("disk"),
                            max_processes=take("processes"), max_cpu_percent=take("cpu"),
                            network_access=not take("no_network"))
    return {"packages": split_packages(take("packages")), "requirements": take("requirements"),
            "python": take("python"), "resource_limits": limits,
            "isolation_level": take("isolation"), "storage_backend": take("storage"),
            "ttl": take("ttl"), "idle_timeout": take("idle_timeout"),
            "env": _env_pairs(take("env_vars")), "allow_unenforced": take("allow_unenforced"),
            "runtime": take("runtime")}


@ephemeral_group.command("create")
@click.argument("name", required=False)
@env_options
@click.option("-i", "--interactive", is_flag=True,
              help="Open a shell inside; destroy the env when it exits (unless --ttl is given).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def create(name: str | None, interactive: bool, as_json: bool, **options: Any) -> None:
    """Create environment NAME (a generated name if omitted); it lives until its TTL."""
    if remote.host() is not None:
        if interactive:
            raise UserError("--interactive opens a shell here: not taken with --host")
        remote.create(name, env_request(options), as_json=as_json)
        return
    from .. import progress
    from ..context import create_environment
    from ..sync import run_sync

    ttl = options["ttl"]
    # On a terminal, what the creation is doing as it goes (the installer's own progress too).
    with progress.reporting(sys.stderr, enabled=progress.wanted(sys.stderr, as_json=as_json)):
        env = run_sync(create_environment(name, **env_request(options)))
    if as_json:
        echo_json(env.info())
    else:
        click.echo(f"created {env.name} at {env.path} ({_summary(env.info())})")
        _warn_unenforced(env.info())
        for note in env.info()["notes"]:
            click.echo(f"note: {note}", err=True)
    if interactive:
        shell = os.environ.get("SHELL") or "/bin/sh"
        click.echo(f"gestvenv: shell in {env.name}; exit to leave", err=True)
        try:
            status = run_foreground(env, [shell])
        finally:
            if ttl is None:
                run_sync(env.aclose())
                click.echo(f"gestvenv: {env.name} destroyed", err=True)
        raise SystemExit(status)


def _warn_unenforced(info: dict[str, Any]) -> None:
    """Every limit asked for and not enforced (allowed by --allow-unenforced), on stderr."""
    for limit, applied in info["enforcement"]["limits"].items():
        if not applied["enforced"]:
            click.echo(f"warning: {limit} is NOT enforced: {applied['mechanism']}", err=True)


# Everything after the options is the command's, "--" or not: "run -p x python --help".
_COMMAND_SETTINGS = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@ephemeral_group.command("run", context_settings=_COMMAND_SETTINGS)
@env_options
@click.option("--name", help="The environment's name (default: a generated one).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Kill the command (and its children) after this many seconds.")
@click.option("--cwd", type=click.Path(exists=True, file_okay=False), help="Working directory.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress or notes on stderr (warnings still are).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def run(name: str | None, timeout: float | None, cwd: str | None, quiet: bool,
        command: tuple[str, ...], **options: Any) -> None:
    """Create an environment, run COMMAND in it, destroy it; exit with the command's status.

    The environment is this process's, as with ``ephemeral()``: Ctrl-C, SIGTERM or a SIGKILL
    of gestvenv leave nothing behind (a SIGKILL: its watchdog, or its systemd unit, ends it).

    \b
    Example: gestvenv ephemeral run -p six -- python -c 'import six'
    """
    if remote.host() is not None:
        raise SystemExit(remote.run_once(name, env_request(options), command,
                                         timeout=timeout, cwd=cwd))
    from .. import progress
    from ..sync import ephemeral_sync

    # On a terminal, what the creation does as it goes (as `create`); the command's output is
    # its own.
    with progress.reporting(sys.stderr, enabled=progress.wanted(sys.stderr, quiet=quiet)), \
            ephemeral_sync(name, **env_request(options)) as env:
        info = env.info()
        _warn_unenforced(info)
        if not quiet:
            for note in info["notes"]:
                click.echo(f"note: {note}", err=True)
        status = run_foreground(env.aio, command, timeout=timeout, cwd=cwd)
    raise SystemExit(status)


def _summary(info: dict[str, Any]) -> str:
    ttl = f"ttl {remaining(info['expires_at'])}" if info["expires_at"] else "no ttl"
    return f"python {info['python']}, {info['runtime']} runtime, {info['storage_backend']}, {ttl}"


@ephemeral_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def list_(as_json: bool) -> None:
    """Environments of this user, from every process (running scripts' too)."""
    if remote.host() is not None:
        remote.list_(as_json)
        return
    from ..listing import environments_now

    infos = environments_now(guarantees=as_json)  # (the table does not print them)
    if as_json:
        echo_json(infos)
        return
    _say_pool_units()
    if not infos:
        click.echo("no environments")
        return
    rows = [(i["name"], i["state"], i["runtime"], i["storage_backend"] or "-", i["python"] or "-",
             remaining(i["expires_at"]), str(i["owner_pid"] or "-"),
             ",".join(i["packages"]) or "-") for i in infos]
    table(rows, ("NAME", "STATE", "RUNTIME", "STORAGE", "PYTHON", "TTL LEFT", "OWNER", "PACKAGES"))


def _say_pool_units() -> None:
    """The systemd runtime's unclaimed pool units, which are no environments but are there."""
    if not systemd_booted():
        return
    from ..runtime.systemd.pool import entries

    waiting = [e for e in entries() if e.claim is None]
    if waiting:
        click.echo(f"({len(waiting)} pool unit{'s' * (len(waiting) > 1)} waiting to be claimed: "
                   f"{', '.join(f'gestvenv-{e.stem}.service' for e in waiting)}; each ends "
                   "after pool_idle, or with `cleanup --all`)", err=True)


@ephemeral_group.command("show")
@click.argument("name", shell_complete=complete_env_name)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-w", "--watch", is_flag=True,
              help="Show its usage against its limits, refreshed every --interval, until "
                   "Ctrl-C (as `top` does for every environment).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@handle_errors
def show(name: str, as_json: bool, watch: bool, interval: float) -> None:
    """Everything about environment NAME: limits really applied, usage, guarantees."""
    if remote.host() is not None:
        if watch:
            raise UserError("--watch is not taken with --host (a service's env: show, again)")
        remote.show(name, as_json=as_json)
        return
    from ..listing import describe, environments
    from ..monitor import Sampler
    from ..names import validate_name
    from ..sync import run_sync

    record = registry.load(validate_name(name))
    if watch:
        _watch([record.name], interval, once=False, as_json=as_json)
        return

    async def read() -> tuple[dict[str, Any], EnvUsage]:
        listed = await environments()
        return (next((i for i in listed if i["id"] == record.id), describe(record)),
                await Sampler().sample_one(record))

    info, use = run_sync(read())
    info["usage"] = {"processes": use.processes, "memory_bytes": use.memory_bytes,
                     "memory_peak_bytes": use.memory_peak_bytes,
                     "memory_peak_source": use.memory_peak_source,
                     "cpu_seconds": round(use.cpu_seconds, 3), "disk_bytes": use.disk_bytes}
    if as_json:
        echo_json(info)
        return
    enforcement = info["enforcement"]
    click.echo(f"name:        {info['name']} ({info['state']})")
    click.echo(f"path:        {info['path']}")
    click.echo(f"python:      {info['python']} ({info['interpreter']})")
    click.echo(f"runtime:     {info['runtime']}, built with {info['builder']}")
    click.echo(f"storage:     {info['storage_backend']}")
    click.echo(f"isolation:   {enforcement['isolation_applied']} "
               f"(requested {enforcement['isolation_requested']})")
    if box := info.get("container"):
        click.echo(f"container:   {box.get('name')} ({box.get('engine')}, image "
                   f"{box.get('image')}; packages image {box.get('packages_image') or 'none'})")
        click.echo(f"inspect:     {box.get('engine')} ps --filter "
                   f"label=io.gestvenv.env-id={info['id']}")
    click.echo(f"ttl:         {info['ttl'] or 'none'} (left: {remaining(info['expires_at'])})")
    click.echo(f"idle:        {info['idle_timeout'] or 'none'}")
    click.echo(f"packages:    {', '.join(info['packages']) or '-'}")
    click.echo("limits:")
    if not enforcement["limits"]:
        click.echo("  none requested")
    for key, status in enforcement["limits"].items():
        flag = "enforced" if status["enforced"] else "NOT enforced"
        click.echo(f"  {key} = {status['requested']}: {flag} ({status['mechanism']})")
    protections = in_threat_order(enforcement.get("protections") or {})
    if protections:
        who = f" (commands run as uid {info['sandbox_uid']})" if info.get("sandbox_uid") else ""
        click.echo(f"isolation holds{who}:")
    for threat, how in protections.items():
        held = "NOT held" if how.startswith(NOT_HELD) else "held"
        click.echo(f"  {threat}: {held} ({how.removeprefix(NOT_HELD)})")
    if "unit" in info:
        user = "--user " if os.geteuid() != 0 else ""
        unit = info["unit"]
        click.echo(f"unit:        {unit['name']} ({unit['state']}), its processes in "
                   f"{unit['slice']}")
        click.echo(f"inspect:     systemctl {user}status {unit['name']} {unit['slice']}; "
                   f"journalctl {user}-u {unit['name']} "
                   f"-u '{unit['name'].removesuffix('.service')}@*'")
    u = info["usage"]
    click.echo(f"usage:       {u['processes']} processes, {human_bytes(u['memory_bytes'])} "
               f"memory (peak {human_bytes(u['memory_peak_bytes'])}), {u['cpu_seconds']} s "
               f"cpu, {human_bytes(u['disk_bytes'])} disk")
    for line in (*info["notes"], *info["guarantees"]):
        click.echo(f"note:        {line}")


@ephemeral_group.command("top")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes (and between the two readings CPU % needs).")
@click.option("--once", is_flag=True, help="One table (after two readings), then exit.")
@click.option("--json", "as_json", is_flag=True,
              help="One machine-readable sample of every environment (implies --once).")
@handle_errors
def top(interval: float, once: bool, as_json: bool) -> None:
    """Live usage of every environment against its limits: CPU % over the last interval,
    memory (now and peak), disk, processes, TTL left and idle time; refreshed until Ctrl-C."""
    remote.refuse("ephemeral top")
    _watch(None, interval, once=once or as_json, as_json=as_json)


TOP_HEADERS = ("NAME", "RUNTIME", "CPU%", "MEMORY", "PEAK", "DISK", "PROCS", "TTL LEFT",
               "IDLE")


def _of(value: str, limit: str | None) -> str:
    return f"{value}/{limit}" if limit is not None else value


def usage_row(u: EnvUsage) -> tuple[str, ...]:
    """One line of ``top``: each figure against its limit, where there is one."""
    cpu = "-" if u.cpu_percent is None else f"{u.cpu_percent:.0f}"
    max_cpu = None if u.max_cpu_percent is None else f"{u.max_cpu_percent:g}"
    limit_mem = None if u.max_memory is None else human_bytes(u.max_memory)
    limit_disk = None if u.max_disk is None else human_bytes(u.max_disk)
    procs = None if u.max_processes is None else str(u.max_processes)
    idle = human_seconds(u.idle_seconds)
    if u.idle_timeout:
        idle += f"/{human_seconds(u.idle_timeout)}"
    return (u.name, u.runtime, _of(cpu, max_cpu), _of(human_bytes(u.memory_bytes), limit_mem),
            human_bytes(u.memory_peak_bytes), _of(human_bytes(u.disk_bytes), limit_disk),
            _of(str(u.processes), procs), human_seconds(u.ttl_left), idle)


def _watch(names: list[str] | None, interval: float, *, once: bool, as_json: bool) -> None:
    """``top`` and ``show --watch``: two readings ``interval`` apart, then one table per
    interval until Ctrl-C (one, with ``once``)."""
    from ..monitor import Sampler, live_records, sample_twice
    from ..sync import run_sync

    sampler = Sampler()

    def records() -> list[EnvRecord]:
        found = live_records()
        return found if names is None else [r for r in found if r.name in names]

    try:
        if once:
            samples = run_sync(sample_twice(records(), interval, sampler))
            if as_json:
                echo_json([s.to_dict() for s in samples])
            else:
                _print_usage(samples, clear=False)
            return
        run_sync(sampler.sample(records()))  # the first reading, for CPU %
        last = time.monotonic()
        clear = sys.stdout.isatty()
        while True:
            time.sleep(max(0.0, interval - (time.monotonic() - last)))
            last = time.monotonic()
            samples = run_sync(sampler.sample(records()))
            if as_json:  # one JSON document per line, per refresh
                click.echo(json.dumps([s.to_dict() for s in samples], sort_keys=True))
            else:
                _print_usage(samples, clear=clear)
            if names is not None and not samples:
                raise UserError(f"environment {names[0]!r} has ended")
    except KeyboardInterrupt:
        return  # Ctrl-C is how one leaves it


def _print_usage(samples: list[EnvUsage], *, clear: bool) -> None:
    if clear:
        click.echo("\033[H\033[2J", nl=False)
    if not samples:
        click.echo("no environments")
        return
    table([usage_row(u) for u in samples], TOP_HEADERS)


@ephemeral_group.command("exec", context_settings={"ignore_unknown_options": True,
                                                   "allow_interspersed_args": False})
@click.argument("name", shell_complete=complete_env_name)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Kill the command (and its children) after this many seconds.")
@click.option("--cwd", type=click.Path(exists=True, file_okay=False), help="Working directory.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def exec_(name: str, timeout: float | None, cwd: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND in environment NAME; exit with the command's status."""
    if remote.host() is not None:
        raise SystemExit(remote.execute(name, command, timeout=timeout, cwd=cwd))
    from ..context import attach

    raise SystemExit(run_foreground(attach(name), command, timeout=timeout, cwd=cwd))


@ephemeral_group.command("extend")
@click.argument("name", shell_complete=complete_env_name)
@click.argument("seconds", type=click.FloatRange(min=0, min_open=True))
@handle_errors
def extend(name: str, seconds: float) -> None:
    """Make environment NAME end SECONDS later (its TTL extended, within the max_ttl it was
    made with)."""
    if remote.host() is not None:
        remote.extend(name, seconds)
        return
    from ..context import attach
    from ..sync import run_sync

    expires_at = run_sync(attach(name).extend_ttl(seconds))
    click.echo(f"extended {name}: it ends in {remaining(expires_at)}")


@ephemeral_group.command("cleanup")
@click.argument("names", nargs=-1, shell_complete=complete_env_name)
@click.option("--all", "all_", is_flag=True,
              help="Every environment of this user (and its unclaimed pool units).")
@click.option("--expired", is_flag=True, help="Those past their TTL or whose creator died.")
@click.option("--idle", is_flag=True, help="Those idle for longer than their idle timeout.")
@click.option("--orphans", is_flag=True,
              help="Storage dirs and state files that belong to no environment.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-q", "--quiet", is_flag=True,
              help="Say nothing when there is nothing to clean up (the timer's sweep).")
@handle_errors
def cleanup(names: tuple[str, ...], all_: bool, expired: bool, idle: bool, orphans: bool,
            as_json: bool, quiet: bool) -> None:
    """Destroy environments: by NAME, --all, --expired, --idle, --orphans."""
    if not (names or all_ or expired or idle or orphans):
        raise UserError("say what to clean up: NAME..., --all, --expired, --idle or --orphans")
    if remote.host() is not None:
        if all_ or expired or idle or orphans:
            raise UserError("with --host, cleanup takes NAME... only (the service's machine "
                            "sweeps its own)")
        remote.cleanup(names, as_json=as_json, quiet=quiet)
        return
    from ..cleanup import cleanup_environments
    from ..sync import run_sync

    report = run_sync(cleanup_environments(names, all=all_, expired=expired, idle=idle,
                                           orphans=orphans, config=load_config()))
    removed, errors, orphan_paths = report.removed, report.errors, report.orphan_paths
    if as_json:
        echo_json(report.to_dict())
    else:
        for name, reason in removed.items():
            click.echo(f"removed {name} ({reason})")
        for path in orphan_paths:
            click.echo(f"removed orphan {path}")
        for name, error in errors.items():
            click.echo(f"gestvenv: error: {name}: {error}", err=True)
        if not (removed or orphan_paths or errors or quiet):
            click.echo("nothing to clean up")
    if errors:
        raise SystemExit(1)


@ephemeral_group.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def stats(as_json: bool) -> None:
    """Totals for this user against the configured caps: environments (of max_concurrent),
    memory reserved by their max_memory (of max_total_memory_mb) and used now, processes, disk
    and the shared cache."""
    from ..monitor import global_stats
    from ..sync import run_sync

    data = run_sync(global_stats(load_config()))
    if as_json:
        echo_json(data.to_dict())
        return
    states = ", ".join(f"{n} {s}" for s, n in sorted(data.by_state.items()))
    click.echo(f"environments: {data.environments} of max {data.max_concurrent}"
               + (f" ({states})" if states else ""))
    click.echo(f"reserved:     {data.reserving} of max_concurrent {data.max_concurrent}; "
               f"memory {human_bytes(data.reserved_memory_bytes)} (max_memory) of "
               f"max_total_memory_mb {human_bytes(data.max_total_memory_bytes)}"
               + (f" ({data.unlimited_memory} without max_memory)"
                  if data.unlimited_memory else ""))
    click.echo(f"used now:     {data.processes} processes, {human_bytes(data.memory_bytes)} "
               f"memory")
    backends = ", ".join(f"{n} {b}" for b, n in sorted(data.by_storage.items())) or "-"
    click.echo(f"storage:      {backends}")
    click.echo(f"disk:         {human_bytes(data.disk_bytes)} in environments")
    click.echo(f"cache:        {human_bytes(data.cache_bytes)} in {data.cache_dir}")
