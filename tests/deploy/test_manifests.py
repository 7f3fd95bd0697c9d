"""The Kubernetes manifests (``deploy/k8s``): each kustomization renders, every object it
renders validates against the schema of a pinned Kubernetes version, and the manifests
agree with the code.

The drift checks read the rendered objects, not the source files, and compare them with
what the code serves and reads: the roles of ``wsgate.cli``, the settings (and their
``WSGATE_*`` names) of ``wsgate.config``, the probe paths of ``wsgate.probes``, the ports
and timeouts each role's config ends up with when it is built from the pod's own
environment, exactly as ``wsgate ROLE`` builds it. A setting renamed, a port or a probe
path changed in one place only fails here. NATS' configuration is checked the same way
(ports, routes, payload limit, credentials), by ``nats-server -t``, and by a real
nats-server started from the dev overlay's configuration that a client using the roles'
NATS URL must get into.

Rendering needs ``kubectl`` (its built-in kustomize); without it these tests are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import functools
import importlib.util
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import nats
import nats.errors
import pytest
import yaml

from gateway.server import ENVELOPE_MARGIN_BYTES
from stateservice.server import StateServer
from wsgate.cli import build_parser
from wsgate.config import GatewayConfig, StateConfig, WorkerConfig, env_variables
from wsgate.probes import HEALTH_PATH, METRICS_PATH, READY_PATH
from wsgate.procs import find_nats_server

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"

#: The Kubernetes version whose schema the manifests must satisfy (kubernetes-validate
#: bundles it). 1.32, the kubectl of this project's machines; the oldest the manifests
#: need is 1.30, where the preStop ``sleep`` action is on by default.
KUBERNETES_VERSION = "1.32.0"

#: Every kustomization: the base and the overlays.
TARGETS = ("base", "overlays/dev", "overlays/prod")

#: The roles that run in the cluster and the config each one builds (``wsgate dev`` and
#: ``wsgate bench`` do not belong in a cluster).
ROLE_CONFIGS: dict[str, type] = {
    "gateway": GatewayConfig,
    "worker": WorkerConfig,
    "state": StateConfig,
}

#: Where each role serves /healthz, /readyz and /metrics, read from its config.
HTTP_PORT: dict[str, Callable[[Any], int]] = {
    "gateway": lambda c: c.port,
    "worker": lambda c: c.port,
    "state": lambda c: c.probe_port,
}

#: NATS' own limit on max_payload (nats-server refuses more).
NATS_MAX_PAYLOAD_LIMIT = 64 * 1024 * 1024

#: The port nats-py dials when a NATS URL names none.
NATS_DEFAULT_PORT = 4222

#: Service types that are reachable from outside the cluster.
_EXPOSED = ("LoadBalancer", "NodePort")

#: The uid of the image (deploy/Dockerfile), used by every pod.
RUN_AS_USER = 10001

#: Who may reach whom (NetworkPolicy ingress): the flows the namespace must allow and
#: no others. Ports are filled in from the code and NATS' config by the test.
ANYWHERE = "*anywhere*"
SCRAPER = "*metrics namespace*"


# -- rendering --------------------------------------------------------------------------


def _kubectl() -> str | None:
    """kubectl beside this interpreter (a wheel may put it in the virtualenv, which the
    test command does not put on PATH), else on PATH."""
    return shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


@functools.cache
def _render(target: str) -> tuple[dict[str, Any], ...]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl is not installed: it renders the kustomizations (kubectl kustomize)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {target} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@dataclasses.dataclass(frozen=True)
class Container:
    """A container of a workload, with the pod it runs in."""

    workload: dict[str, Any]
    spec: dict[str, Any]

    @property
    def pod(self) -> dict[str, Any]:
        return dict(self.workload["spec"]["template"]["spec"])

    @property
    def pod_labels(self) -> dict[str, str]:
        return dict(self.workload["spec"]["template"]["metadata"].get("labels", {}))

    @property
    def name(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}:{self.spec['name']}"

    def port(self, ref: int | str) -> int | None:
        """The container port that a Service, probe or policy's port ``ref`` names."""
        for port in self.spec.get("ports", []):
            if ref in (port.get("name"), port["containerPort"]):
                return int(port["containerPort"])
        return None

    def mount_of(self, volume: str) -> str | None:
        for mount in self.spec.get("volumeMounts", []):
            if mount["name"] == volume:
                return str(mount["mountPath"])
        return None


