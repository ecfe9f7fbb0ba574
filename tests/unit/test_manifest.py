"""`gestvenv ephemeral manifest` (gestvenv/manifest.py): the objects it renders are checked
against Kubernetes' published OpenAPI schema (the PyPI package kubernetes-validate, strict:
an unknown field is an error), plus what that schema does not say (quantities, names).

No API server is involved: nothing here claims that a cluster would admit or run these objects,
only that they are well-formed for the Kubernetes version below.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gestvenv import manifest
from gestvenv.cli.manifest import manifest_command
from gestvenv.exceptions import InvalidNameError, ValidationError
from gestvenv.models import ResourceLimits
from tests.cli.test_import_cost import LIGHT

# The newest version kubernetes-validate ships schemas for (1.37.0 ships 1.37).
K8S_VERSION = "1.37"
NOW = datetime(2030, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
# Kubernetes' own syntax of a quantity and of a DNS-1123 label (the schema has neither).
QUANTITY = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# A label value (63 at most: alphanumerics, '-', '_', '.', alphanumeric at both ends).
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


@pytest.fixture(scope="module")
def k8s() -> Any:
    """kubernetes-validate (the test extra; Debian has no package of it: skipped there)."""
    return pytest.importorskip("kubernetes_validate")


def check_quantities(spec: dict[str, Any]) -> None:
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        for amounts in container.get("resources", {}).values():
            for value in amounts.values():
                assert QUANTITY.fullmatch(value), value
    for volume in spec["volumes"]:
        if "sizeLimit" in volume.get("emptyDir", {}):
            assert QUANTITY.fullmatch(volume["emptyDir"]["sizeLimit"])


def check_metadata(metadata: dict[str, Any]) -> None:
    assert DNS_LABEL.fullmatch(metadata["name"]) or metadata["name"].endswith("-no-network")
    for value in metadata["labels"].values():
        assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), value
    assert all(isinstance(v, str) for v in metadata.get("annotations", {}).values())


def validate(k8s: Any, obj: dict[str, Any]) -> None:
    """One object against the schema of K8S_VERSION, strictly. A Sandbox (a CRD's, which no
    package publishes a schema of) is checked through its podTemplate: its spec is a Pod spec,
    validated as the spec of a Pod carrying the template's metadata."""
    check_metadata(obj["metadata"])
    if obj["kind"] == "Sandbox":
        template = obj["spec"]["podTemplate"]
        assert set(obj["spec"]) <= {"podTemplate", "shutdownTime", "shutdownPolicy"}
        obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": obj["metadata"]["name"], **template["metadata"]},
               "spec": template["spec"]}
    k8s.validate(obj, K8S_VERSION, strict=True)
    if obj["kind"] == "Pod":
        check_quantities(obj["spec"])


