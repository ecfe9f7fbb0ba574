"""Monitoring's pure decisions: CPU % from two readings, TTL left, idle time, the peak shown,
one sample from a record, the totals of ``stats``; and the names and figures the systemd
runtime and the reaper read them from."""

from __future__ import annotations

from pathlib import Path

import pytest

from gestvenv import reaper
from gestvenv.cli.ephemeral import TOP_HEADERS, usage_row
from gestvenv.config import Config
from gestvenv.models import ExecResult
from gestvenv.monitor import (
    MB,
    EnvUsage,
    cpu_percent,
    env_usage,
    idle_seconds,
    peak,
    totals,
    ttl_left,
)
from gestvenv.registry import EnvRecord
from gestvenv.runtime.base import Usage
from gestvenv.runtime.systemd import plan
from gestvenv.runtime.systemd.plan import UnitNames


def record(name: str = "web", *, limits: dict[str, object] | None = None, ttl: int | None = 60,
           created_at: float = 1000.0, last_activity: float = 1010.0, status: str = "ready",
           max_memory: int | None = None) -> EnvRecord:
    lim = dict(limits or {})
    if max_memory is not None:
        lim["max_memory"] = max_memory
    return EnvRecord(name=name, id=f"{name}-id-0123456789", path=f"/envs/{name}-abcdef01",
                     backend="disk", runtime="local", interpreter="/usr/bin/python3",
                     python_version="3.11", created_at=created_at, ttl=ttl, idle_timeout=None,
                     limits=lim, enforcement={}, last_activity=last_activity, status=status)


# --- CPU % ---

def test_a_first_reading_has_no_cpu_percent() -> None:
    assert cpu_percent(None, (10.0, 5.0)) is None


def test_cpu_percent_is_cpu_time_over_wall_time() -> None:
    assert cpu_percent((10.0, 5.0), (12.0, 6.0)) == pytest.approx(50.0)
    assert cpu_percent((10.0, 5.0), (11.0, 7.0)) == pytest.approx(200.0)  # two CPUs


def test_cpu_percent_needs_time_between_readings_and_is_never_negative() -> None:
    assert cpu_percent((10.0, 5.0), (10.0, 6.0)) is None
    # The local runtime's CPU time is that of running processes: it drops when one exits.
    assert cpu_percent((10.0, 5.0), (11.0, 1.0)) == 0.0


# --- TTL, idle ---

def test_ttl_left() -> None:
    assert ttl_left(None, 100.0) is None
    assert ttl_left(160.0, 100.0) == 60.0
    assert ttl_left(90.0, 100.0) == 0.0


def test_a_running_process_is_never_idle() -> None:
    assert idle_seconds(100.0, processes=1, now=500.0) == 0.0
    assert idle_seconds(100.0, processes=0, now=130.0) == 30.0
    assert idle_seconds(200.0, processes=0, now=130.0) == 0.0  # clock skew: not negative


# --- peak ---

def test_the_runtimes_peak_unless_the_sampler_saw_more() -> None:
    assert peak(500, "cgroup", 100, None) == (500, "cgroup")
    assert peak(500, "cgroup", 100, 400) == (500, "cgroup")
    # Locally the busiest process may have exited since the last sample: what was seen stays.
    assert peak(100, "VmHWM", 50, 300) == (300, "sampled")
    assert peak(None, None, 200, None) == (200, "sampled")
    assert peak(None, None, 0, None) == (None, None)


# --- one sample ---

def test_a_sample_sets_each_figure_against_its_limit_in_the_same_unit() -> None:
    rec = record(limits={"max_memory": 256, "max_disk": 100, "max_processes": 20,
                         "max_cpu_percent": 50})
    used = Usage(processes=2, memory_bytes=10 * MB, cpu_seconds=1.5, disk_bytes=0,
                 memory_peak_bytes=30 * MB, memory_peak_source="cgroup")
    sample = env_usage(rec, used, 7 * MB, sampled_at=1030.0, cpu_pct=42.0)
    assert (sample.max_memory, sample.max_disk) == (256 * MB, 100 * MB)
    assert (sample.max_processes, sample.max_cpu_percent) == (20, 50)
    assert (sample.memory_bytes, sample.memory_peak_bytes, sample.disk_bytes) == \
        (10 * MB, 30 * MB, 7 * MB)
    assert sample.memory_peak_source == "cgroup"
    assert sample.cpu_percent == 42.0
    assert sample.ttl_left == 30.0
    assert sample.idle_seconds == 0.0  # two processes run
    data = sample.to_dict()
    for key in ("name", "id", "sampled_at", "processes", "max_processes", "memory_bytes",
                "memory_peak_bytes", "max_memory", "cpu_seconds", "cpu_percent",
                "max_cpu_percent", "disk_bytes", "max_disk", "ttl_left", "idle_seconds"):
        assert key in data
    # The former Usage's attributes are still there.
    assert (sample.processes, sample.cpu_seconds) == (2, 1.5)


