"""Cleaning up: environments by name or all of them, and sweeps of the expired, idle and orphaned
ones (:func:`cleanup_environments`, the one entry point of the CLI, the API and the timer; the
watchdog calls :func:`sweep`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import registry, storage
from .config import Config, load_config
from .exceptions import GestvenvError
from .lifecycle import destroy_many
from .registry import EnvRecord, is_pool_stem
from .runtime import SystemdRuntime, UnitView, container, processes
from .runtime.systemd import live_units, pool
from .runtime.systemd.booted import systemd_booted
from .runtime.systemd.plan import LIVE_UNIT_STATES
from .templates import TemplateCache
from .watch import stamp_sweep


@dataclass
class CleanupReport:
    """What a cleanup did: ``removed`` (env name, pool unit or file -> why), ``errors`` (name
    or path -> what went wrong; the rest was still cleaned up) and ``orphan_paths`` (storage
    dirs and cache entries that belonged to no environment)."""

    removed: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    orphan_paths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"removed": dict(self.removed), "orphan_paths": list(self.orphan_paths),
                "errors": dict(self.errors)}

    def _merge(self, other: CleanupReport) -> None:
        self.removed.update(other.removed)
        self.errors.update(other.errors)
        self.orphan_paths.extend(other.orphan_paths)


async def cleanup_environments(names: Iterable[str] = (), *, all: bool = False,
                               expired: bool = False, idle: bool = False, orphans: bool = False,
                               config: Config | None = None) -> CleanupReport:
    """Destroy this user's environments ``names`` (or ``all`` of them, and the systemd pool's
    unclaimed units that would serve the next ones), then sweep those ``expired`` (TTL, a dead
    creator), ``idle`` past their idle timeout, and ``orphans`` (storage dirs, state files,
    containers and cached package sets that belong to no environment). An unknown name is an
    error of the report; the others are still cleaned up."""
    names = list(names)
    if not (names or all or expired or idle or orphans):
        raise ValueError("say what to clean up: names, all, expired, idle or orphans")
    config = config or load_config()
    report = CleanupReport()
    records: list[EnvRecord] = await asyncio.to_thread(registry.list_records) if all else []
    for name in () if all else names:
        try:
            records.append(await asyncio.to_thread(registry.load, name))
        except GestvenvError as exc:
            report.errors[name] = str(exc)
    report.errors.update(await destroy_many(records, config))
    report.removed.update((r.name, "requested") for r in records if r.name not in report.errors)
    if all and systemd_booted():
        from .runtime import runtime_named

        drained = await pool.drain(runtime_named("systemd"))  # type: ignore[arg-type]
        report.removed.update((f"pool unit {stem}", "drained") for stem in drained)
    if expired or idle or orphans:
        report._merge(await sweep(config, expired=expired, idle=idle, orphans=orphans))
        if orphans:
            await asyncio.to_thread(stamp_sweep)  # (the watchdog's sweep, done: watch.needed)
    return report


def _busy(record: EnvRecord) -> bool:
    """Whether a process of the env runs; yes if that cannot be read now (no descriptor
    left: an env is never ended as idle on a look that failed)."""
    try:
        return bool(processes.marked_pids(processes.ENV_MARKER, record.id))
    except OSError:
        return True


def reason_to_remove(record: EnvRecord, now: float, *, expired: bool, idle: bool,
                     units: dict[str, UnitView] | None = None) -> str | None:
    state = record.state(now)
    view = (units or {}).get(record.stem)
    unit_live = view is not None and view.env_id == record.id and view.state in LIVE_UNIT_STATES
    if record.runtime == "systemd" and units is not None and state == "ready" and not unit_live:
        # systemd ended it (TTL, idle, its creator gone, `systemctl stop`): only files are left.
        return "its systemd unit has ended" if expired or idle else None
    if state == "orphaned":
        return "its creating process died"
    if expired and state == "expired":
        return "TTL reached"
    if record.runtime == "systemd":
        return None  # idleness is the holder's to judge, inside the env's own unit
    if idle and record.idle_timeout and state == "ready":
        quiet = now - record.last_activity
        # Idle means no command running either: a long command is never killed for idleness.
        # Seen running, its clock restarts, and from half the timeout on, not only past it:
        # when a command ends, the env's last activity is then recent, and the moment before
        # execute() records the end (under load, a while) cannot look idle.
        if quiet >= record.idle_timeout / 2 and _busy(record):
            registry.touch(record.name, record.id)
            return None
        if quiet >= record.idle_timeout:
            return f"idle for {record.idle_timeout}s"
    return None


async def sweep(config: Config, *, expired: bool = True, idle: bool = True,
                orphans: bool = True) -> CleanupReport:
    report = CleanupReport()
    now = time.time()
    doomed = []
    records = await asyncio.to_thread(registry.list_records)
    units = await live_units({r.stem: r.id for r in records})
    for record in records:
        reason = reason_to_remove(record, now, expired=expired, idle=idle, units=units)
        if reason:
            doomed.append((record, reason))
    report.errors.update(await destroy_many([r for r, _ in doomed], config))
    report.removed.update((r.name, why) for r, why in doomed if r.name not in report.errors)
    if units is not None and (expired or orphans):
        # Pool files whose unit is gone (their dirs are then orphans, below); pool units
        # whose pool file is gone are units without a state file (_stop_unit_only).
        live = {stem: v.env_id for stem, v in units.items()
                if v.env_id and v.state in LIVE_UNIT_STATES}
        report.removed.update(await asyncio.to_thread(pool.sweep_files, live))
    if orphans:
        kept = {r.path: r.id for r in records if r.name not in report.removed}
        await asyncio.to_thread(_sweep_orphans, config, report, kept)
        if units:
            await _stop_unit_only(units, report)
    return report


async def _stop_unit_only(units: dict[str, UnitView], report: CleanupReport) -> None:
    """gestvenv units whose state file is gone (or now another env's): stopped. A unit of
    another registry (another runtime dir of the same user) still has its state file."""
    runtime = SystemdRuntime()
    for stem, view in units.items():
        if not await asyncio.to_thread(view.orphaned):
            continue
        try:
            await runtime.stop_units_of(stem, view.env_id)  # only if still that env's unit
            report.removed[stem] = "a gestvenv unit without a state file" + (
                " (a pool unit without its pool file)" if is_pool_stem(stem) else "")
        except GestvenvError as exc:
            report.errors[stem] = str(exc)


def _sweep_orphans(config: Config, report: CleanupReport, kept: dict[str, str]) -> None:
    """Storage dirs that no state file claims, and state files nobody can read. ``kept``: the
    paths (and ids) of the environments that remain: their dirs are never orphans, whatever
    their claim says (an env's commands may have rewritten it), nor are their processes."""
    for path in registry.unreadable_state_files():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            report.removed[path.name] = "unreadable state file"
    for path in registry.stale_temp_files():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            report.removed[path.name] = "a state file its writer never finished"
    roots = storage.all_roots(config)
    for root in roots:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            if not storage.is_env_dir_name(entry.name):
                continue  # only names gestvenv gives its dirs: "<name>-<8 hex>"
            try:
                if str(root / entry.name) in kept and not entry.is_symlink():
                    continue  # a live env's own dir
                if entry.is_symlink():
                    if str(root / entry.name) in kept:
                        continue  # its env's own cleanup refuses it, and says so to its user
                    # Never an env's dir: the link goes, its target is left alone (said).
                    storage.remove_tree(root / entry.name, roots)
                # Whichever registry owns it (another runtime dir too) must still know it.
                claimed = storage.is_claimed(root / entry.name)
                if claimed:
                    continue
                if claimed is None:
                    # No claim: a dir being created this instant (left young), or one whose
                    # creator died between mkdir and the claim (empty). Anything else is not
                    # recognisably gestvenv's: left alone, and said.
                    if time.time() - entry.stat(follow_symlinks=False).st_mtime < 5:
                        continue
                    if any(os.scandir(root / entry.name)):
                        report.errors[str(root / entry.name)] = "no gestvenv claim; left alone"
                        continue
                else:
                    # Its state file is gone, maybe not its processes (a command still running
                    # in an env whose state was deleted): they go first, as the reaper does.
                    env_id, _ = storage.claim_of(root / entry.name) or ("", "")
                    if env_id and env_id not in kept.values():
                        processes.kill_marked(processes.ENV_MARKER, env_id)
                storage.remove_tree(root / entry.name, roots)
                report.orphan_paths.append(str(root / entry.name))
            except Exception as exc:  # report and go on: one bad entry must not stop the sweep
                report.errors[str(root / entry.name)] = str(exc)
    templates = TemplateCache(storage.templates_dir(config), config.template_ttl)
    report.orphan_paths.extend(templates.prune())
    # Containers of envs that are gone (a crash, a reboot, a reaper that was killed), and the
    # images of package sets no longer snapshotted.
    try:
        report.orphan_paths.extend(container.sweep(config))
    except Exception as exc:  # an engine that misbehaves must not stop the sweep
        report.errors["containers"] = str(exc)
