"""``gestvenv ephemeral``: create, list, show, top, exec, cleanup, stats."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from .. import registry
from ..cleanup import sweep
from ..config import RUNTIMES, load_config
from ..context import attach, create_environment, environments
from ..exceptions import GestvenvError
from ..lifecycle import destroy_many
from ..models import NOT_HELD, IsolationLevel, ResourceLimits, StorageBackend, in_threat_order
from ..monitor import EnvUsage, Sampler, global_stats, live_records, sample_twice
from ..registry import EnvRecord
from ..runtime.systemd import systemd_booted
from ..sync import run_sync
from ..watchdog import ensure_reaper
from ._common import (
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


@click.group("ephemeral")
@handle_errors
def ephemeral_group() -> None:
    """Create, inspect and destroy ephemeral environments."""
    load_config()  # a bad setting is reported by every command, not only those that use it
    if not systemd_booted() or any(r.runtime == "local" for r in registry.list_records()):
        # Without systemd (and its cleanup timer), every invocation makes sure the watchdog
        # runs: it sweeps orphans at once, restarts the watch of local envs if it was killed,
        # and exits by itself when there is nothing left to watch.
        ensure_reaper()


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


@ephemeral_group.command("create")
@click.argument("name", required=False)
@click.option("-p", "--packages", multiple=True, metavar="SPECS",
              help="Packages to install, comma-separated (repeatable).")
@click.option("-r", "--requirements", type=click.Path(exists=True, dir_okay=False),
              help="A requirements file to install.")
@click.option("--python", help="Interpreter: a version (3.12) or a path.")
@click.option("--ttl", type=click.IntRange(min=0), help="Seconds before it is destroyed (0: none).")
@click.option("--idle-timeout", type=click.IntRange(min=0),
              help="Destroy after this many seconds without a command.")
@click.option("--memory", type=click.IntRange(min=1), help="Memory limit in MB.")
@click.option("--cpu", type=click.FloatRange(min=0, min_open=True),
              help="CPU limit, percent of one CPU.")
@click.option("--processes", type=click.IntRange(min=1), help="Maximum number of processes.")
@click.option("--disk", type=click.IntRange(min=1), help="Disk limit in MB.")
@click.option("--no-network", is_flag=True, help="Cut the environment off the network.")
@click.option("--isolation", type=click.Choice([i.value for i in IsolationLevel]),
              help="How far it is fenced off (default: default_isolation_level); the level "
                   "really applied is reported by `show`.")
@click.option("--storage", type=click.Choice([s.value for s in StorageBackend]),
              help="Where its files live: disk, tmpfs (RAM, in the runtime dir) or memory "
                   "(/dev/shm) (default: storage_backend).")
@click.option("--runtime", type=click.Choice(list(RUNTIMES)),
              help="systemd (transient units, kernel-enforced limits), local, or auto")
@click.option("--allow-unenforced", is_flag=True, default=None,
              help="Create it even if a limit cannot be enforced here (see `show`).")
@click.option("-e", "--env", "env_vars", multiple=True, metavar="NAME=VALUE",
              help="A variable for every command run in it (repeatable).")
@click.option("-i", "--interactive", is_flag=True,
              help="Open a shell inside; destroy the env when it exits (unless --ttl is given).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def create(name: str | None, packages: tuple[str, ...], requirements: str | None,
           python: str | None, ttl: int | None, idle_timeout: int | None, memory: int | None,
           cpu: float | None, processes: int | None, disk: int | None, no_network: bool,
           isolation: str | None, storage: str | None, runtime: str | None,
           allow_unenforced: bool | None, env_vars: tuple[str, ...], interactive: bool,
           as_json: bool) -> None:
    """Create environment NAME (a generated name if omitted); it lives until its TTL."""
    limits = ResourceLimits(max_memory=memory, max_disk=disk, max_processes=processes,
                            max_cpu_percent=cpu, network_access=not no_network)
    env = run_sync(create_environment(
        name, packages=split_packages(packages), requirements=requirements, python=python,
        resource_limits=limits, isolation_level=isolation, storage_backend=storage, ttl=ttl,
        idle_timeout=idle_timeout, env=_env_pairs(env_vars), allow_unenforced=allow_unenforced,
        runtime=runtime))
    if as_json:
        echo_json(env.info())
    else:
        click.echo(f"created {env.name} at {env.path} ({_summary(env.info())})")
        for limit, applied in env.enforcement.unenforced.items():
            click.echo(f"warning: {limit} is NOT enforced: {applied.mechanism}", err=True)
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


def _summary(info: dict[str, Any]) -> str:
    ttl = f"ttl {remaining(info['expires_at'])}" if info["expires_at"] else "no ttl"
    return f"python {info['python']}, {info['runtime']} runtime, {info['storage_backend']}, {ttl}"


@ephemeral_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def list_(as_json: bool) -> None:
    """Environments of this user, from every process (running scripts' too)."""
    infos = run_sync(environments())
    if as_json:
        echo_json(infos)
        return
    if not infos:
        click.echo("no environments")
        return
    rows = [(i["name"], i["state"], i["runtime"], i["storage_backend"] or "-", i["python"] or "-",
             remaining(i["expires_at"]), str(i["owner_pid"] or "-"),
             ",".join(i["packages"]) or "-") for i in infos]
    table(rows, ("NAME", "STATE", "RUNTIME", "STORAGE", "PYTHON", "TTL LEFT", "OWNER", "PACKAGES"))


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
    env = attach(name)
    if watch:
        _watch([env.name], interval, once=False, as_json=as_json)
        return
    info = next((i for i in run_sync(environments()) if i["id"] == env.id), env.info())
    use = run_sync(env.usage())
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
    raise SystemExit(run_foreground(attach(name), command, timeout=timeout, cwd=cwd))


@ephemeral_group.command("cleanup")
@click.argument("names", nargs=-1, shell_complete=complete_env_name)
@click.option("--all", "all_", is_flag=True, help="Every environment of this user.")
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
    config = load_config()
    removed: dict[str, str] = {}
    errors: dict[str, str] = {}
    orphan_paths: list[str] = []
    records: list[EnvRecord] = registry.list_records() if all_ else []
    for name in () if all_ else names:
        try:  # an unknown name is reported; the others are still cleaned up
            records.append(registry.load(name))
        except GestvenvError as exc:
            errors[name] = str(exc)
    for failed, error in run_sync(destroy_many(records, config)):
        errors[failed] = error
    removed.update({r.name: "requested" for r in records if r.name not in errors})
    if expired or idle or orphans:
        report = run_sync(sweep(config, expired=expired, idle=idle, orphans=orphans))
        removed.update(report.removed)
        errors.update(report.errors)
        orphan_paths = report.orphan_paths
    if as_json:
        echo_json({"removed": removed, "orphan_paths": orphan_paths, "errors": errors})
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