def test_no_limits_and_no_ttl_are_none() -> None:
    sample = env_usage(record(ttl=None), Usage(0, 0, 0.0, 0), 0, sampled_at=1030.0,
                       cpu_pct=None)
    assert (sample.max_memory, sample.max_disk, sample.max_processes,
            sample.max_cpu_percent, sample.ttl_left) == (None,) * 5
    assert sample.memory_peak_bytes is None
    assert sample.idle_seconds == 20.0


# --- stats ---

def test_totals_reserve_what_the_quota_check_counts() -> None:
    config = Config(max_concurrent=10, max_total_memory_mb=1000)
    records = [record("a", max_memory=100), record("b", max_memory=200),
               record("c"),  # no max_memory
               record("old", max_memory=400, created_at=0.0)]  # expired: holds nothing
    samples = [env_usage(records[0], Usage(3, 5 * MB, 1.0, 0), MB, sampled_at=1030.0,
                         cpu_pct=None)]
    stats = totals(records, samples, config, 1030.0, disk_bytes=9, cache_dir="/c",
                   cache_bytes=1)
    assert stats.environments == 4
    assert stats.reserving == 3
    assert stats.by_state == {"ready": 3, "expired": 1}
    assert stats.reserved_memory_bytes == 300 * MB
    assert stats.unlimited_memory == 1
    assert stats.max_total_memory_bytes == 1000 * MB
    assert (stats.memory_bytes, stats.processes) == (5 * MB, 3)
    assert stats.to_dict()["environments_usage"][0]["name"] == "a"


# --- the CLI's row ---

def test_a_top_row_shows_each_figure_against_its_limit() -> None:
    sample = EnvUsage(name="web", id="x", runtime="systemd", sampled_at=0.0, processes=3,
                      max_processes=10, memory_bytes=200 * MB, memory_peak_bytes=250 * MB,
                      max_memory=512 * MB, cpu_seconds=1.0, cpu_percent=49.6,
                      max_cpu_percent=50, disk_bytes=30 * MB, max_disk=None, ttl_left=90.0,
                      idle_seconds=0.0)
    row = dict(zip(TOP_HEADERS, usage_row(sample), strict=True))
    assert row["CPU%"] == "50/50"
    assert row["MEMORY"] == "200.0 MiB/512.0 MiB"
    assert row["PEAK"] == "250.0 MiB"
    assert row["DISK"] == "30.0 MiB"
    assert row["PROCS"] == "3/10"
    assert row["TTL LEFT"] == "90s"


# --- ExecResult ---

def test_exec_result_carries_peak_and_cpu_where_measured() -> None:
    plain = ExecResult(("true",), 0, "", "", 0.1)
    assert (plain.peak_memory_bytes, plain.cpu_seconds) == (None, None)
    data = ExecResult(("true",), 0, "", "", 0.1, peak_memory_bytes=5, cpu_seconds=0.5).to_dict()
    assert (data["peak_memory_bytes"], data["cpu_seconds"]) == (5, 0.5)


# --- one command's figures on systemd < 256 (cgroups.Meter) ---