@dataclasses.dataclass(frozen=True)
class Manifests:
    """The objects one kustomization renders."""

    target: str
    objects: tuple[dict[str, Any], ...]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.target}: expected one {kind} {name!r}, found {found}"
        return found[0]

    def workloads(self) -> list[dict[str, Any]]:
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")

    def containers(self) -> list[Container]:
        return [
            Container(w, c)
            for w in self.workloads()
            for c in w["spec"]["template"]["spec"]["containers"]
        ]

    def wsgate_containers(self) -> dict[str, Container]:
        """The containers of the wsgate image, by role (their first argument)."""
        by_role: dict[str, Container] = {}
        for c in self.containers():
            if _image_name(c.spec["image"]) != "wsgate":
                continue
            role = c.spec.get("args", [None])[0]
            assert role not in by_role, f"{self.target}: two containers run {role!r}"
            by_role[role] = c
        return by_role

    def nats(self) -> Container:
        found = [c for c in self.containers() if _image_name(c.spec["image"]) == "nats"]
        assert len(found) == 1, f"{self.target}: expected one NATS container, found {found}"
        return found[0]

    def workloads_selected(self, selector: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            w
            for w in self.workloads()
            if _selects(selector, w["spec"]["template"]["metadata"].get("labels", {}))
        ]

    def config_map(self, name: str) -> dict[str, str]:
        return dict(self.get("ConfigMap", name).get("data", {}))

    def secret(self, name: str) -> dict[str, str]:
        secret = self.get("Secret", name)
        data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        data.update(secret.get("stringData", {}))
        return data


@pytest.fixture(scope="module", params=TARGETS)
def manifests(request: pytest.FixtureRequest) -> Manifests:
    target = str(request.param)
    return Manifests(target, _render(target))


def _image_name(image: str) -> str:
    """``nats`` of ``nats:2.10-alpine``, ``wsgate`` of ``registry/x/wsgate:1``."""
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def _image_tag(image: str) -> str:
    last = image.rsplit("/", 1)[-1].split("@")[0]
    return last.split(":", 1)[1] if ":" in last else "latest"


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics: a Service's plain map, or matchLabels and
    matchExpressions."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


# -- a pod's environment, as the kubelet makes it -----------------------------------------

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _pod_env(m: Manifests, c: Container) -> dict[str, str]:
    """The container's environment: envFrom first, then env in order, with ``$(NAME)``
    expanded from what is defined before it (Kubernetes' rule; an undefined reference is
    left as it is). Field references become a stand-in value."""
    env: dict[str, str] = {}
    for source in c.spec.get("envFrom", []):
        if "configMapRef" in source:
            env.update(m.config_map(source["configMapRef"]["name"]))
        else:
            env.update(m.secret(source["secretRef"]["name"]))
    for var in c.spec.get("env", []):
        if "value" in var:

            def expand(match: re.Match[str], known: dict[str, str] = env) -> str:
                if match.group(0) == "$$":
                    return "$"
                return known.get(match.group(1), match.group(0))

            env[var["name"]] = _REFERENCE.sub(expand, var["value"])
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = m.secret(ref["name"])[ref["key"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = m.config_map(ref["name"])[ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            # The first pod's name: StatefulSets name their pods <name>-0, ...
            env[var["name"]] = f"{c.workload['metadata']['name']}-0"
        elif "fieldRef" in source:
            env[var["name"]] = f"<{source['fieldRef']['fieldPath']}>"
        else:
            env[var["name"]] = _resource_value(c, source["resourceFieldRef"])
    return env


def _resource_value(c: Container, ref: Mapping[str, str]) -> str:
    """What the kubelet puts in a resourceFieldRef variable: the quantity divided by the
    divisor (default 1), rounded up."""
    kind, _, resource = ref["resource"].partition(".")
    value = _quantity(c.spec["resources"][kind][resource]) / _quantity(ref.get("divisor", "1"))
    return str(math.ceil(value))


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """The subcommands of ``wsgate`` and their parsers."""
    parser = build_parser({})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@functools.cache
def _role_env_names(role: str) -> frozenset[str]:
    """Every WSGATE_* variable ``wsgate ROLE`` reads: its config's fields and the few
    options of the command itself (--log-level, --app-dir), which name theirs in --help."""
    names = set(env_variables(ROLE_CONFIGS[role]).values())
    for action in _subcommands()[role]._actions:
        names.update(re.findall(r"\[(WSGATE_[A-Z0-9_]+)", action.help or ""))
    return frozenset(names)


def _role_config(m: Manifests, role: str) -> Any:
    """The role's config, built from its container's environment and arguments by the
    same parser as ``wsgate ROLE``."""
    c = m.wsgate_containers()[role]
    env = _pod_env(m, c)
    try:
        args = build_parser(env).parse_args(c.spec["args"])
    except SystemExit as exc:
        pytest.fail(f"{m.target}: wsgate {role} rejects its environment or arguments ({exc})")
    config_type = ROLE_CONFIGS[role]
    return config_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)})


