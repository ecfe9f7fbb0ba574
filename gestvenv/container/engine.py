"""The container engine: Podman, or Docker through the same command-line surface.

gestvenv talks to the engine only through its CLI (``podman`` or ``docker``), never through a
socket of its own: the same commands work as root, rootless, and in the env's systemd unit,
and what gestvenv did is what a user sees with ``podman ps``. Every container carries
gestvenv's labels (:data:`LABEL_ID`...); a sweep touches nothing else.

Podman gets a containers.conf of gestvenv's own (:func:`containers_conf`) only where the host
needs one: ``default_ulimits = []`` where root cannot raise rlimits (no CAP_SYS_RESOURCE, as in
some CI containers), and the runc OCI runtime where cgroups are a v1/v2 hybrid (crun refuses
it). Elsewhere the user's and the system's configuration hold as they are.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENGINES = ("auto", "podman", "docker")
# Labels on every container and image gestvenv makes; sweeps select by them only.
LABEL_ID = "io.gestvenv.env-id"
LABEL_ENV = "io.gestvenv.env"
LABEL_OWNER = "io.gestvenv.owner"
LABEL_STATE = "io.gestvenv.state-file"
LABEL_IMAGE = "io.gestvenv.image"     # on images: "base" or "packages"
LABEL_KEY = "io.gestvenv.key"         # on images: what they were made from (see images)
PROBE_TIMEOUT = 20.0
# Which daemon or service the CLI talks to: part of what an engine is.
ENDPOINT_VARS = ("DOCKER_HOST", "CONTAINER_HOST", "CONTAINER_CONNECTION",
                 "CONTAINERS_STORAGE_CONF")


class EngineError(Exception):
    """The engine refused or failed: its own message, one line."""


@dataclass(frozen=True)
class Engine:
    """One engine as found on this host, for this user."""

    name: str                       # "podman" or "docker"
    path: str                       # its CLI
    rootless: bool                  # podman as a non-root user (its own user namespace)
    cgroup_version: int             # 1 (v1 or hybrid) or 2, as the engine sees the host
    environ: Mapping[str, str] = field(default_factory=dict)  # CONTAINERS_CONF, when ours

    def argv(self, *args: str) -> list[str]:
        return [self.path, *args]

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.environ}

    def run(self, *args: str, input: bytes | None = None, timeout: float | None = 120.0,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run one engine command and wait; :class:`EngineError` with its message if it
        fails and ``check``."""
        try:
            done = subprocess.run(self.argv(*args), input=input, capture_output=True,
                                  env=self.env(), timeout=timeout, check=False,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            raise EngineError(f"{self.name} {args[0]}: {exc}") from None
        if check and done.returncode != 0:
            raise EngineError(f"{self.name} {args[0]} failed: {last_line(done.stderr)}")
        return done

    def ours(self, *, env_id: str | None = None, owner: int | None = None,
             all_states: bool = True) -> list[dict[str, str]]:
        """gestvenv's containers (id, name, state, labels), optionally one env's or one
        owner's."""
        # Ids from ps, then each container's labels from inspect: docker's ps shows labels as
        # one "k=v,k=v" string, which a comma in a value (a path) would split wrongly.
        args = ["ps", "-q", "--no-trunc", "--filter", f"label={LABEL_ID}"]
        if all_states:
            args.append("-a")
        if env_id is not None:
            args += ["--filter", f"label={LABEL_ID}={env_id}"]
        if owner is not None:
            args += ["--filter", f"label={LABEL_OWNER}={owner}"]
        ids = list(dict.fromkeys(self.run(*args, timeout=60.0).stdout.decode().split()))
        if not ids:
            return []
        done = self.run("inspect", "--type", "container", *ids, timeout=60.0, check=False)
        return [_summary(item) for item in json_items(done.stdout)]


def json_items(data: bytes) -> list[dict[str, object]]:
    """The objects of an engine's JSON output: one array (podman), or one object per line
    (docker)."""
    text = data.decode(errors="replace").strip()
    if not text:
        return []
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if whole is not None:
        items = whole if isinstance(whole, list) else [whole]
    else:
        items = []
        for line in text.splitlines():
            try:
                items.append(json.loads(line))
            except ValueError:
                continue
    return [i for i in items if isinstance(i, dict)]


def _summary(item: dict[str, object]) -> dict[str, str]:
    """One container of ``inspect``: its id, name, state and labels (both engines)."""
    config = item.get("Config")
    labels = config.get("Labels") if isinstance(config, dict) else None
    state = item.get("State")
    status = state.get("Status") if isinstance(state, dict) else ""
    name = str(item.get("Name") or "").lstrip("/")
    return {"id": str(item.get("Id") or ""), "name": name, "state": str(status or ""),
            **{f"label:{k}": str(v) for k, v in (labels or {}).items()}}


def last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def cgroup_version() -> int:
    return 2 if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else 1


def can_raise_rlimits() -> bool:
    """Whether this process may raise a hard rlimit (CAP_SYS_RESOURCE): podman's default
    ulimits (nofile, nproc) need it as root."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return True
    try:
        resource.prlimit(0, resource.RLIMIT_NOFILE, (soft, hard + 1))
    except (OSError, ValueError):
        return False
    resource.prlimit(0, resource.RLIMIT_NOFILE, (soft, hard))
    return True


def containers_conf_text(*, drop_ulimits: bool, runtime: str | None) -> str | None:
    """The containers.conf podman needs on this host, or None if the host's own will do."""
    if not drop_ulimits and runtime is None:
        return None
    lines = []
    if drop_ulimits:
        lines += ["[containers]", "# this host cannot raise rlimits (no CAP_SYS_RESOURCE)",
                  "default_ulimits = []"]
    if runtime is not None:
        lines += ["[engine]", "# crun refuses a v1/v2 hybrid cgroup host", f'runtime = "{runtime}"']
    return "\n".join(lines) + "\n"


def containers_conf(conf_dir: Path) -> dict[str, str]:
    """CONTAINERS_CONF pointing at gestvenv's own file in ``conf_dir``, where needed."""
    runtime = None
    if cgroup_version() == 1 and shutil.which("runc") is not None:
        runtime = "runc"
    text = containers_conf_text(drop_ulimits=os.geteuid() == 0 and not can_raise_rlimits(),
                                runtime=runtime)
    if text is None:
        return {}
    path = conf_dir / "containers.conf"
    try:
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
    except OSError:
        return {}
    return {"CONTAINERS_CONF": str(path)}


def choose(requested: str, found: Mapping[str, str | None]) -> list[str]:
    """The engines to try, in order, for config ``container_engine`` (pure)."""
    if requested == "auto":
        return [n for n in ("podman", "docker") if found.get(n)]
    return [requested] if found.get(requested) else []


@functools.lru_cache(maxsize=8)
def _probe(name: str, path: str, environ: tuple[tuple[str, str], ...],
           endpoint: tuple[tuple[str, str], ...]) -> tuple[Engine | None, str]:
    """(``endpoint``: the daemon the CLI talks to, part of the cache key only.)"""
    env = {**os.environ, **dict(environ)}
    if name == "podman":
        fmt = "{{.Host.CgroupsVersion}} {{.Host.Security.Rootless}}"
    else:
        fmt = "{{.CgroupVersion}} false"
    try:
        done = subprocess.run([path, "info", "--format", fmt], capture_output=True, env=env,
                              timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{name} does not run: {exc}"
    if done.returncode != 0:
        return None, f"{name} does not answer: {last_line(done.stderr)}"
    words = done.stdout.decode().split()
    version = 2 if words and words[0] in ("v2", "2") else 1
    rootless = len(words) > 1 and words[1] == "true"
    return Engine(name, path, rootless, version, dict(environ)), ""


def find(requested: str, conf_dir: Path) -> tuple[Engine | None, str]:
    """The engine to use for config ``container_engine``, or None and why not."""
    if requested not in ENGINES:
        return None, f"unknown container engine {requested!r}; allowed: {', '.join(ENGINES)}"
    found = {n: shutil.which(n) for n in ("podman", "docker")}
    order = choose(requested, found)
    if not order:
        wanted = "podman or docker" if requested == "auto" else requested
        return None, f"no container engine ({wanted}) is installed"
    reasons = []
    for name in order:
        path = found[name]
        assert path is not None
        environ = containers_conf(conf_dir) if name == "podman" else docker_environ(path)
        endpoint = tuple((k, os.environ.get(k, "")) for k in ENDPOINT_VARS)
        engine, why = _probe(name, path, tuple(sorted(environ.items())), endpoint)
        if engine is not None:
            return engine, ""
        reasons.append(why)
    return None, "; ".join(reasons)


@functools.lru_cache(maxsize=4)
def docker_environ(path: str) -> dict[str, str]:
    """docker's CLI without its buildx plugin builds only with the legacy builder."""
    try:
        done = subprocess.run([path, "buildx", "version"], capture_output=True, timeout=10,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):
        return {"DOCKER_BUILDKIT": "0"}
    return {} if done.returncode == 0 else {"DOCKER_BUILDKIT": "0"}


def remove_containers(engine: Engine, ids: Sequence[str]) -> None:
    """Kill and remove these containers at once (no stop timeout); gone ones are fine.
    (podman's ``--ignore``: without it podman 4.3 removes none of them, and exits 0, when
    one is already gone.)"""
    if ids:
        engine.run("rm", "--force", "--ignore", "--time", "0", *ids, check=False,
                   timeout=120.0) if engine.name == "podman" else \
            engine.run("rm", "--force", *ids, check=False, timeout=120.0)
