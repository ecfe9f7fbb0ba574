"""What environments use, against their limits: samples for ``env.usage()``, ``env.watch()``,
``gestvenv ephemeral top`` and ``show --watch``, and the totals of ``stats``.

A sample is read from the env's runtime (under systemd its slice's cgroup, locally its marked
processes) and its storage; what is derived from readings (CPU % between two of them, TTL left,
idle time, the quota totals) is decided by the pure functions below. CPU % needs two readings:
a first sample has none (``cpu_percent`` is None).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import diskcap, registry, storage
from .config import Config
from .models import ResourceLimits
from .registry import EnvRecord
from .runtime import Runtime, Usage, runtime_named

MB = 1 << 20


@dataclass(frozen=True)
class EnvUsage:
    """One environment's use of what it may use, at ``sampled_at`` (seconds since the epoch).

    Limits are in the same units as the figures (bytes, processes, percent of one CPU) and
    None when not set. ``memory_peak_bytes`` is None where it cannot be measured;
    ``memory_peak_source`` says what it is: ``"cgroup"`` (the kernel's high-water mark of the
    env's slice, since it started), ``"VmHWM"`` (local runtime: the sum of each running
    process's own peak; processes that already exited are not in it) or ``"sampled"`` (the
    highest use this sampler saw, when that is higher). ``cpu_percent`` is over the interval
    since the previous sample of the same sampler (100 = one full CPU), None for a first one.
    ``idle_seconds`` is 0 while a process runs (a running command is never idle), else the
    time since the last command or install ended.
    """

    name: str
    id: str
    runtime: str
    sampled_at: float
    processes: int
    max_processes: int | None
    memory_bytes: int
    memory_peak_bytes: int | None
    max_memory: int | None
    cpu_seconds: float
    cpu_percent: float | None
    max_cpu_percent: float | None
    disk_bytes: int
    max_disk: int | None
    ttl_left: float | None
    idle_seconds: float
    idle_timeout: int | None = None
    memory_peak_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Stats:
    """A user's environments against the configured caps: what is reserved (environments,
    the sum of their max_memory) and what is used now."""

    environments: int
    max_concurrent: int
    reserving: int                    # environments counted against max_concurrent
    by_state: dict[str, int]
    by_storage: dict[str, int]
    reserved_memory_bytes: int        # sum of max_memory of the reserving environments
    unlimited_memory: int             # reserving environments without a max_memory
    max_total_memory_bytes: int
    memory_bytes: int                 # used now, by the ready environments' processes
    processes: int
    disk_bytes: int
    cache_dir: str
    cache_bytes: int
    environments_usage: list[EnvUsage] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["environments_usage"] = [u.to_dict() for u in self.environments_usage]
        return data


# --- pure decisions ---

def cpu_percent(previous: tuple[float, float] | None, current: tuple[float, float]
                ) -> float | None:
    """CPU use between two readings ``(monotonic time, cpu seconds)``, in percent of one CPU;
    None without a previous reading or time between them. Never negative: the local runtime's
    CPU time is that of running processes, and drops when one exits."""
    if previous is None:
        return None
    elapsed = current[0] - previous[0]
    if elapsed <= 0:
        return None
    return max(0.0, (current[1] - previous[1]) / elapsed * 100.0)


def ttl_left(expires_at: float | None, now: float) -> float | None:
    """Seconds until the env's TTL (0 once past it), None without a TTL."""
    return None if expires_at is None else max(0.0, expires_at - now)


def idle_seconds(last_activity: float, processes: int, now: float) -> float:
    """How long the env has been idle, by the holder's rule: a running process is activity."""
    if processes > 0:
        return 0.0
    return max(0.0, now - last_activity)


def peak(reported: int | None, source: str | None, current: int,
         seen: int | None) -> tuple[int | None, str | None]:
    """The peak to show: the runtime's, unless this sampler saw more (a local env whose
    busiest process has exited); None if the runtime measures none and nothing was seen."""
    best, best_source = reported, source
    for value in (current, seen):
        if value is not None and value > 0 and (best is None or value > best):
            best, best_source = value, "sampled"
    return best, best_source