# -- NATS' configuration ------------------------------------------------------------------


def _nats_files(m: Manifests) -> tuple[Container, dict[str, str], str]:
    """The NATS container, its config files (mounted from a ConfigMap) and the main one."""
    c = m.nats()
    command = [*c.spec.get("command", []), *c.spec.get("args", [])]
    config_path = PurePosixPath(command[command.index("--config") + 1])
    for volume in c.pod["volumes"]:
        mount = c.mount_of(volume["name"])
        if "configMap" in volume and mount == str(config_path.parent):
            files = m.config_map(volume["configMap"]["name"])
            assert config_path.name in files, f"{m.target}: {config_path} is not in the ConfigMap"
            return c, files, config_path.name
    raise AssertionError(f"{m.target}: no ConfigMap is mounted where --config {config_path} is")


def _parse_nats_conf(files: Mapping[str, str], name: str) -> dict[str, Any]:
    """The subset of nats-server's config syntax that deploy/k8s uses: ``key: value``,
    ``key { ... }`` blocks, ``key: [ ... ]`` lists one item a line, ``include FILE``, and
    ``#`` comments."""
    lines: list[str] = []

    def load(file: str) -> None:
        for raw in files[file].splitlines():
            line = re.sub(r"(^|\s)#.*$", "", raw).strip()
            if line.startswith("include "):
                load(PurePosixPath(line.split(None, 1)[1].strip("'\"")).name)
            elif line:
                lines.append(line)

    load(name)
    it = iter(lines)

    def block() -> dict[str, Any]:
        result: dict[str, Any] = {}
        for line in it:
            if line == "}":
                return result
            match = re.fullmatch(r"([A-Za-z_][\w]*)\s*(?:[:=]\s*|\s+)(.*)", line)
            assert match, f"cannot read nats.conf line {line!r}"
            key, value = match.groups()
            if value == "{":
                result[key] = block()
            elif value == "[":
                items = []
                for item in it:
                    if item == "]":
                        break
                    items.append(item.rstrip(",").strip("'\""))
                result[key] = items
            else:
                result[key] = value.rstrip(",").strip("'\"")
        return result

    return block()


def _nats_size(value: str) -> int:
    """A nats-server size: ``8MB`` is 8 MiB, ``8M`` 8,000,000 (conf/parse.go)."""
    match = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", value)
    assert match, f"not a size: {value!r}"
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    binary = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
    suffix = match.group(2).lower()
    factor = units.get(suffix) or binary.get(suffix) or binary.get(suffix[:1] + "b")
    assert factor, f"unknown size unit in {value!r}"
    return int(match.group(1)) * factor


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert match, f"not a duration: {value!r}"
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity: CPU in cores (``250m``), memory in bytes (``1Gi``)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match, f"not a quantity: {value!r}"
    factors = {"": 1, "m": 0.001, "k": 1e3, "M": 1e6, "G": 1e9}
    factors |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(match.group(1)) * factors[match.group(2)]


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def _env_references(conf: Any) -> set[str]:
    """The environment variables a NATS config reads (``$NAME`` values)."""
    if isinstance(conf, dict):
        return set().union(*(_env_references(v) for v in conf.values()))
    if isinstance(conf, list):
        return set().union(*(_env_references(v) for v in conf))
    return {conf[1:]} if conf.startswith("$") else set()


# -- the tests ----------------------------------------------------------------------------


def test_each_kustomization_renders_every_part(manifests: Manifests) -> None:
    """Every part is there, in one namespace, and each deployed role runs once."""
    kinds = {o["kind"] for o in manifests.objects}
    assert kinds >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Service",
        "Deployment",
        "StatefulSet",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    (namespace,) = manifests.of_kind("Namespace")
    for obj in manifests.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace["metadata"]["name"], obj
    assert set(manifests.wsgate_containers()) == set(ROLE_CONFIGS)


def test_every_object_validates_against_the_kubernetes_schema(manifests: Manifests) -> None:
    """Strict: a misspelt or misplaced field fails, as ``kubectl apply`` would refuse it."""
    errors = []
    for obj in manifests.objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} {where}: {exc.message}")
    assert not errors, f"{manifests.target} against Kubernetes {KUBERNETES_VERSION}:\n" + "\n".join(
        errors
    )


def test_containers_run_real_roles_of_the_wsgate_command(manifests: Manifests) -> None:
    """The image's entrypoint is ``wsgate``; the first argument must be one of its roles
    and the whole argument list must parse as ``wsgate`` parses it."""
    for role, c in manifests.wsgate_containers().items():
        # The image's entrypoint is `wsgate`; the role is the first argument.
        assert c.spec.get("command", ["wsgate"]) == ["wsgate"], c.name
        assert role in ROLE_CONFIGS, f"{c.name}: {role!r} is not a role to deploy"
        assert role in _subcommands(), f"{c.name}: `wsgate {role}` does not exist"
        # The whole argument list parses as `wsgate` would parse it.
        _role_config(manifests, role)


