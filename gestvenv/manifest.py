"""The Kubernetes objects that would run an environment's spec on a cluster (docs/scale-out.md).

Pure functions, no I/O: :func:`render` turns what ``create`` takes (packages, limits, isolation,
storage, TTL...) into plain dicts (a Pod, or an agent-sandbox ``Sandbox``; and a NetworkPolicy
when the env is cut off the network), ready for ``json.dumps`` and ``kubectl apply -f -``.
Nothing here talks to a cluster: the objects are checked against Kubernetes' published schema
by the tests (tests/unit/test_manifest.py), never applied.

What a Pod cannot hold is never pretended: ``max_processes`` (a Pod has no pids field; the
kubelet caps pids per node) and ``idle_timeout`` (nothing ends an idle Pod) are refused unless
``allow_unenforced``, and then named in the ``gestvenv.io/not-enforced`` annotation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from .exceptions import InvalidNameError, ValidationError
from .models import IsolationLevel, ResourceLimits, StorageBackend
from .names import validate_name, validate_packages

KINDS = ("pod", "sandbox")
# agent-sandbox (kubernetes-sigs/agent-sandbox): v1beta1 is the CRD's storage version since
# its v0.5 releases; v1alpha1 is still served, deprecated.
SANDBOX_API_VERSION = "agents.x-k8s.io/v1beta1"

MANAGED_BY = "app.kubernetes.io/managed-by"
ENV_LABEL = "gestvenv.io/env"
ANNOTATION = "gestvenv.io/"
NOT_ENFORCED = ANNOTATION + "not-enforced"

CONTAINER = "env"
INSTALLER = "install"
VOLUME = "env"
ENV_DIR = "/env"  # the emptyDir: the env's dir (HOME, the working dir; its "tmp" is /tmp)
VENV = ENV_DIR + "/venv"
# An unprivileged uid and gid of no user's (nobody, on Debian-based images such as python's).
RUN_AS = 65534
# Without --image: the official Python image of the env's version, pulled by the cluster.
DEFAULT_IMAGE = "docker.io/library/python:{version}-slim"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The container's PID 1 holds the env open until the Pod ends (commands come by `kubectl exec`);
# a PID 1 without a handler would ignore SIGTERM and make every deletion wait its grace period.
HOLD = "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); signal.pause()"
# The init container: the venv in the env's dir, then the packages (its arguments), as they are.
INSTALL = (f'set -eu; python -m venv {VENV}; if [ "$#" -gt 0 ]; then '
           f'{VENV}/bin/python -m pip install --no-cache-dir --disable-pip-version-check '
           '--no-input "$@"; fi')

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", re.ASCII)
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                            re.ASCII)
_PYTHON_VERSION = re.compile(r"(?:python)?(\d+(?:\.\d+){0,2})", re.ASCII)


def dns_label(name: str) -> str:
    """``name`` (a valid gestvenv name) as a DNS-1123 label, the form Kubernetes names and label
    values take: lower case, ``_`` and ``.`` as ``-``. A name that cannot be one (longer than 63
    characters, or ending in ``-`` or ``_``) is refused, never cut or patched: two envs could
    then share a label."""
    validate_name(name)
    label = name.lower().replace("_", "-").replace(".", "-")
    if len(label) > 63:
        raise InvalidNameError(
            f"environment name {name!r} is {len(label)} characters long: a Kubernetes name (a "
            "DNS-1123 label) has at most 63")
    if not _DNS_LABEL.fullmatch(label):
        raise InvalidNameError(
            f"environment name {name!r} cannot be made a Kubernetes name (a DNS-1123 label: "
            "lower-case letters, digits and '-', starting and ending with a letter or digit); "
            f"{label!r} ends with '-'")
    return label


def memory_quantity(mb: int) -> str:
    """gestvenv's MB are MiB (2**20 bytes)."""
    return f"{mb}Mi"


def cpu_quantity(percent: float) -> str:
    """A share of one CPU in millicores (100 % = ``1000m``); 1m is Kubernetes' smallest unit."""
    return f"{max(1, round(percent * 10))}m"


def shutdown_time(now: datetime, ttl: int) -> str:
    """``now + ttl`` as an RFC 3339 UTC timestamp (what a Sandbox's ``shutdownTime`` takes)."""
    if now.tzinfo is None:
        raise ValidationError("now must be an aware datetime (datetime.now(UTC))")
    when = (now + timedelta(seconds=ttl)).astimezone(UTC).replace(microsecond=0)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _unenforced(limits: ResourceLimits, idle_timeout: int) -> list[str]:
    out = []
    if limits.max_processes is not None:
        out.append(f"max_processes={limits.max_processes}: a Pod has no pids limit; the "
                   "kubelet caps every Pod of a node alike (podPidsLimit)")
    if idle_timeout:
        out.append(f"idle_timeout={idle_timeout}: nothing in Kubernetes ends an idle Pod; "
                   "what creates it must delete it")
    return out