def mb_to_bytes(value: int | None) -> int | None:
    return None if value is None else value * MB


def env_usage(record: EnvRecord, used: Usage, disk: int, *, sampled_at: float,
              cpu_pct: float | None, seen_peak: int | None = None) -> EnvUsage:
    """One sample from the runtime's readings and the env's record (its limits, TTL)."""
    limits = ResourceLimits.from_dict(record.limits)
    memory_peak, source = peak(used.memory_peak_bytes, used.memory_peak_source,
                               used.memory_bytes, seen_peak)
    return EnvUsage(
        name=record.name, id=record.id, runtime=record.runtime, sampled_at=sampled_at,
        processes=used.processes, max_processes=limits.max_processes,
        memory_bytes=used.memory_bytes, memory_peak_bytes=memory_peak,
        max_memory=mb_to_bytes(limits.max_memory),
        cpu_seconds=used.cpu_seconds, cpu_percent=cpu_pct,
        max_cpu_percent=limits.max_cpu_percent,
        disk_bytes=disk, max_disk=mb_to_bytes(limits.max_disk),
        ttl_left=ttl_left(record.expires_at, sampled_at),
        idle_seconds=idle_seconds(record.last_activity, used.processes, sampled_at),
        idle_timeout=record.idle_timeout or None, memory_peak_source=source)


def totals(records: Sequence[EnvRecord], samples: Iterable[EnvUsage], config: Config,
           now: float, *, disk_bytes: int, cache_dir: str, cache_bytes: int) -> Stats:
    """The ``stats`` figures from the records and the samples of the ready ones."""
    by_state: dict[str, int] = {}
    by_storage: dict[str, int] = {}
    reserving = [r for r in records if r.holds_quota(now)]
    for record in records:
        state = record.state(now)
        by_state[state] = by_state.get(state, 0) + 1
        by_storage[record.backend] = by_storage.get(record.backend, 0) + 1
    samples = list(samples)
    return Stats(
        environments=len(records), max_concurrent=config.max_concurrent,
        reserving=len(reserving), by_state=by_state, by_storage=by_storage,
        reserved_memory_bytes=sum((r.limits.get("max_memory") or 0) for r in reserving) * MB,
        unlimited_memory=sum(1 for r in reserving if not r.limits.get("max_memory")),
        max_total_memory_bytes=config.max_total_memory_mb * MB,
        memory_bytes=sum(s.memory_bytes for s in samples),
        processes=sum(s.processes for s in samples), disk_bytes=disk_bytes,
        cache_dir=cache_dir, cache_bytes=cache_bytes, environments_usage=samples)


# --- sampling ---

DISK_WALK_EVERY = 5.0  # seconds between walks of an uncapped env's files