def _meter_tree(root: Path, v2: bool, cgroup: str) -> Path:
    rel = cgroup.lstrip("/")
    if v2:
        (root / rel).mkdir(parents=True)
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
        (root / rel / "cpu.stat").write_text("usage_usec 1000000\n")
        (root / rel / "memory.peak").write_text(f"{300 * MB}\n")
        return root / rel
    (root / "memory" / rel).mkdir(parents=True)
    (root / "unified" / rel).mkdir(parents=True)
    (root / "unified" / "cgroup.procs").write_text("")
    (root / "unified" / rel / "cpu.stat").write_text("usage_usec 1000000\n")
    (root / "memory" / rel / "memory.max_usage_in_bytes").write_text(f"{300 * MB}\n")
    return root / "memory" / rel


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
def test_a_meter_resets_the_peak_and_counts_cpu_from_its_start(
        tmp_path: Path, v2: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from gestvenv.runtime.systemd import cgroups
    cgroup = "/gestvenv.slice/gestvenv-w.slice"
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    where = _meter_tree(tmp_path, v2, cgroup)
    cpu = (tmp_path if v2 else tmp_path / "unified") / cgroup.lstrip("/") / "cpu.stat"
    meter = cgroups.Meter(cgroup)
    peak_file = where / ("memory.peak" if v2 else "memory.max_usage_in_bytes")
    # The reset reached the kernel's file (a regular file here: what was written is read).
    assert peak_file.read_text().split()[0] == ("reset" if v2 else "0")
    peak_file.write_text(f"{160 * MB}\n")  # the command's high-water mark
    cpu.write_text("usage_usec 3500000\n")
    peak, used = meter.end()
    assert peak == 160 * MB
    assert used == pytest.approx(2.5)


def test_a_meter_without_cgroup_files_measures_nothing(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from gestvenv.runtime.systemd import cgroups
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    assert cgroups.Meter("/gestvenv.slice/none.slice").end() == (None, None)


# --- the reaper's end report ---

@pytest.mark.parametrize("name", ["web", "my-env", "a.b_c", "x" * 250, "-" * 70])
def test_the_reaper_names_the_slice_as_the_plan_does(name: str) -> None:
    assert reaper.env_slice_name(name) == UnitNames.of(name).slice


def test_the_reaper_finds_the_slice_beside_its_own_unit() -> None:
    assert reaper.slice_cgroup("my-env", "/gestvenv.slice/gestvenv-my-env.service") == \
        "/gestvenv.slice/gestvenv-my\\x2denv.slice"
    user = "/user.slice/user-1000.slice/user@1000.service/gestvenv.slice/gestvenv-w.service"
    assert reaper.slice_cgroup("w", user) == \
        "/user.slice/user-1000.slice/user@1000.service/gestvenv.slice/gestvenv-w.slice"
    # The local runtime's watchdog is in no env unit: no cgroup figures.
    assert reaper.slice_cgroup("w", "/user.slice/session-3.scope") is None


def _fake_cgroups(root: Path, v2: bool, cgroup: str) -> None:
    rel = cgroup.lstrip("/")
    if v2:
        (root / rel).mkdir(parents=True)
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
        (root / rel / "memory.peak").write_text(f"{150 * MB}\n")
        (root / rel / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    else:
        (root / "memory" / rel).mkdir(parents=True)
        (root / "unified" / rel).mkdir(parents=True)
        (root / "memory" / rel / "memory.max_usage_in_bytes").write_text(f"{150 * MB}\n")
        (root / "unified" / rel / "cpu.stat").write_text("usage_usec 2500000\n")


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "hybrid"])
def test_the_end_report_says_peak_cpu_and_disk(tmp_path: Path, v2: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cgroup = "/gestvenv.slice/gestvenv-w.slice"
    _fake_cgroups(tmp_path / "cg", v2, cgroup)
    monkeypatch.setattr(reaper, "CGROUP_ROOT", tmp_path / "cg")
    env = tmp_path / "w-01234567"
    env.mkdir()
    (env / "data").write_bytes(b"x" * 100_000)
    text = reaper.end_report(env, "0123456789", cgroup)
    assert text is not None
    assert "peak memory 150.0 MiB" in text
    assert "CPU time 2.50 s" in text
    assert "disk " in text and "disk 0 B" not in text


def test_the_end_report_without_a_slice_says_the_disk_only(tmp_path: Path) -> None:
    env = tmp_path / "w-01234567"
    env.mkdir()
    text = reaper.end_report(env, "0123456789")  # this test is in no env unit
    assert text is not None and text.startswith("used disk ")


def test_the_meter_only_where_systemd_forgets_the_figures() -> None:
    from gestvenv.runtime.systemd.plan import Capabilities
    hybrid_252 = Capabilities(user=False, controllers=frozenset({"memory"}), cgroup_v2=False,
                              version=252)
    v2_257 = Capabilities(user=True, controllers=frozenset({"memory"}), cgroup_v2=True,
                          version=257)
    assert not plan.unit_keeps_figures(hybrid_252)
    assert plan.unit_keeps_figures(v2_257)