def _resources(limits: ResourceLimits) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if limits.max_cpu_percent is not None:
        amounts["cpu"] = cpu_quantity(limits.max_cpu_percent)
    if limits.max_memory is not None:
        amounts["memory"] = memory_quantity(limits.max_memory)
    if limits.max_disk is not None:
        amounts["ephemeral-storage"] = memory_quantity(limits.max_disk)
    # Requests equal to limits: the scheduler places the Pod where all of it fits (and with
    # both cpu and memory, the Pod is of the Guaranteed QoS class).
    return {"limits": amounts, "requests": dict(amounts)} if amounts else {}


def _security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "privileged": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _env(pairs: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"name": key, "value": value} for key, value in pairs.items()]


def _container(name: str, image: str, command: list[str], environ: Mapping[str, str],
               resources: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name, "image": image, "command": command, "workingDir": ENV_DIR,
        "env": _env(environ),
        "volumeMounts": [{"name": VOLUME, "mountPath": ENV_DIR},
                         # /tmp is the env's too (the root filesystem is read-only), in its cap.
                         {"name": VOLUME, "mountPath": "/tmp", "subPath": "tmp"}],
        "securityContext": _security_context(),
    }
    if resources:
        container["resources"] = resources
    return container


def pod_spec(*, packages: Sequence[str], limits: ResourceLimits, storage: StorageBackend,
             ttl: int, python: str | None, image: str | None, runtime_class: str | None,
             env: Mapping[str, str], index_url: str | None) -> dict[str, Any]:
    """The Pod's spec (a Sandbox's podTemplate has the same)."""
    resources = _resources(limits)
    home = {"HOME": ENV_DIR}
    init: list[dict[str, Any]] = []
    if image is None:
        if python is None:
            raise ValidationError("a manifest needs a Python version (3.12) or an image")
        version = _PYTHON_VERSION.fullmatch(python)
        if version is None:
            raise ValidationError(
                f"python {python!r}: a manifest's image is chosen by version (3.12, "
                "python3.12), not by a path on this host; give a version, or an image (--image)")
        image = DEFAULT_IMAGE.format(version=version[1])
        installer_env = {**home, **({"PIP_INDEX_URL": index_url} if index_url else {})}
        init.append(_container(INSTALLER, image, ["/bin/sh", "-c", INSTALL, INSTALLER,
                                                  *packages], installer_env, resources))
        environ = {**home, "VIRTUAL_ENV": VENV, "PATH": f"{VENV}/bin:{_PATH}"}
        hold = [f"{VENV}/bin/python", "-c", HOLD]
    else:
        environ = dict(home)  # the image's own PATH (gestvenv's package images: their venv's)
        hold = ["python", "-c", HOLD]
    main = _container(CONTAINER, image, hold, {**environ, **env}, resources)
    volume: dict[str, Any] = {}
    if storage in (StorageBackend.TMPFS, StorageBackend.MEMORY):
        volume["medium"] = "Memory"
    if limits.max_disk is not None:
        volume["sizeLimit"] = memory_quantity(limits.max_disk)
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if ttl:
        spec["activeDeadlineSeconds"] = ttl
    if runtime_class is not None:
        spec["runtimeClassName"] = runtime_class
    if init:
        spec["initContainers"] = init
    spec["containers"] = [main]
    spec["volumes"] = [{"name": VOLUME, "emptyDir": volume}]
    return spec


def labels(label: str) -> dict[str, str]:
    """The labels of an env's objects (and of its Pod: what its NetworkPolicy selects)."""
    return {MANAGED_BY: "gestvenv", ENV_LABEL: label}