def test_every_wsgate_variable_is_a_setting_of_its_role(manifests: Manifests) -> None:
    """A WSGATE_* variable the role does not read is a renamed or misplaced setting;
    a ``$(NAME)`` left unexpanded is a reference defined too late (or not at all)."""
    used_maps: set[str] = set()
    for role, c in manifests.wsgate_containers().items():
        env = _pod_env(manifests, c)
        unknown = sorted(
            n for n in env if n.startswith("WSGATE_") and n not in _role_env_names(role)
        )
        assert not unknown, f"{c.name}: wsgate {role} reads no {unknown}"
        leftovers = {n: v for n, v in env.items() if "$(" in v}
        assert not leftovers, f"{c.name}: unexpanded references (define them first): {leftovers}"
        used_maps.update(s["configMapRef"]["name"] for s in c.spec.get("envFrom", []))
    settings_maps = {
        cm["metadata"]["name"]
        for cm in manifests.of_kind("ConfigMap")
        if any(k.startswith("WSGATE_") for k in cm.get("data", {}))
    }
    assert settings_maps <= used_maps, f"settings no container reads: {settings_maps - used_maps}"


def test_each_role_builds_its_config_from_the_pod_environment(manifests: Manifests) -> None:
    """The values pass the config's own checks (ports, host:port, module:attribute...),
    listen on every interface, and the worker's app is a module that exists."""
    for role in ROLE_CONFIGS:
        config = _role_config(manifests, role)
        # In a pod, 127.0.0.1 (the default) would serve neither probes nor peers.
        assert config.host == "0.0.0.0", f"{role}: WSGATE_HOST is {config.host!r}"
    worker = _role_config(manifests, "worker")
    module = worker.app.split(":", 1)[0]
    assert importlib.util.find_spec(module) is not None, f"WSGATE_APP {worker.app!r}: no module"