def pod_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The Pod's spec, or the Sandbox's podTemplate spec."""
    first = objects[0]
    spec: dict[str, Any] = first["spec"] if first["kind"] == "Pod" \
        else first["spec"]["podTemplate"]["spec"]
    return spec


def main_container(spec: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any]
    (container,) = spec["containers"]
    assert container["name"] == manifest.CONTAINER
    return container


SPECS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "limits": {"limits": ResourceLimits(max_memory=256, max_cpu_percent=50, max_disk=100),
               "packages": ["six>=1.0", "pkg[a,b]"]},
    "no-network": {"limits": ResourceLimits(max_memory=64, network_access=False)},
    "tmpfs": {"storage": "tmpfs", "limits": ResourceLimits(max_disk=32)},
    "memory": {"storage": "memory"},
    "sandbox": {"kind": "sandbox", "limits": ResourceLimits(max_memory=128, max_cpu_percent=200),
                "packages": ["six"]},
    "sandbox-no-network": {"kind": "sandbox", "limits": ResourceLimits(network_access=False)},
    "image": {"image": "registry.example/gestvenv-env:abc", "runtime_class": "gvisor",
              "env": {"A": "1"}, "isolation": "container"},
    "unenforced": {"limits": ResourceLimits(max_processes=64), "idle_timeout": 60,
                   "allow_unenforced": True},
}


def rendered(case: str, **extra: Any) -> list[dict[str, Any]]:
    kwargs = {"python": "3.12", "ttl": 600, "now": NOW, **SPECS[case], **extra}
    if "image" in kwargs:
        kwargs["python"] = None
    return manifest.render("Demo_env.1", **kwargs)


@pytest.mark.parametrize("case", SPECS)
def test_every_object_is_valid(k8s: Any, case: str) -> None:
    for obj in rendered(case):
        validate(k8s, obj)


@pytest.mark.parametrize("case", SPECS)
def test_the_pod_is_locked_down(case: str) -> None:
    objects = rendered(case)
    spec = pod_of(objects)
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["activeDeadlineSeconds"] == 600
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == manifest.RUN_AS > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        context = container["securityContext"]
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["allowPrivilegeEscalation"] is False
        assert context["privileged"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["runAsNonRoot"] is True and context["runAsUser"] == manifest.RUN_AS
        assert {m["mountPath"] for m in container["volumeMounts"]} == {manifest.ENV_DIR, "/tmp"}
    metadata = objects[0]["metadata"]
    assert metadata["name"] == "demo-env-1"
    assert metadata["labels"] == {"app.kubernetes.io/managed-by": "gestvenv",
                                  "gestvenv.io/env": "demo-env-1"}
    assert metadata["annotations"]["gestvenv.io/name"] == "Demo_env.1"


def test_limits_become_resources_and_the_volume_cap() -> None:
    objects = rendered("limits")
    assert [o["kind"] for o in objects] == ["Pod"]
    spec = pod_of(objects)
    amounts = {"cpu": "500m", "memory": "256Mi", "ephemeral-storage": "100Mi"}
    for container in [*spec["initContainers"], *spec["containers"]]:
        assert container["resources"] == {"limits": amounts, "requests": amounts}
    assert spec["volumes"] == [{"name": "env", "emptyDir": {"sizeLimit": "100Mi"}}]
    # The packages are the installer's arguments, as given (a shell never parses them).
    (installer,) = spec["initContainers"]
    assert installer["image"] == "docker.io/library/python:3.12-slim"
    assert installer["command"][:2] == ["/bin/sh", "-c"]
    assert installer["command"][3:] == ["install", "six>=1.0", "pkg[a,b]"]
    env = {e["name"]: e["value"] for e in main_container(spec)["env"]}
    assert env["VIRTUAL_ENV"] == manifest.VENV and env["PATH"].startswith(manifest.VENV + "/bin:")


def test_defaults_have_no_resources() -> None:
    spec = pod_of(rendered("defaults"))
    assert "resources" not in main_container(spec)
    assert spec["volumes"] == [{"name": "env", "emptyDir": {}}]
    assert "runtimeClassName" not in spec
    assert "activeDeadlineSeconds" not in pod_of(rendered("defaults", ttl=0))


def test_cpu_is_in_millicores() -> None:
    assert manifest.cpu_quantity(100) == "1000m"
    assert manifest.cpu_quantity(12.34) == "123m"
    assert manifest.cpu_quantity(0.01) == "1m"  # Kubernetes' smallest unit


def test_no_network_adds_a_policy_that_denies_everything_to_that_pod() -> None:
    for case in ("no-network", "sandbox-no-network"):
        first, policy = rendered(case)
        assert policy["kind"] == "NetworkPolicy"
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert "ingress" not in policy["spec"] and "egress" not in policy["spec"]  # no rule
        pod_labels = (first["metadata"]["labels"] if first["kind"] == "Pod"
                      else first["spec"]["podTemplate"]["metadata"]["labels"])
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
        assert policy["spec"]["podSelector"]["matchLabels"]["gestvenv.io/env"] == "demo-env-1"


@pytest.mark.parametrize("case", ["tmpfs", "memory"])
def test_ram_storage_is_a_memory_medium(case: str) -> None:
    (volume,) = pod_of(rendered(case))["volumes"]
    assert volume["emptyDir"]["medium"] == "Memory"
    if case == "tmpfs":
        assert volume["emptyDir"]["sizeLimit"] == "32Mi"


def test_sandbox_wraps_the_same_pod_spec() -> None:
    (sandbox,) = rendered("sandbox")
    assert sandbox["apiVersion"] == "agents.x-k8s.io/v1beta1"
    assert sandbox["kind"] == "Sandbox"
    (pod,) = rendered("sandbox", kind="pod")
    assert sandbox["spec"]["podTemplate"]["spec"] == pod["spec"]
    assert sandbox["spec"]["podTemplate"]["metadata"]["labels"] == pod["metadata"]["labels"]
    assert sandbox["spec"]["shutdownTime"] == "2030-01-02T03:14:05Z"  # NOW + 600 s, UTC
    assert sandbox["spec"]["shutdownPolicy"] == "Delete"
    (forever,) = rendered("sandbox", ttl=0, now=None)
    assert "shutdownTime" not in forever["spec"]
    with pytest.raises(ValidationError, match="pass now"):
        rendered("sandbox", now=None)
    east = datetime(2030, 1, 2, 5, 4, 5, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    assert manifest.shutdown_time(east, 0) == "2030-01-02T05:04:05Z"


def test_an_image_is_the_env() -> None:
    spec = pod_of(rendered("image"))
    assert "initContainers" not in spec
    container = main_container(spec)
    assert container["image"] == "registry.example/gestvenv-env:abc"
    assert container["command"][0] == "python"  # the image's, on its own PATH
    assert {e["name"]: e["value"] for e in container["env"]} == {"HOME": "/env", "A": "1"}
    assert spec["runtimeClassName"] == "gvisor"
    assert rendered("image")[0]["metadata"]["annotations"]["gestvenv.io/isolation"] == "container"


def test_what_a_pod_cannot_enforce_is_refused_then_said() -> None:
    with pytest.raises(ValidationError, match=r"max_processes=64.*podPidsLimit.*idle_timeout=60"):
        rendered("unenforced", allow_unenforced=False)
    note = rendered("unenforced")[0]["metadata"]["annotations"][manifest.NOT_ENFORCED]
    assert "max_processes=64" in note and "idle_timeout=60" in note
    assert manifest.NOT_ENFORCED not in rendered("limits")[0]["metadata"]["annotations"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"packages": ["six"], "limits": ResourceLimits(network_access=False)}, "no index"),
    ({"packages": ["six"], "image": "x/y:1", "python": None}, "nothing can be installed"),
    ({"python": "/usr/bin/python3"}, "not by a path"),
    ({"runtime_class": "Not_A_Name"}, "DNS-1123 subdomain"),
    ({"image": "a b", "python": None}, "no spaces"),
    ({"env": {"A=B": "1"}}, "no '='"),
    ({"kind": "deployment"}, "unknown kind"),
    ({"packages": ["--index-url=x"]}, "installer option"),
])
def test_what_cannot_be_rendered_is_an_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        manifest.render("demo", **{"python": "3.12", **kwargs})


@pytest.mark.parametrize(("name", "message"), [
    ("x" * 64, "at most 63"),
    ("trailing_", "ends with '-'"),
    ("trailing-", "ends with '-'"),
    ("has space", "invalid environment name"),
    ("", "must not be empty"),
])
def test_a_name_that_cannot_be_a_kubernetes_name_is_refused(name: str, message: str) -> None:
    with pytest.raises(InvalidNameError, match=re.escape(message)):
        manifest.render(name, python="3.12")


def test_names_are_made_labels() -> None:
    assert manifest.dns_label("CI.Test_1") == "ci-test-1"
    assert manifest.dns_label("x" * 63) == "x" * 63


def test_the_validation_can_fail(k8s: Any) -> None:
    """What the schema catches (an unknown field, a wrong type) and what only our own checks
    do (a quantity's syntax, which the schema leaves to the API server)."""
    pod, policy = rendered("no-network")
    validate(k8s, pod)
    mutations: list[Callable[[dict[str, Any]], object]] = [
        lambda o: o["spec"]["containers"][0]["securityContext"].update(dropAll=True),
        lambda o: o["spec"].update(activeDeadlineSeconds="600"),
        lambda o: o["spec"]["volumes"][0]["emptyDir"].update(medium=["Memory"]),
        lambda o: o["spec"].pop("containers"),
    ]
    for mutate in mutations:
        broken = copy.deepcopy(pod)
        mutate(broken)
        with pytest.raises(k8s.ValidationError):
            validate(k8s, broken)
    broken_policy = copy.deepcopy(policy)
    broken_policy["spec"]["podSelector"]["matchLabel"] = {}
    with pytest.raises(k8s.ValidationError):
        validate(k8s, broken_policy)
    broken = copy.deepcopy(pod)
    broken["spec"]["containers"][0]["resources"]["limits"]["memory"] = "64 MB"
    with pytest.raises(AssertionError):
        validate(k8s, broken)


def test_the_command_prints_a_list_kubectl_takes(k8s: Any) -> None:
    result = CliRunner().invoke(manifest_command, [
        "ci_job", "-p", "six>=1.0,gvdemo", "--memory", "256", "--cpu", "25", "--disk", "64",
        "--image", "registry.example/ci:1"])
    assert result.exit_code == 1  # packages and an image
    assert "gestvenv: error: packages and an image" in result.output

    result = CliRunner().invoke(manifest_command, [
        "ci_job", "--memory", "256", "--cpu", "25", "--disk", "64", "--no-network", "--ttl",
        "120", "--storage", "tmpfs", "-e", "MODE=ci", "--kind", "sandbox", "--runtime-class",
        "kata"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["apiVersion"] == "v1" and document["kind"] == "List"
    sandbox, policy = document["items"]
    assert (sandbox["kind"], policy["kind"]) == ("Sandbox", "NetworkPolicy")
    for obj in document["items"]:
        validate(k8s, obj)
    spec = sandbox["spec"]["podTemplate"]["spec"]
    assert spec["activeDeadlineSeconds"] == 120 and spec["runtimeClassName"] == "kata"
    assert spec["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Mi"}
    version = "{}.{}".format(*sys.version_info[:2])  # gestvenv's default: this interpreter
    assert main_container(spec)["image"] == f"docker.io/library/python:{version}-slim"
    assert {"name": "MODE", "value": "ci"} in main_container(spec)["env"]
    shutdown = datetime.strptime(sandbox["spec"]["shutdownTime"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(shutdown.replace(tzinfo=UTC) - datetime.now(UTC) - timedelta(seconds=120)) \
        < timedelta(seconds=30)

    single = json.loads(CliRunner().invoke(manifest_command, ["one"]).stdout)
    assert single["kind"] == "Pod"  # one object: itself, no List
    assert single["spec"]["activeDeadlineSeconds"] == 3600  # default_ttl


@pytest.mark.parametrize(("args", "message"), [
    (["--requirements", "REQ"], "--requirements is not rendered"),
    (["--runtime", "systemd"], "run by the cluster"),
    (["--python", "3.12", "--image", "x/y:1"], "give one of them"),
    (["--processes", "10"], "not enforced by a Pod"),
])
def test_the_command_refuses_what_it_cannot_render(tmp_path: Path, args: list[str],
                                                   message: str) -> None:
    (tmp_path / "req.txt").write_text("six\n")
    args = [str(tmp_path / "req.txt") if a == "REQ" else a for a in args]
    result = CliRunner().invoke(manifest_command, ["demo", *args])
    assert result.exit_code == 1
    assert result.output.startswith("gestvenv: error: ") and message in result.output


def test_the_command_is_light(tmp_path: Path) -> None:
    """It runs nothing in an environment: none of what test_import_cost keeps out of the
    light commands (event loop, runtimes, builder, dbus...)."""
    out = tmp_path / "modules.json"
    probe = ("import json, sys\n"
             "from gestvenv.cli.manifest import manifest_command\n"
             "try:\n"
             "    manifest_command(['demo', '--memory', '64', '--no-network'])\n"
             "except SystemExit as exc:\n"
             "    assert not exc.code, exc.code\n"
             f"open({str(out)!r}, 'w').write(json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kind"] == "List"
    loaded = set(json.loads(out.read_text()))
    assert not sorted(LIGHT & loaded)
    assert "yaml" not in loaded and "gestvenv.manifest" in loaded