def network_policy(name: str, label: str) -> dict[str, Any]:
    """Every ingress and egress of the env's Pod denied (no rule allows anything): DNS too."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"{label}-no-network", "labels": labels(label),
                     "annotations": {ANNOTATION + "name": name}},
        "spec": {"podSelector": {"matchLabels": labels(label)},
                 "policyTypes": ["Ingress", "Egress"]},
    }


def render(name: str, *, packages: Sequence[str] = (), limits: ResourceLimits | None = None,
           isolation: IsolationLevel | str = IsolationLevel.PROCESS,
           storage: StorageBackend | str = StorageBackend.DISK, ttl: int = 0,
           idle_timeout: int = 0, python: str | None = None, image: str | None = None,
           runtime_class: str | None = None, kind: str = "pod",
           env: Mapping[str, str] | None = None, index_url: str | None = None,
           allow_unenforced: bool = False, now: datetime | None = None) -> list[dict[str, Any]]:
    """The Kubernetes objects that would run environment ``name``: a Pod (``kind="pod"``) or an
    agent-sandbox Sandbox (``kind="sandbox"``; its ``shutdownTime`` is ``now + ttl``), then a
    NetworkPolicy that denies all traffic when ``limits.network_access`` is False.

    Without ``image``, the Pod runs ``python:VERSION-slim`` and an init container installs
    ``packages`` into a venv in the env's dir; with one, the image is the env (gestvenv's
    package images hold their venv) and ``packages`` must be empty. ``ttl`` and
    ``idle_timeout`` are seconds, 0 for none."""
    label = dns_label(name)
    limits = ResourceLimits() if limits is None else limits
    isolation = IsolationLevel.parse(isolation)
    storage = StorageBackend.parse(storage)
    specs = validate_packages(packages)
    env = dict(env or {})
    if kind not in KINDS:
        raise ValidationError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    for what, value in (("ttl", ttl), ("idle_timeout", idle_timeout)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValidationError(f"{what} must be an integer >= 0 (seconds), not {value!r}")
    if runtime_class is not None and not (len(runtime_class) <= 253
                                          and _DNS_SUBDOMAIN.fullmatch(runtime_class)):
        raise ValidationError(f"runtime class {runtime_class!r} is not a Kubernetes name (a "
                              "DNS-1123 subdomain: lower-case letters, digits, '-' and '.')")
    if image is not None and (not image or any(c.isspace() for c in image)):
        raise ValidationError(f"image {image!r}: an image reference has no spaces")
    for key in env:
        if not key or "=" in key or not key.isascii() or not key.isprintable():
            raise ValidationError(f"environment variable name {key!r}: printable ASCII, no '='")
    if image is not None and specs:
        raise ValidationError(
            "packages and an image: the image is the env (its root filesystem is read-only), "
            "so nothing can be installed into it; build an image with the packages "
            "(gestvenv ephemeral images save), or give no image")
    if specs and not limits.network_access:
        raise ValidationError(
            "packages without network access: the Pod's installer would have no index to "
            "reach (the NetworkPolicy denies all egress); give an image holding the packages")
    unenforced = _unenforced(limits, idle_timeout)
    if unenforced and not allow_unenforced:
        raise ValidationError("not enforced by a Pod: " + "; ".join(unenforced)
                              + " (allow_unenforced, --allow-unenforced: render it anyway, "
                              f"named in the {NOT_ENFORCED} annotation)")
    if kind == "sandbox" and ttl and now is None:
        raise ValidationError("a Sandbox's shutdownTime is now + ttl: pass now")

    annotations = {ANNOTATION + "name": name, ANNOTATION + "isolation": isolation.value,
                   ANNOTATION + "storage": storage.value}
    if unenforced:
        annotations[NOT_ENFORCED] = "; ".join(unenforced)
    metadata: dict[str, Any] = {"name": label, "labels": labels(label),
                                "annotations": annotations}
    spec = pod_spec(packages=specs, limits=limits, storage=storage, ttl=ttl, python=python,
                    image=image, runtime_class=runtime_class, env=env, index_url=index_url)
    objects: list[dict[str, Any]] = []
    if kind == "pod":
        objects.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
    else:
        sandbox_spec: dict[str, Any] = {
            "podTemplate": {"metadata": {"labels": labels(label),
                                         "annotations": dict(annotations)},
                            "spec": spec}}
        if ttl and now is not None:  # (now is checked above)
            sandbox_spec["shutdownTime"] = shutdown_time(now, ttl)
            sandbox_spec["shutdownPolicy"] = "Delete"  # the env leaves nothing, as gestvenv's
        objects.append({"apiVersion": SANDBOX_API_VERSION, "kind": "Sandbox",
                        "metadata": metadata, "spec": sandbox_spec})
    if not limits.network_access:
        objects.append(network_policy(name, label))
    return objects


def as_document(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """One object as itself, several as a ``v1`` ``List`` (what ``kubectl apply -f`` takes)."""
    if len(objects) == 1:
        return objects[0]
    return {"apiVersion": "v1", "kind": "List", "items": objects}