def test_ports_and_probes_are_those_the_roles_serve(manifests: Manifests) -> None:
    """Container ports, probe ports and paths, and the scrape annotations equal what the
    role serves with the config built from the pod's environment."""
    for role, c in manifests.wsgate_containers().items():
        config = _role_config(manifests, role)
        http = HTTP_PORT[role](config)
        expected = {http, config.port} if role == "state" else {http}
        declared = {int(p["containerPort"]) for p in c.spec.get("ports", [])}
        assert declared == expected, f"{c.name}: ports {declared}, the {role} serves {expected}"

        ready = c.spec["readinessProbe"]["httpGet"]
        assert ready["path"] == READY_PATH, c.name
        assert c.port(ready["port"]) == http, f"{c.name}: readiness probe port {ready['port']}"
        for kind in ("livenessProbe", "startupProbe"):
            probe = c.spec.get(kind)
            if probe is None:
                assert kind == "startupProbe", f"{c.name}: no {kind}"
            elif "grpc" in probe:
                # The standard gRPC health service runs on the state service's gRPC port.
                assert role == "state", f"{c.name}: only the state service serves gRPC health"
                assert probe["grpc"]["port"] == config.port, f"{c.name}: {kind} gRPC port"
                assert probe["grpc"].get("service", "") == "", c.name
            else:
                assert probe["httpGet"]["path"] == HEALTH_PATH, f"{c.name}: {kind} path"
                assert c.port(probe["httpGet"]["port"]) == http, f"{c.name}: {kind} port"

        annotations = c.workload["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) == http, c.name
            assert annotations.get("prometheus.io/path", METRICS_PATH) == METRICS_PATH, c.name


def test_services_send_to_ports_the_pods_open(manifests: Manifests) -> None:
    """Each Service selects one workload and each of its ports reaches a container port."""
    for service in manifests.of_kind("Service"):
        name = service["metadata"]["name"]
        selected = manifests.workloads_selected(service["spec"]["selector"])
        assert len(selected) == 1, f"Service {name} selects {len(selected)} workloads"
        containers = [
            Container(selected[0], c) for c in selected[0]["spec"]["template"]["spec"]["containers"]
        ]
        headless = service["spec"].get("clusterIP") == "None"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            opened = {c.port(target) for c in containers} - {None}
            assert opened, f"Service {name} port {port['port']}: no container port {target!r}"
            if headless:
                # No proxy in between: clients dial the pod on the Service's port.
                assert opened == {port["port"]}, f"headless Service {name}: {port} vs {opened}"


def test_roles_address_nats_and_the_state_service_by_their_services(manifests: Manifests) -> None:
    """WSGATE_NATS_URL names the NATS Service, its client port and the Secret's
    credentials that nats.conf checks; WSGATE_STATE_ADDRESS names the state service (a pod
    of its StatefulSet through the headless Service) and its gRPC port."""
    m = manifests
    nats_c, files, main = _nats_files(m)
    conf = _parse_nats_conf(files, main)
    nats_client_port = _host_port(conf["listen"])[1]
    assert nats_c.port("client") == nats_client_port, "NATS' client containerPort vs listen"
    nats_secret_env = _pod_env(m, nats_c)
    user_var = conf["authorization"]["user"].lstrip("$")
    password_var = conf["authorization"]["password"].lstrip("$")
    for role in ROLE_CONFIGS:
        config = _role_config(m, role)
        for server in config.nats_servers:
            url = urlsplit(server)
            host, port = url.hostname or "", url.port or NATS_DEFAULT_PORT
            _assert_service_reaches(m, host, port, nats_c)
            assert nats_c.port(_service_target(m, host, port)) == nats_client_port, server
            # The credentials NATS checks are the ones the role sends.
            assert url.username == nats_secret_env[user_var], f"{role}: NATS user"
            assert url.password == nats_secret_env[password_var], f"{role}: NATS password"

    worker = _role_config(m, "worker")
    state = m.wsgate_containers()["state"]
    host, port = _host_port(worker.state_address)
    state_config = _role_config(m, "state")
    statefulset = state.workload
    assert statefulset["kind"] == "StatefulSet"
    service = statefulset["spec"]["serviceName"]
    pods = {
        f"{statefulset['metadata']['name']}-{i}" for i in range(statefulset["spec"]["replicas"])
    }
    # A pod of the StatefulSet by its stable name (<pod>.<service>), or the Service.
    pod, _, service_part = host.partition(".")
    if service_part:
        assert pod in pods, f"WSGATE_STATE_ADDRESS {host}: no such state pod ({pods})"
        assert service_part == service, f"WSGATE_STATE_ADDRESS {host}: not via {service}"
    else:
        assert host == service, f"WSGATE_STATE_ADDRESS {host}: not the state Service"
    _assert_service_reaches(m, service, port, state)
    assert state.port(_service_target(m, service, port)) == state_config.port, (
        f"WSGATE_STATE_ADDRESS port {port} does not reach the state service's gRPC port "
        f"{state_config.port}"
    )


def _service_target(m: Manifests, name: str, port: int) -> int | str:
    service = m.get("Service", name)
    for p in service["spec"]["ports"]:
        if p["port"] == port:
            target: int | str = p.get("targetPort", port)
            return target
    raise AssertionError(f"Service {name} has no port {port}")


def _assert_service_reaches(m: Manifests, name: str, port: int, c: Container) -> None:
    service = m.get("Service", name)
    assert _selects(service["spec"]["selector"], c.pod_labels), f"Service {name} misses {c.name}"
    _service_target(m, name, port)


def test_grace_periods_outlast_the_drains(manifests: Manifests) -> None:
    """terminationGracePeriodSeconds covers each role's drain (for the gateway, after
    the preStop sleep, which the grace period includes) and NATS' lame duck mode."""
    containers = manifests.wsgate_containers()
    gateway = containers["gateway"]
    pre_stop = gateway.spec["lifecycle"]["preStop"]
    # The grace period runs from the start of preStop: the sleep comes out of it.
    sleep = pre_stop["sleep"]["seconds"]
    drain = _role_config(manifests, "gateway").drain_timeout_s
    grace = gateway.pod["terminationGracePeriodSeconds"]
    assert grace > sleep + drain, f"gateway: grace {grace} s <= preStop {sleep} s + drain {drain} s"

    worker = containers["worker"]
    drain = _role_config(manifests, "worker").drain_timeout_s
    grace = worker.pod["terminationGracePeriodSeconds"]
    assert grace > drain, f"worker: grace {grace} s <= drain {drain} s"

    state = containers["state"]
    close_grace = inspect.signature(StateServer.close).parameters["grace_s"].default
    assert state.pod["terminationGracePeriodSeconds"] > close_grace

    nats_c, files, main = _nats_files(manifests)
    conf = _parse_nats_conf(files, main)
    lame_duck = _seconds(conf["lame_duck_grace_period"]) + _seconds(conf["lame_duck_duration"])
    assert nats_c.pod["terminationGracePeriodSeconds"] > lame_duck
    pid_file = conf["pid_file"]
    # Lame duck mode is signalled through the pid file the config names.
    command = nats_c.spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["nats-server", "--signal", f"ldm={pid_file}"]


def test_state_database_is_on_the_pod_volume(manifests: Manifests) -> None:
    """WSGATE_STATE_DB is on the StatefulSet's volume claim, one replica as documented."""
    state = manifests.wsgate_containers()["state"]
    config = _role_config(manifests, "state")
    statefulset = state.workload
    # One replica: every object lives on one state service (docs/architecture.md).
    assert statefulset["spec"]["replicas"] == 1
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {state.mount_of(v) for v in claims}
    assert str(PurePosixPath(str(config.db_path)).parent) in mounts, (
        f"WSGATE_STATE_DB {config.db_path} is not on a volume claim ({mounts})"
    )


def test_nats_config_matches_its_pods_and_the_gateway(manifests: Manifests) -> None:
    """nats.conf's ports, routes and paths match the StatefulSet and its Services, and its
    max_payload carries the gateway's largest message."""
    c, files, main = _nats_files(manifests)
    conf = _parse_nats_conf(files, main)
    assert conf["server_name"] == "$POD_NAME"
    assert c.port("client") == _host_port(conf["listen"])[1]
    assert c.port("monitor") == _host_port(conf["http"])[1]
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c.spec[kind]["httpGet"]
        assert probe["path"].split("?")[0] == "/healthz"
        assert c.port(probe["port"]) == c.port("monitor"), kind

    # A message of the gateway's limit must fit in one NATS message with its envelope.
    gateway = _role_config(manifests, "gateway")
    max_payload = _nats_size(conf["max_payload"])
    needed = gateway.max_message_bytes + ENVELOPE_MARGIN_BYTES
    assert needed <= max_payload <= NATS_MAX_PAYLOAD_LIMIT, f"max_payload {max_payload} < {needed}"

    # Every $NAME the config reads is in the container's environment.
    env = {v["name"] for v in c.spec.get("env", [])}
    assert _env_references(conf) <= env, f"nats.conf reads {_env_references(conf) - env}"

    statefulset = c.workload
    replicas = statefulset["spec"]["replicas"]
    service = statefulset["spec"]["serviceName"]
    cluster = conf.get("cluster")
    if replicas == 1:
        assert cluster is None or not cluster.get("routes"), "one server has no one to route to"
    else:
        assert cluster is not None, f"{replicas} NATS servers need a cluster block"
        port = _host_port(cluster["listen"])[1]
        assert c.port("cluster") == port
        name = statefulset["metadata"]["name"]
        assert set(cluster["routes"]) == {
            f"nats://{name}-{i}.{service}:{port}" for i in range(replicas)
        }, "routes must name each replica of the StatefulSet"
        headless = manifests.get("Service", service)
        assert headless["spec"]["clusterIP"] == "None"
        # Peers must find each other before any is ready.
        assert headless["spec"]["publishNotReadyAddresses"] is True
        # Clients keep to the nats Service (see cluster.conf).
        assert cluster.get("no_advertise") == "true"

    # JetStream's files on the volume claim, the pid file (for preStop) on a mounted volume.
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    store = PurePosixPath(conf["jetstream"]["store_dir"])
    assert any(store.is_relative_to(str(c.mount_of(v))) for v in claims if c.mount_of(v))
    pid_dir = str(PurePosixPath(conf["pid_file"]).parent)
    assert pid_dir in {m["mountPath"] for m in c.spec["volumeMounts"]}
    limit = _quantity(c.spec["resources"]["limits"]["memory"])
    assert limit > _nats_size(conf["jetstream"]["max_memory_store"]), "memory store over limit"


def test_nats_server_accepts_the_config(manifests: Manifests, tmp_path: Path) -> None:
    """``nats-server -t`` (the wheel's nats-server, a newer release than the image's, but
    the keys used here are all 2.10's) refuses unknown keys and bad values."""
    c, files, main = _nats_files(manifests)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, **_pod_env(manifests, c)}
    result = subprocess.run(
        [str(find_nats_server()), "--config", str(tmp_path / main), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_nats_lets_in_the_roles_with_their_credentials(tmp_path: Path) -> None:
    """The dev overlay's NATS config, run by a real nats-server (on 127.0.0.1 and a free
    port, its paths moved under tmp_path): the roles' WSGATE_NATS_URL gets in and finds
    room for the gateway's largest message; a wrong password does not."""
    m = Manifests("overlays/dev", _render("overlays/dev"))
    c, files, main = _nats_files(m)
    for name, text in files.items():
        text = text.replace("0.0.0.0:", "127.0.0.1:").replace(" /data", f" {tmp_path}/data")
        (tmp_path / name).write_text(text.replace("/var/run/nats/", f"{tmp_path}/"))
    proc = await asyncio.create_subprocess_exec(
        *[str(find_nats_server()), "--config", str(tmp_path / main)],
        *["--port", "-1", "--http_port", "-1"],
        env={**os.environ, **_pod_env(m, c)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(10):
            address = await _client_address(proc.stderr, log)
        gateway = _role_config(m, "gateway")
        (server,) = gateway.nats_servers
        configured = urlsplit(server)
        credentials = configured.netloc.rsplit("@", 1)[0]
        local = configured._replace(netloc=f"{credentials}@{address}")

        async def quiet(exc: Exception) -> None:
            pass

        nc = await nats.connect(local.geturl(), allow_reconnect=False, error_cb=quiet)
        try:
            assert gateway.max_message_bytes + ENVELOPE_MARGIN_BYTES <= nc.max_payload
        finally:
            await nc.close()
        wrong = local._replace(netloc=f"{configured.username}:wrong@{address}")
        refused = nats.NATS()
        try:
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await refused.connect(
                    wrong.geturl(), allow_reconnect=False, max_reconnect_attempts=0, error_cb=quiet
                )
        finally:
            # A refused client still holds its socket until closed.
            await refused.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        log += (await proc.stderr.read()).decode().splitlines()
        await proc.wait()
    # The wrong password is logged as an error; nothing else may be.
    errors = [line for line in log if "[ERR]" in line and "authentication error" not in line]
    assert not errors, "\n".join(log)


async def _client_address(stderr: asyncio.StreamReader, log: list[str]) -> str:
    """The host:port nats-server reports once it accepts clients."""
    while line := (await stderr.readline()).decode():
        log.append(line.rstrip())
        match = re.search(r"Listening for client connections on (\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("nats-server exited:\n" + "\n".join(log))


def test_pods_are_locked_down_and_sized(manifests: Manifests) -> None:
    """Non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp, a
    read-only root with an emptyDir /tmp, requests and limits, pinned images."""
    for c in manifests.containers():
        pod = c.pod
        assert pod["securityContext"]["runAsNonRoot"] is True, c.name
        assert pod["securityContext"]["runAsUser"] == RUN_AS_USER, c.name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", c.name
        assert pod.get("automountServiceAccountToken") is False, c.name
        context = c.spec["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, c.name
        assert context["readOnlyRootFilesystem"] is True, c.name
        assert context["capabilities"]["drop"] == ["ALL"], c.name
        assert "add" not in context["capabilities"], c.name
        resources = c.spec["resources"]
        for resource in ("cpu", "memory"):
            request = _quantity(resources["requests"][resource])
            limit = _quantity(resources["limits"][resource])
            assert 0 < request <= limit, f"{c.name}: {resource} {request} > {limit}"
        # Every volume a container mounts exists (a volume claim or the pod's volumes).
        volumes = {v["name"] for v in pod.get("volumes", [])}
        volumes |= {
            t["metadata"]["name"] for t in c.workload["spec"].get("volumeClaimTemplates", [])
        }
        for mount in c.spec.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{c.name}: no volume {mount['name']}"
        assert c.spec.get("imagePullPolicy") == "IfNotPresent", c.name
    for c in manifests.wsgate_containers().values():
        # Python and SQLite write temporary files; the root filesystem is read-only.
        tmp = [v for v in c.pod["volumes"] if c.mount_of(v["name"]) == "/tmp"]
        assert tmp, f"{c.name}: no writable /tmp"
        assert "emptyDir" in tmp[0], f"{c.name}: /tmp is not an emptyDir"
    # A pinned tag (nats:2.10-alpine), not whatever latest is on the day of a pull.
    assert ":" in manifests.nats().spec["image"]
    assert _image_tag(manifests.nats().spec["image"]) != "latest"
    if manifests.target == "overlays/prod":
        for c in manifests.wsgate_containers().values():
            assert _image_tag(c.spec["image"]) != "latest", f"{c.name}: prod runs a pinned tag"


def test_network_policies_let_in_only_the_expected_flows(manifests: Manifests) -> None:
    """Ingress only: the flows the policies allow, worked out from their selectors and
    the pods' named ports, are exactly the expected ones, with the ports the code uses."""
    policies = manifests.of_kind("NetworkPolicy")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and p["spec"].get("policyTypes") == ["Ingress"]
        and not p["spec"].get("ingress")
    ]
    assert deny, "no default-deny ingress policy"

    def component(c: Container) -> str:
        return c.pod_labels["app.kubernetes.io/component"]

    containers = manifests.containers()
    allowed: set[tuple[str, str, int]] = set()
    for policy in policies:
        targets = [c for c in containers if _selects(policy["spec"]["podSelector"], c.pod_labels)]
        for rule in policy["spec"].get("ingress", []):
            sources: set[str] = set()
            for peer in rule.get("from", [{}]):
                if not peer:
                    sources.add(ANYWHERE)
                elif "namespaceSelector" in peer:
                    assert "podSelector" not in peer, policy["metadata"]["name"]
                    sources.add(SCRAPER)
                elif "ipBlock" in peer:
                    sources.add(ANYWHERE)
                else:
                    sources |= {
                        component(c)
                        for c in containers
                        if _selects(peer["podSelector"], c.pod_labels)
                    }
            for port in rule["ports"]:
                opened = {(component(c), c.port(port["port"])) for c in targets} - {
                    (component(c), None) for c in targets
                }
                assert opened, f"{policy['metadata']['name']}: port {port['port']} opens nothing"
                allowed |= {(s, dest, p) for s in sources for dest, p in opened if p}

    gateway = _role_config(manifests, "gateway")
    worker = _role_config(manifests, "worker")
    state = _role_config(manifests, "state")
    _, files, main = _nats_files(manifests)
    conf = _parse_nats_conf(files, main)
    nats_client = _host_port(conf["listen"])[1]
    nats_monitor = _host_port(conf["http"])[1]
    expected = {
        (ANYWHERE, "gateway", gateway.port),
        ("gateway", "nats", nats_client),
        ("worker", "nats", nats_client),
        ("state", "nats", nats_client),
        ("worker", "state", state.port),
        (SCRAPER, "gateway", gateway.port),
        (SCRAPER, "worker", worker.port),
        (SCRAPER, "state", state.probe_port),
        (SCRAPER, "nats", nats_monitor),
    }
    if "cluster" in conf:
        expected.add(("nats", "nats", _host_port(conf["cluster"]["listen"])[1]))
    else:
        # A single server may still allow routes (harmless, nobody dials them).
        allowed = {a for a in allowed if a[:2] != ("nats", "nats")}
    assert allowed == expected, (
        f"allowed but not expected: {allowed - expected}; expected but not allowed: "
        f"{expected - allowed}"
    )

    # Only the gateway is exposed outside the cluster.
    exposed = [s for s in manifests.of_kind("Service") if s["spec"].get("type") in _EXPOSED]
    for service in exposed:
        selected = manifests.workloads_selected(service["spec"]["selector"])
        assert [w["metadata"]["name"] for w in selected] == [
            manifests.wsgate_containers()["gateway"].workload["metadata"]["name"]
        ]


def test_scaling_and_disruption_keep_capacity(manifests: Manifests) -> None:
    """Deployments are scaled by a CPU HPA and roll out by surge; each workload but the
    single state replica has a PDB; the overlays set what they promise."""
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in manifests.of_kind("HorizontalPodAutoscaler")
    }
    for deployment in manifests.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        assert name in hpas, f"Deployment {name} has no HorizontalPodAutoscaler"
        # The autoscaler owns the count; a replicas field would reset it at every apply.
        assert "replicas" not in deployment["spec"], f"Deployment {name} sets replicas"
        hpa = hpas[name]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        # Surge first, never below the current count: capacity holds during a rollout.
        assert rolling["maxUnavailable"] == 0, name
        assert rolling["maxSurge"] not in (0, "0%"), name
    for workload in manifests.workloads():
        name = workload["metadata"]["name"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert _selects(workload["spec"]["selector"], labels), name
        pdbs = [
            p
            for p in manifests.of_kind("PodDisruptionBudget")
            if _selects(p["spec"]["selector"], labels)
        ]
        # The state service (one replica) has none: it would only block node drains.
        if workload is not manifests.wsgate_containers()["state"].workload:
            assert len(pdbs) == 1, f"{name}: {len(pdbs)} PodDisruptionBudgets"
            # maxUnavailable, not minAvailable: one replica (dev) must not block a drain.
            assert pdbs[0]["spec"].get("maxUnavailable") == 1, name

    gateway_service = [
        s
        for s in manifests.of_kind("Service")
        if _selects(s["spec"]["selector"], manifests.wsgate_containers()["gateway"].pod_labels)
    ]
    (service,) = gateway_service
    nats_replicas = manifests.nats().workload["spec"]["replicas"]
    if manifests.target == "overlays/prod":
        assert service["spec"]["type"] == "LoadBalancer"
        assert all(h["spec"]["minReplicas"] >= 2 for h in hpas.values())
        assert nats_replicas == 3
    elif manifests.target == "overlays/dev":
        assert service["spec"]["type"] == "ClusterIP"
        assert all(h["spec"]["minReplicas"] == 1 for h in hpas.values())
        assert nats_replicas == 1
    else:
        assert nats_replicas == 3