class Sampler:
    """Samples environments, remembering the previous reading of each (CPU %, the peak seen).

    One runtime object per runtime name for all its samples (its bus connection is the event
    loop's), and every env of a refresh sampled at once.
    """

    def __init__(self, runtimes: dict[str, Runtime] | None = None) -> None:
        self._runtimes: dict[str, Runtime] = dict(runtimes or {})
        self._previous: dict[str, tuple[float, float]] = {}  # env id -> (monotonic, cpu s)
        self._peaks: dict[str, int] = {}
        self._disks: dict[str, tuple[float, int]] = {}  # env id -> (monotonic, bytes)

    def runtime(self, name: str) -> Runtime:
        if name not in self._runtimes:
            self._runtimes[name] = runtime_named(name)
        return self._runtimes[name]

    async def _readings(self, records: Sequence[EnvRecord]) -> list[Usage]:
        by_runtime: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            by_runtime.setdefault(record.runtime, []).append(i)
        out: list[Usage | None] = [None] * len(records)
        groups = list(by_runtime.items())
        results = await asyncio.gather(*(
            self.runtime(name).usage_many([records[i] for i in indexes])
            for name, indexes in groups))
        for (_name, indexes), usages in zip(groups, results, strict=True):
            for i, used in zip(indexes, usages, strict=True):
                out[i] = used
        return [u for u in out if u is not None]

    async def sample(self, records: Sequence[EnvRecord]) -> list[EnvUsage]:
        """One sample of each env, all read at once (processes, memory and CPU from their
        runtimes, disk from their storage)."""
        if not records:
            return []
        readings, disks = await asyncio.gather(
            self._readings(records), asyncio.gather(*(self._disk(r) for r in records)))
        now, mono = time.time(), time.monotonic()
        samples = []
        for record, used, disk in zip(records, readings, disks, strict=True):
            reading = (mono, used.cpu_seconds)
            pct = cpu_percent(self._previous.get(record.id), reading)
            self._previous[record.id] = reading
            sample = env_usage(record, used, disk, sampled_at=now, cpu_pct=pct,
                               seen_peak=self._peaks.get(record.id))
            if sample.memory_peak_bytes is not None:
                self._peaks[record.id] = sample.memory_peak_bytes
            samples.append(sample)
        return samples

    async def _disk(self, record: EnvRecord) -> int:
        """The env's disk use: at every sample where its own filesystem tells it (max_disk:
        statvfs), else a walk of its files at most every DISK_WALK_EVERY seconds (a big tree
        costs tenths of a second, and the env decides how big)."""
        mono = time.monotonic()
        cached = self._disks.get(record.id)
        if diskcap.cap_of(record.enforcement_record) is None and cached is not None \
                and mono - cached[0] < DISK_WALK_EVERY:
            return cached[1]
        used = await asyncio.to_thread(storage.disk_usage, Path(record.path))
        self._disks[record.id] = (mono, used)
        return used

    async def sample_one(self, record: EnvRecord) -> EnvUsage:
        return (await self.sample([record]))[0]


def live_records() -> list[EnvRecord]:
    """The user's environments that have processes to sample (ready or being made)."""
    return [r for r in registry.list_records() if r.state() in ("ready", "creating")]


async def sample_twice(records: Sequence[EnvRecord], interval: float,
                       sampler: Sampler | None = None) -> list[EnvUsage]:
    """Samples with CPU %: two readings ``interval`` seconds apart, the second returned."""
    sampler = sampler or Sampler()
    await sampler.sample(records)
    await asyncio.sleep(interval)
    return await sampler.sample(records)


async def watch_all(interval: float = 1.0, *, sampler: Sampler | None = None,
                    names: Sequence[str] | None = None) -> AsyncIterator[list[EnvUsage]]:
    """A sample of every live environment (or of ``names``) each ``interval`` seconds, until
    the caller stops iterating. The envs are looked up again at each refresh; the first
    refresh has no CPU %. An env that ended drops out of the next refresh."""
    sampler = sampler or Sampler()
    while True:
        started = time.monotonic()
        records = await asyncio.to_thread(live_records)
        if names is not None:
            records = [r for r in records if r.name in names]
        yield await sampler.sample(records)
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


async def global_stats(config: Config, *, sampler: Sampler | None = None) -> Stats:
    """Totals for this user (``gestvenv ephemeral stats``): environments by state and
    storage, what they reserve against ``max_concurrent`` and ``max_total_memory_mb``, and
    what the ready ones use now (one sample each, all at once)."""
    sampler = sampler or Sampler()
    records = await asyncio.to_thread(registry.list_records)
    now = time.time()
    ready = [r for r in records if r.state(now) == "ready"]
    cache = storage.uv_cache_dir(config)

    def disks() -> tuple[int, int]:
        # Disk of every env on record, ready or not (an expired env still holds its files).
        total = sum(storage.disk_usage(Path(r.path)) for r in records)
        return total, storage.disk_usage(cache) if cache.exists() else 0

    samples, (disk, cache_bytes) = await asyncio.gather(sampler.sample(ready),
                                                        asyncio.to_thread(disks))
    return totals(records, samples, config, now, disk_bytes=disk, cache_dir=str(cache),
                  cache_bytes=cache_bytes)


__all__ = ["EnvUsage", "Sampler", "Stats", "cpu_percent", "env_usage", "global_stats",
           "idle_seconds", "live_records", "peak", "sample_twice", "totals", "ttl_left",
           "watch_all"]
