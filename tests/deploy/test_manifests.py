"""The Kubernetes manifests (``deploy/k8s``): each kustomization renders, every object it
renders validates against the schema of a pinned Kubernetes version, and the manifests
agree with the code.

The drift checks read the rendered objects, not the source files, and compare them with
what the code serves and reads: the roles of ``wsgate.cli``, the settings (and their
``WSGATE_*`` names) of ``wsgate.config``, the probe paths of ``wsgate.probes``, the ports
and timeouts each role's config ends up with when it is built from the pod's own
environment, exactly as ``wsgate ROLE`` builds it. A setting renamed, a port or a probe
path changed in one place only fails here. NATS' configuration is checked the same way
(ports, routes, payload limit, TLS, each role's user and permissions against
``wsgate.nats_permissions``), by ``nats-server -t``, and by a real nats-server started
from the dev overlay's configuration, which each role must get into with its own
credentials and certificate, and where a gateway's identity is refused what is not its.

The state tier runs over PostgreSQL (N replicas, the default) or on a SQLite file (one
replica, ``components/state-sqlite``): its DSN must come from a Secret, each replica must
advertise its pod IP, ``wsgate state migrate`` must create the schema before a replica
starts, and the dev overlay's own PostgreSQL, run by a real server with password
authentication, must let the state tier's DSN in.

Everything is encrypted: the gateway serves wss (and its probes HTTPS), the state service
requires client certificates, NATS requires TLS and client certificates of its clients
and of its routes. Every certificate setting, the roles' and nats-server's alike, names a
file of a Secret mounted whole, read-only and 0440 at ``/etc/wsgate/certs/<Secret>``,
under cert-manager's key names (``tls.crt``, ``tls.key``, ``ca.crt``); the cert-manager
Certificates of ``components/cert-manager`` make every one of those Secrets and agree
with the settings (the names that are dialled, usages, each side of a mutual TLS signed
by the CA the other side checks, and each CA that lets clients in signing only those
clients); the base, without them, leaves them to docs/deploy.md. prod exposes only wss,
allows a closed list of https origins and runs a named app, not the example. Wherever a
config or nats-server reads a mounted certificate, the test uses one stand-in per Secret
(``_STAND_INS``: a certificate of the test CA, valid for loopback, its key and the CA).

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

import jsonschema
import kubernetes_validate
import nats
import nats.errors
import psycopg
import psycopg.conninfo
import psycopg.sql
import pytest
import yaml

from tests.certs import Pki
from tests.harness import eventually
from wsgate import subjects
from wsgate.bus import connect_options, is_permission_violation
from wsgate.cli import build_parser
from wsgate.config import GatewayConfig, StateConfig, WorkerConfig, env_variables
from wsgate.gateway.server import ENVELOPE_MARGIN_BYTES
from wsgate.nats_permissions import Identity, permissions, render_authorization
from wsgate.pgserver import postgres_available, running_postgres
from wsgate.probes import HEALTH_PATH, METRICS_PATH, READY_PATH
from wsgate.procs import find_nats_server
from wsgate.stateservice.server import StateServer
from wsgate.stateservice.storage import PostgresStorage

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"

#: The Kubernetes version whose schema the manifests must satisfy (kubernetes-validate
#: bundles it). 1.32, the kubectl of this project's machines; the oldest the manifests
#: need is 1.30, where the preStop ``sleep`` action is on by default.
KUBERNETES_VERSION = "1.32.0"

#: Every kustomization: the base and the overlays.
TARGETS = ("base", "overlays/dev", "overlays/prod", "overlays/sqlite")

#: Secrets the manifests use but do not make, with what each key stands for in the tests:
#: the state tier's DSN names a database outside the manifests (docs/deploy.md says how to
#: create it). Only the dev overlay makes one, for its own PostgreSQL.
EXTERNAL_SECRETS: dict[str, dict[str, str]] = {
    "state-db": {"dsn": "postgresql://wsgate@db.invalid:5432/wsgate?sslmode=verify-full"},
}

#: How docs/deploy.md tells to create each external Secret.
EXTERNAL_SECRET_COMMAND = "kubectl -n wsgate create secret generic {name}"

#: A PostgreSQL URL or libpq string with a password in it.
_DSN_WITH_PASSWORD = re.compile(
    r"postgres(?:ql)?://[^/@\s:]+:[^@\s]+@|\bpassword\s*=\s*\S", re.IGNORECASE
)

#: The Secrets of certificates the pods mount, every one of the kustomizations' Secret
#: volumes. The base does not make them (the overlays' cert-manager Certificates do,
#: components/cert-manager); docs/deploy.md tells how to make them by hand, with the keys
#: cert-manager writes.
TLS_SECRETS = (
    *("gateway-tls", "state-tls", "worker-state-client-tls"),
    *("nats-server-tls", "nats-routes-tls"),
    *("nats-client-gateway-tls", "nats-client-worker-tls", "nats-client-state-tls"),
)

#: How docs/deploy.md tells to create each of them by hand, and each key's option.
TLS_SECRET_COMMAND = "kubectl -n wsgate create secret generic {name} --type=kubernetes.io/tls"
TLS_SECRET_KEY_OPTION = "--from-file={key}="

#: Where every pod mounts each certificate Secret it reads (whole, at <CERTS_DIR>/<Secret>),
#: and the mode of its files: read-only for the pod's group (its fsGroup), no one else.
CERTS_DIR = PurePosixPath("/etc/wsgate/certs")
SECRET_MODE = 0o440

#: The keys of a cert-manager Secret (type kubernetes.io/tls): the certificate with its
#: chain, its private key, and the CA that signed it.
CERT, KEY, CA = "tls.crt", "tls.key", "ca.crt"

#: The settings that name certificate files, by role, and the key of the Secret each one
#: must name: the certificate, its key and the CA the role checks its peer by, for wss,
#: the state service's mutual TLS and NATS. Their config fields are looked up by these
#: names (see _setting).
_NATS_CLIENT = {"WSGATE_NATS_TLS_CA": CA, "WSGATE_NATS_TLS_CERT": CERT, "WSGATE_NATS_TLS_KEY": KEY}
TLS_FILES: dict[str, dict[str, str]] = {
    "gateway": {"WSGATE_TLS_CERT": CERT, "WSGATE_TLS_KEY": KEY, **_NATS_CLIENT},
    "state": {
        **{"WSGATE_TLS_CERT": CERT, "WSGATE_TLS_KEY": KEY, "WSGATE_TLS_CLIENT_CA": CA},
        **_NATS_CLIENT,
    },
    "worker": {
        **{"WSGATE_STATE_TLS_CA": CA, "WSGATE_STATE_TLS_CERT": CERT, "WSGATE_STATE_TLS_KEY": KEY},
        **_NATS_CLIENT,
    },
}

#: nats-server's ``tls`` blocks (for its clients, and in ``cluster`` for its routes), as
#: the reader "nats" of TLS_FILES' kind: ``<block>.<file>`` and the key each must name.
NATS = "nats"
NATS_TLS_BLOCKS = ("tls", "cluster.tls")
NATS_TLS_BLOCK_FILES = {"cert_file": CERT, "key_file": KEY, "ca_file": CA}

#: What each certificate is for: of server and client authentication, exactly the usages
#: its Certificate must have, by its reader and setting. The routes' is both: each NATS
#: server dials its peers and is dialled by them.
CERT_USAGES: dict[tuple[str, str], set[str]] = {
    ("gateway", "WSGATE_TLS_CERT"): {"server auth"},
    ("state", "WSGATE_TLS_CERT"): {"server auth"},
    ("worker", "WSGATE_STATE_TLS_CERT"): {"client auth"},
    **{(role, "WSGATE_NATS_TLS_CERT"): {"client auth"} for role in ("gateway", "worker", "state")},
    (NATS, "tls.cert_file"): {"server auth"},
    (NATS, "cluster.tls.cert_file"): {"server auth", "client auth"},
}

#: Who trusts whom: (reader, the setting naming the CA it checks its peers by) -> the
#: certificates of the peers it must accept. Both sides of each mutual TLS are here.
TRUSTS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("worker", "WSGATE_STATE_TLS_CA"): (("state", "WSGATE_TLS_CERT"),),
    ("state", "WSGATE_TLS_CLIENT_CA"): (("worker", "WSGATE_STATE_TLS_CERT"),),
    **{
        (role, "WSGATE_NATS_TLS_CA"): ((NATS, "tls.cert_file"),)
        for role in ("gateway", "worker", "state")
    },
    (NATS, "tls.ca_file"): tuple(
        (role, "WSGATE_NATS_TLS_CERT") for role in ("gateway", "worker", "state")
    ),
    (NATS, "cluster.tls.ca_file"): ((NATS, "cluster.tls.cert_file"),),
}

#: The CAs that servers let clients in by: any client certificate such a CA signed gets
#: in, so it must sign the clients of TRUSTS and no other.
CLIENT_CAS = (
    ("state", "WSGATE_TLS_CLIENT_CA"),
    (NATS, "tls.ca_file"),
    (NATS, "cluster.tls.ca_file"),
)

#: cert-manager's API group. Its kinds are not in Kubernetes' schema: the objects of it
#: that the manifests use are checked against the subset of cert-manager v1 below (the
#: fields and enums of its CRDs, cert-manager.io_certificates.yaml and _issuers.yaml; a
#: field the manifests do not use is refused, as a misspelt one would be).
CERT_MANAGER = "cert-manager.io"

_GO_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_KEY_USAGES = [
    *("signing", "digital signature", "content commitment", "key encipherment"),
    *("key agreement", "data encipherment", "cert sign", "crl sign", "encipher only"),
    *("decipher only", "any", "server auth", "client auth", "code signing"),
    *("email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user"),
    *("timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"),
]
CERT_MANAGER_SCHEMAS: dict[str, dict[str, Any]] = {
    "Certificate": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": f"{CERT_MANAGER}/v1"},
            "kind": {"const": "Certificate"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["secretName", "issuerRef"],
                # The webhook wants at least one name of some kind.
                "anyOf": [{"required": [k]} for k in ("commonName", "dnsNames", "uris")],
                "properties": {
                    "secretName": {"type": "string"},
                    "commonName": {"type": "string", "maxLength": 64},
                    "dnsNames": _STRINGS,
                    "uris": _STRINGS,
                    "isCA": {"type": "boolean"},
                    "duration": _GO_DURATION,
                    "renewBefore": _GO_DURATION,
                    "usages": {"type": "array", "items": {"enum": _KEY_USAGES}},
                    "privateKey": {
                        "type": "object",
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        },
                        "additionalProperties": False,
                    },
                    "issuerRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                            "group": {"const": CERT_MANAGER},
                        },
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "Issuer": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": f"{CERT_MANAGER}/v1"},
            "kind": {"const": "Issuer"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                # One kind of issuer each.
                "minProperties": 1,
                "maxProperties": 1,
                "properties": {
                    "selfSigned": {"type": "object", "additionalProperties": False},
                    "ca": {
                        "type": "object",
                        "required": ["secretName"],
                        "properties": {"secretName": {"type": "string"}},
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}

#: Where the state replicas find their own pod IP (the downward API).
POD_IP_FIELDS = ("status.podIP", "status.podIPs")

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

#: The port libpq dials when a DSN names none.
PG_DEFAULT_PORT = 5432

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

    def renders(self, kind: str, name: str) -> bool:
        return any(o["metadata"]["name"] == name for o in self.of_kind(kind))

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

    def init_containers(self) -> list[Container]:
        return [
            Container(w, c)
            for w in self.workloads()
            for c in w["spec"]["template"]["spec"].get("initContainers", [])
        ]

    def wsgate_containers(self) -> dict[str, Container]:
        """The containers of the wsgate pods, by role (their first argument). By the pods'
        label, not the image: prod runs the user's image, built on the wsgate one."""
        by_role: dict[str, Container] = {}
        for c in self.containers():
            if not _is_wsgate(c):
                continue
            role = c.spec.get("args", [None])[0]
            assert role not in by_role, f"{self.target}: two containers run {role!r}"
            by_role[role] = c
        return by_role

    def postgres(self) -> Container | None:
        """The PostgreSQL that the kustomization runs itself (dev), if any."""
        found = [c for c in self.containers() if _image_name(c.spec["image"]) == "postgres"]
        assert len(found) <= 1, f"{self.target}: several PostgreSQL containers: {found}"
        return found[0] if found else None

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
        """The Secret's data, decoded; a Secret of EXTERNAL_SECRETS that this
        kustomization does not make gets its stand-in values."""
        if name in EXTERNAL_SECRETS and not self.renders("Secret", name):
            return dict(EXTERNAL_SECRETS[name])
        secret = self.get("Secret", name)
        data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        data.update(secret.get("stringData", {}))
        return data


@pytest.fixture(scope="module", params=TARGETS)
def manifests(request: pytest.FixtureRequest) -> Manifests:
    target = str(request.param)
    return Manifests(target, _render(target))


def _is_wsgate(c: Container) -> bool:
    """Whether the container is one of the wsgate pods' (the roles and the migration)."""
    return c.pod_labels.get("app.kubernetes.io/name") == "wsgate"


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
    same parser as ``wsgate ROLE``, with the files of its mounted Secrets standing in
    locally (a config may read the certificates it names)."""
    c = m.wsgate_containers()[role]
    env = _STAND_INS.localize(c, _pod_env(m, c))
    try:
        args = build_parser(env).parse_args(c.spec["args"])
    except SystemExit as exc:
        pytest.fail(f"{m.target}: wsgate {role} rejects its environment or arguments ({exc})")
    config_type = ROLE_CONFIGS[role]
    return config_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)})


def _setting(config: Any, env_name: str) -> Any:
    """The value of the config's field that ``env_name`` sets (by the variable, which the
    manifests use, not by the field's name)."""
    (name,) = [f for f, env in env_variables(type(config)).items() if env == env_name]
    return getattr(config, name)


# -- certificates ---------------------------------------------------------------------------


def _secret_mounts(c: Container) -> dict[str, str]:
    """The container's mounts of Secret volumes: mount path -> Secret name."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in c.pod["volumes"] if "secret" in v}
    return {
        m["mountPath"]: secrets[m["name"]]
        for m in c.spec.get("volumeMounts", [])
        if m["name"] in secrets
    }


def _mounted_file(c: Container, path: str) -> tuple[str, str] | None:
    """(Secret, key) of a file path in one of the container's Secret mounts, else None."""
    parent, key = str(PurePosixPath(path).parent), PurePosixPath(path).name
    secret = _secret_mounts(c).get(parent)
    return None if secret is None else (secret, key)


class _StandInSecrets:
    """Local files standing in for the certificate Secrets a pod mounts: a certificate
    and key of the test CA and the CA itself, under cert-manager's key names, one
    directory per Secret. Bound to the session's ``pki`` by a fixture."""

    def __init__(self) -> None:
        self._pki: Pki | None = None
        self._dirs: dict[str, Path] = {}

    def bind(self, pki: Pki) -> None:
        self._pki = pki

    def directory(self, secret: str) -> Path:
        if secret not in self._dirs:
            assert self._pki is not None, "the stand-in Secrets are not bound to a Pki"
            issued = self._pki.server(f"stand-in-{secret}")
            where = self._pki.root / "secrets" / secret
            where.mkdir(parents=True)
            for key, source in ((CERT, issued.cert), (KEY, issued.key), (CA, self._pki.ca)):
                (where / key).write_bytes(source.read_bytes())
            self._dirs[secret] = where
        return self._dirs[secret]

    def localize(self, c: Container, env: dict[str, str]) -> dict[str, str]:
        """``env`` with each path to a certificate file of a mounted Secret moved here."""
        local = dict(env)
        for name, value in env.items():
            found = _mounted_file(c, value) if value.startswith("/") else None
            if found is not None and found[1] in (CERT, KEY, CA):
                local[name] = str(self.directory(found[0]) / found[1])
        return local


_STAND_INS = _StandInSecrets()


@pytest.fixture(scope="module", autouse=True)
def _stand_in_secrets(pki: Pki) -> None:
    _STAND_INS.bind(pki)


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
    ``key { ... }`` blocks, ``key: [ ... ]`` lists one item a line (an item may be a
    ``{ ... }`` block, its braces on lines of their own), ``include FILE``, and ``#``
    comments."""
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
                items: list[Any] = []
                for item in it:
                    if item == "]":
                        break
                    items.append(block() if item == "{" else item.rstrip(",").strip("'\""))
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


def _without_comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def _runnable_nats_files(m: Manifests, tmp_path: Path) -> tuple[Container, Path]:
    """The NATS container's config files written under ``tmp_path``, runnable here: the
    Secrets it mounts are the stand-ins (_STAND_INS: certificates of the test CA, valid
    for loopback). Returns the container and the main file."""
    c, files, main = _nats_files(m)
    moved = {
        f"{mount}/": f"{_STAND_INS.directory(secret)}/"
        for mount, secret in _secret_mounts(c).items()
    }
    for name, text in files.items():
        for mount, directory in moved.items():
            text = text.replace(mount, directory)
        (tmp_path / name).write_text(text)
    return c, tmp_path / main


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
    """Strict: a misspelt or misplaced field fails, as ``kubectl apply`` would refuse it
    (cert-manager's objects: against the subset of its schema above)."""
    errors = []
    for obj in manifests.objects:
        try:
            if obj["apiVersion"].split("/")[0] == CERT_MANAGER:
                assert obj["kind"] in CERT_MANAGER_SCHEMAS, f"no schema for {obj['kind']}"
                jsonschema.validate(obj, CERT_MANAGER_SCHEMAS[obj["kind"]])
            else:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
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
    listen on every interface, and the worker's app is a module that exists (prod's is
    the user's, in the user's image: test_prod_runs_a_named_app_in_its_own_image)."""
    for role in ROLE_CONFIGS:
        config = _role_config(manifests, role)
        # In a pod, 127.0.0.1 (the default) would serve neither probes nor peers.
        assert config.host == "0.0.0.0", f"{role}: WSGATE_HOST is {config.host!r}"
    if manifests.target == "overlays/prod":
        return
    worker = _role_config(manifests, "worker")
    module = worker.app.split(":", 1)[0]
    assert importlib.util.find_spec(module) is not None, f"WSGATE_APP {worker.app!r}: no module"


def _serves_tls(role: str, config: Any) -> tuple[bool, bool]:
    """Whether the role serves TLS on (its HTTP port, its gRPC port): the gateway its
    WebSockets and probes on one port; the state service gRPC only, its probe port
    staying plain HTTP."""
    tls = role in ("gateway", "state") and bool(_setting(config, "WSGATE_TLS_CERT"))
    return (tls and role == "gateway", tls and role == "state")


def test_ports_and_probes_are_those_the_roles_serve(manifests: Manifests) -> None:
    """Container ports, probe ports, paths and schemes, and the scrape annotations equal
    what the role serves with the config built from the pod's environment: HTTPS where
    it serves TLS (the kubelet does not verify the certificate), and no gRPC probe on a
    TLS port (the kubelet's gRPC probe cannot speak TLS)."""
    for role, c in manifests.wsgate_containers().items():
        config = _role_config(manifests, role)
        http = HTTP_PORT[role](config)
        expected = {http, config.port} if role == "state" else {http}
        declared = {int(p["containerPort"]) for p in c.spec.get("ports", [])}
        assert declared == expected, f"{c.name}: ports {declared}, the {role} serves {expected}"
        https, grpc_tls = _serves_tls(role, config)
        scheme = "HTTPS" if https else "HTTP"

        ready = c.spec["readinessProbe"]["httpGet"]
        assert ready["path"] == READY_PATH, c.name
        assert c.port(ready["port"]) == http, f"{c.name}: readiness probe port {ready['port']}"
        assert ready.get("scheme", "HTTP") == scheme, f"{c.name}: readiness probe scheme"
        for kind in ("livenessProbe", "startupProbe"):
            probe = c.spec.get(kind)
            if probe is None:
                assert kind == "startupProbe", f"{c.name}: no {kind}"
            elif "grpc" in probe:
                # The standard gRPC health service runs on the state service's gRPC port.
                assert role == "state", f"{c.name}: only the state service serves gRPC health"
                assert not grpc_tls, f"{c.name}: a gRPC {kind} on a TLS port always fails"
                assert probe["grpc"]["port"] == config.port, f"{c.name}: {kind} gRPC port"
                assert probe["grpc"].get("service", "") == "", c.name
            else:
                # Start-up may wait for readiness (every part started); liveness may not.
                paths = {HEALTH_PATH, READY_PATH} if kind == "startupProbe" else {HEALTH_PATH}
                assert probe["httpGet"]["path"] in paths, f"{c.name}: {kind} path"
                assert c.port(probe["httpGet"]["port"]) == http, f"{c.name}: {kind} port"
                assert probe["httpGet"].get("scheme", "HTTP") == scheme, f"{c.name}: {kind}"

        annotations = c.workload["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) == http, c.name
            assert annotations.get("prometheus.io/path", METRICS_PATH) == METRICS_PATH, c.name
            assert annotations.get("prometheus.io/scheme", "http") == scheme.lower(), c.name


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
    """WSGATE_NATS_URL names the NATS Service and its client port; each role logs in as
    the NATS user of its identity (its WSGATE_NODE_NAME), with the credentials nats.conf
    checks for that user, whose permissions are its role's (wsgate.nats_permissions);
    WSGATE_STATE_ADDRESS (the workers' address of the state tier until they hear its
    replicas on the bus) names a Service that selects the state pods, or one pod of a
    StatefulSet by its stable name, and the gRPC port."""
    m = manifests
    nats_c, files, main = _nats_files(m)
    conf = _parse_nats_conf(files, main)
    nats_client_port = _host_port(conf["listen"])[1]
    assert nats_c.port("client") == nats_client_port, "NATS' client containerPort vs listen"
    nats_env = _pod_env(m, nats_c)
    users = {u["user"].lstrip("$"): u for u in conf["authorization"]["users"]}
    names = []
    for role in ROLE_CONFIGS:
        config = _role_config(m, role)
        for server in config.nats_servers:
            url = urlsplit(server)
            host, port = url.hostname or "", url.port or NATS_DEFAULT_PORT
            _assert_service_reaches(m, host, port, nats_c)
            assert nats_c.port(_service_target(m, host, port)) == nats_client_port, server
            assert url.username is None, f"{role}: credentials in WSGATE_NATS_URL"
        # The credentials NATS checks for the role's identity are the ones it sends.
        identity = Identity(role, config.node)
        user = users.get(identity.user_variable)
        assert user is not None, f"{role}: no NATS user for its node {config.node!r}"
        assert config.nats_user == nats_env[identity.user_variable], f"{role}: NATS user"
        password_var = user["password"].lstrip("$")
        assert config.nats_password == nats_env[password_var], f"{role}: NATS password"
        names.append(config.nats_user)
        granted = permissions(role, config.prefix, config.node)
        assert user["permissions"]["publish"]["allow"] == list(granted.publish), role
        assert user["permissions"]["subscribe"]["allow"] == list(granted.subscribe), role
    assert len(set(names)) == len(names), f"roles share a NATS user: {names}"
    assert len(users) == len(ROLE_CONFIGS), f"NATS users no role logs in as: {sorted(users)}"

    worker = _role_config(m, "worker")
    state = m.wsgate_containers()["state"]
    host, port = _host_port(worker.state_address)
    state_config = _role_config(m, "state")
    workload = state.workload
    pod, _, service = host.partition(".")
    if service:
        # A pod of a StatefulSet by its stable name (<pod>.<service>).
        assert workload["kind"] == "StatefulSet", f"WSGATE_STATE_ADDRESS {host}: no stable names"
        assert service == workload["spec"]["serviceName"], f"{host}: not via its Service"
        pods = {f"{workload['metadata']['name']}-{i}" for i in range(workload["spec"]["replicas"])}
        assert pod in pods, f"WSGATE_STATE_ADDRESS {host}: no such state pod ({pods})"
    else:
        service = host
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


def test_state_data_is_in_postgresql_or_on_the_pod_volume(manifests: Manifests) -> None:
    """Over PostgreSQL (the base, dev, prod) the state replicas keep nothing on disk: no
    volume but /tmp and Secrets, and several of them. On SQLite (overlays/sqlite)
    WSGATE_STATE_DB is on the StatefulSet's volume claim, and there is one replica: SQLite
    is one file."""
    state = manifests.wsgate_containers()["state"]
    config = _role_config(manifests, "state")
    workload = state.workload
    if config.postgres:
        assert "volumeClaimTemplates" not in workload["spec"], f"{state.name}: a volume claim"
        for volume in state.pod["volumes"]:
            # Scratch space, or read-only Secrets (its certificate).
            kept = not {"emptyDir", "secret"} & set(volume)
            assert not kept, f"{state.name}: volume {volume['name']} keeps data"
        assert workload["spec"]["replicas"] >= 2, f"{state.name}: one replica over PostgreSQL"
        return
    assert manifests.target == "overlays/sqlite", f"{manifests.target}: the state tier on SQLite"
    assert workload["kind"] == "StatefulSet"
    assert workload["spec"]["replicas"] == 1
    claims = {t["metadata"]["name"] for t in workload["spec"]["volumeClaimTemplates"]}
    mounts = {state.mount_of(v) for v in claims}
    assert str(PurePosixPath(str(config.db_path)).parent) in mounts, (
        f"WSGATE_STATE_DB {config.db_path} is not on a volume claim ({mounts})"
    )
    # It creates or migrates its schema itself at start.
    assert config.migrates_at_start, "WSGATE_STATE_MIGRATE: the SQLite replica must migrate"


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

    # Clients: TLS only, started first, each with a certificate of the CA. (Its files and
    # certificates: test_certificate_files_come_from_secrets_mounted_whole and
    # test_certificates_agree_with_the_settings, as every other TLS setting's.)
    tls = conf["tls"]
    assert tls.get("verify") == "true", "clients must show a certificate"
    assert tls.get("handshake_first") == "true", "the roles start TLS before NATS speaks"
    assert set(NATS_TLS_BLOCK_FILES) <= set(tls), f"tls: {tls}"

    # The users are what `wsgate nats-auth` makes for the roles' identities and prefix
    # (the file's header comments aside, which name the command).
    prefix = {_role_config(manifests, role).prefix for role in ROLE_CONFIGS}
    assert len(prefix) == 1, f"the roles use different subject prefixes: {prefix}"
    identities = [Identity(role, _role_config(manifests, role).node) for role in ROLE_CONFIGS]
    expected = render_authorization(prefix.pop(), identities, command="wsgate nats-auth")
    assert _without_comments(files["authorization.conf"]) == _without_comments(expected), (
        "authorization.conf is not what `wsgate nats-auth` makes for the roles' node names"
    )

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
        # Routes are mutual TLS.
        assert cluster["tls"].get("verify") == "true", "routes must verify their peers"
        assert set(NATS_TLS_BLOCK_FILES) <= set(cluster["tls"]), f"cluster tls: {cluster}"

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
    the keys used here are all 2.10's) refuses unknown keys and bad values; it loads the
    certificates too (stand-ins of the mounted Secrets)."""
    c, main = _runnable_nats_files(manifests, tmp_path)
    env = {**os.environ, **_pod_env(manifests, c)}
    result = subprocess.run(
        [str(find_nats_server()), "--config", str(main), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_nats_lets_in_the_roles_with_their_credentials(tmp_path: Path) -> None:
    """The dev overlay's NATS config, run by a real nats-server (on 127.0.0.1 and a free
    port, its paths moved under tmp_path, its certificates the stand-ins of its Secrets):
    each role gets in over TLS with its own user, password and client certificate (the
    stand-ins of the Secret its settings name), as its config makes the connection
    (wsgate.bus), and finds room for the gateway's largest message. The shipped
    permissions hold: the gateway's identity may not send a command, an ack, an alarm or
    a presence of another gateway, nor take the workers' queue; the worker's may not
    announce a gateway. A wrong password and a plaintext client do not get in."""
    m = Manifests("overlays/dev", _render("overlays/dev"))
    c, main = _runnable_nats_files(m, tmp_path)
    text = main.read_text().replace("0.0.0.0:", "127.0.0.1:").replace(" /data", f" {tmp_path}/data")
    main.write_text(text.replace("/var/run/nats/", f"{tmp_path}/"))
    proc = await asyncio.create_subprocess_exec(
        *[str(find_nats_server()), "--config", str(main)],
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
        refusals: dict[str, list[str]] = {}
        clients: dict[str, nats.NATS] = {}
        for role in ROLE_CONFIGS:
            config = dataclasses.replace(_role_config(m, role), nats_url=f"nats://{address}")
            errors = refusals[role] = []

            async def collect(exc: Exception, errors: list[str] = errors) -> None:
                if is_permission_violation(exc):
                    errors.append(str(exc))

            clients[role] = nc = nats.NATS()
            await nc.connect(
                **connect_options(config, role), error_cb=collect, allow_reconnect=False
            )
        gateway = _role_config(m, "gateway")
        prefix, other = gateway.prefix, "elsewhere-abcd1234"
        try:
            assert (
                gateway.max_message_bytes + ENVELOPE_MARGIN_BYTES <= clients["gateway"].max_payload
            )
            own = f"{gateway.node}-abcd1234"
            for subject in (
                subjects.gateway_subject(prefix, own),  # acks, commands: workers and state
                subjects.ack_subject(prefix, own, f"{own}_1", 1),  # progress: only workers
                subjects.alarm_subject(prefix, "chat"),  # alarms: only the state service
                subjects.presence_subject(prefix, other),  # another gateway's presence
            ):
                await clients["gateway"].publish(subject, b"forged")
            await clients["gateway"].subscribe(
                subjects.events_subject(prefix, gateway.app_name, subjects.ANY),
                queue=subjects.worker_queue(gateway.app_name),
            )
            await clients["gateway"].publish(subjects.presence_subject(prefix, own), b"mine")
            await clients["worker"].publish(subjects.presence_subject(prefix, own), b"forged")
            for nc in clients.values():
                await nc.flush()

            async def all_refused() -> bool:
                return len(refusals["gateway"]) >= 5 and len(refusals["worker"]) >= 1

            await eventually(all_refused, "the refusals", timeout_s=10)
            assert len(refusals["gateway"]) == 5, refusals
            assert refusals["state"] == []
        finally:
            for nc in clients.values():
                await nc.close()

        async def quiet(exc: Exception) -> None:
            pass

        worker = dataclasses.replace(_role_config(m, "worker"), nats_url=f"nats://{address}")
        for what, config in {
            "a wrong password": dataclasses.replace(
                worker, nats_password=worker.nats_password + "-wrong"
            ),
            "plaintext": dataclasses.replace(
                worker, nats_tls_ca="", nats_tls_cert="", nats_tls_key=""
            ),
        }.items():
            refused = nats.NATS()
            try:
                with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
                    await refused.connect(
                        **connect_options(config, "worker"),
                        allow_reconnect=False,
                        max_reconnect_attempts=0,
                        connect_timeout=1,
                        error_cb=quiet,
                    )
                assert not refused.is_connected, what
            finally:
                # A refused client still holds its socket until closed.
                await refused.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        log += (await proc.stderr.read()).decode().splitlines()
        await proc.wait()
    # The refusals are logged as errors; nothing else may be.
    expected = ("authentication error", "Violation", "TLS handshake")
    errors = [line for line in log if "[ERR]" in line and not any(e in line for e in expected)]
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
    read-only root with an emptyDir /tmp, requests and limits, pinned images; init
    containers (the state tier's migration) included."""
    for c in manifests.containers() + manifests.init_containers():
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
    wsgate = [c for c in manifests.containers() + manifests.init_containers() if _is_wsgate(c)]
    for c in wsgate:
        # Python and SQLite write temporary files; the root filesystem is read-only.
        tmp = [v for v in c.pod["volumes"] if c.mount_of(v["name"]) == "/tmp"]
        assert tmp, f"{c.name}: no writable /tmp"
        assert "emptyDir" in tmp[0], f"{c.name}: /tmp is not an emptyDir"
    # A pinned tag (nats:2.10-alpine, postgres:16), not whatever latest is on the day of a
    # pull.
    for c in manifests.containers():
        if not _is_wsgate(c):
            assert ":" in c.spec["image"], c.name
            assert _image_tag(c.spec["image"]) != "latest", c.name
    if manifests.target == "overlays/prod":
        for c in wsgate:
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
    postgres = manifests.postgres()
    if postgres is not None:
        # The state tier (its replicas and their migration) reaches its PostgreSQL on the
        # port its DSN names, through the Service.
        dsn = _dsn_parts(state.dsn)
        target = _service_target(manifests, dsn["host"], int(dsn.get("port", PG_DEFAULT_PORT)))
        expected.add(("state", component(postgres), postgres.port(target)))
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
    """Gateways and workers are scaled by a CPU HPA and roll out by surge; the state tier
    over PostgreSQL has a fixed count (a change of the replica set moves objects); each
    workload but a single-replica store (the SQLite state replica, dev's PostgreSQL) has a
    PDB; the overlays set what they promise."""
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in manifests.of_kind("HorizontalPodAutoscaler")
    }
    state = manifests.wsgate_containers()["state"].workload
    for deployment in manifests.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        if deployment is state:
            assert name not in hpas, "the state tier must not be autoscaled"
            assert deployment["spec"]["replicas"] >= 2, name
            # Either a surge, or one replica out at a time (never two of N).
            assert (rolling["maxSurge"], rolling["maxUnavailable"]) in {(1, 0), (0, 1)}, name
            continue
        assert name in hpas, f"Deployment {name} has no HorizontalPodAutoscaler"
        # The autoscaler owns the count; a replicas field would reset it at every apply.
        assert "replicas" not in deployment["spec"], f"Deployment {name} sets replicas"
        hpa = hpas[name]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
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
        single_store = workload["kind"] == "StatefulSet" and (
            workload is state or labels.get("app.kubernetes.io/name") == "postgres"
        )
        if single_store:
            # One replica keeping data on its volume: a PDB would only block node drains.
            assert workload["spec"]["replicas"] == 1, name
            assert not pdbs, f"{name}: a PDB on a single replica"
        else:
            assert len(pdbs) == 1, f"{name}: {len(pdbs)} PodDisruptionBudgets"
            # maxUnavailable, not minAvailable: one replica (dev) must not block a drain.
            assert pdbs[0]["spec"].get("maxUnavailable") == 1, name

    # A required one-per-node anti-affinity leaves a surge pod nowhere to go once every
    # node has a replica: such a rollout must replace pods, not add one first.
    for workload in manifests.of_kind("Deployment"):
        if _required_one_per_node(workload):
            rolling = workload["spec"]["strategy"]["rollingUpdate"]
            assert rolling["maxSurge"] == 0, workload["metadata"]["name"]

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
        # Three state replicas over PostgreSQL, one per node.
        assert state["kind"] == "Deployment"
        assert state["spec"]["replicas"] == 3
        assert _required_one_per_node(state), "prod: state replicas not required on 3 nodes"
    elif manifests.target == "overlays/dev":
        assert service["spec"]["type"] == "ClusterIP"
        assert all(h["spec"]["minReplicas"] == 1 for h in hpas.values())
        assert nats_replicas == 1
        assert state["spec"]["replicas"] == 2
    else:
        assert nats_replicas == 3
    if manifests.target != "overlays/sqlite":
        # Spread over nodes at least where the nodes allow it.
        affinity = state["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        terms = [
            *affinity.get("requiredDuringSchedulingIgnoredDuringExecution", []),
            *(
                t["podAffinityTerm"]
                for t in affinity.get("preferredDuringSchedulingIgnoredDuringExecution", [])
            ),
        ]
        labels = state["spec"]["template"]["metadata"]["labels"]
        assert any(
            t["topologyKey"] == "kubernetes.io/hostname" and _selects(t["labelSelector"], labels)
            for t in terms
        ), "state replicas: no anti-affinity across nodes"


def _required_one_per_node(workload: dict[str, Any]) -> bool:
    """Whether the workload's pods must each be on a node without another of them."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    affinity = workload["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
    return any(
        t["topologyKey"] == "kubernetes.io/hostname" and _selects(t["labelSelector"], labels)
        for t in affinity.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    )


# -- the state tier's database --------------------------------------------------------------


def _dsn_parts(dsn: str) -> dict[str, str]:
    """The parameters of a libpq key=value string or postgresql:// URL."""
    return {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items()}


def _env_var(c: Container, name: str) -> dict[str, Any] | None:
    return next((v for v in c.spec.get("env", []) if v["name"] == name), None)


def _migration(m: Manifests) -> Container:
    """The container that runs ``wsgate state migrate`` before the state replicas start."""
    state = m.wsgate_containers()["state"]
    found = [c for c in m.init_containers() if c.workload is state.workload]
    assert len(found) == 1, f"{m.target}: expected one wsgate init container, found {found}"
    return found[0]


def test_state_dsn_comes_from_a_secret(manifests: Manifests) -> None:
    """WSGATE_STATE_DSN is read from a Secret (secretKeyRef) wherever it is set, never
    written in a container's env, arguments or a ConfigMap; no DSN with a password is
    written anywhere but a Secret. The Secrets the manifests use are all made by the
    kustomization, except the external ones (the production DSN), which docs/deploy.md
    tells how to create; the dev overlay makes every Secret it uses."""
    m = manifests
    for c in m.containers() + m.init_containers():
        for var in c.spec.get("env", []):
            if "value" in var:
                assert not _DSN_WITH_PASSWORD.search(var["value"]), f"{c.name}: {var['name']}"
        if (var := _env_var(c, "WSGATE_STATE_DSN")) is not None:
            assert "secretKeyRef" in var.get("valueFrom", {}), f"{c.name}: DSN not from a Secret"
        words = [*c.spec.get("command", []), *c.spec.get("args", [])]
        assert not any(w.startswith("--dsn") for w in words), f"{c.name}: the DSN in arguments"
        assert not any(_DSN_WITH_PASSWORD.search(w) for w in words), c.name
    for cm in m.of_kind("ConfigMap"):
        data = cm.get("data", {})
        assert "WSGATE_STATE_DSN" not in data, f"ConfigMap {cm['metadata']['name']} has the DSN"
        for key, value in data.items():
            assert not _DSN_WITH_PASSWORD.search(value), (
                f"ConfigMap {cm['metadata']['name']}: {key}"
            )

    referenced = {
        var["valueFrom"]["secretKeyRef"]["name"]
        for c in m.containers() + m.init_containers()
        for var in c.spec.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    missing = {name for name in referenced if not m.renders("Secret", name)}
    if m.target == "overlays/dev":
        assert not missing, f"dev must make every Secret it uses: {missing}"
    else:
        assert missing <= set(EXTERNAL_SECRETS), f"Secrets neither made nor external: {missing}"
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for name in missing:
        assert EXTERNAL_SECRET_COMMAND.format(name=name) in docs, f"docs: how to create {name}"
        for key in EXTERNAL_SECRETS[name]:
            assert f"--from-literal={key}=" in docs, f"docs: the key {key} of {name}"

    config = _role_config(m, "state")
    if m.target == "overlays/sqlite":
        assert not config.postgres, "sqlite: the state tier has a DSN"
    else:
        # PostgreSQL is the default: the base and every overlay but sqlite.
        assert config.postgres, f"{m.target}: the state tier has no DSN"
        state_ref = _env_var(m.wsgate_containers()["state"], "WSGATE_STATE_DSN")
        migrate_ref = _env_var(_migration(m), "WSGATE_STATE_DSN")
        assert state_ref is not None
        assert migrate_ref == state_ref, "the migration and the replicas read different DSNs"


def test_state_replicas_advertise_their_pod_ip(manifests: Manifests) -> None:
    """Over PostgreSQL, each replica advertises ``<pod IP>:<its gRPC port>`` (the bound
    0.0.0.0 reaches nobody): a variable from the downward API's pod IP, defined before."""
    config = _role_config(manifests, "state")
    if not config.postgres:
        return  # one replica on SQLite: it has no one to advertise itself to
    state = manifests.wsgate_containers()["state"]
    env = state.spec["env"]
    names = [v["name"] for v in env]
    advertise = _env_var(state, "WSGATE_STATE_ADVERTISE")
    assert advertise is not None, f"{state.name}: no WSGATE_STATE_ADVERTISE"
    match = re.fullmatch(r"(\[?)\$\(([A-Za-z_][A-Za-z0-9_]*)\)(\]?):(.+)", advertise["value"])
    assert match, f"{state.name}: WSGATE_STATE_ADVERTISE={advertise['value']!r}"
    ip_var = match.group(2)
    assert ip_var in names[: names.index("WSGATE_STATE_ADVERTISE")], f"{ip_var} defined too late"
    field = (_env_var(state, ip_var) or {}).get("valueFrom", {}).get("fieldRef", {})
    assert field.get("fieldPath") in POD_IP_FIELDS, f"{ip_var} is not the pod's IP"
    # The port is the one the replica serves gRPC on.
    host, port = _host_port(config.advertise)
    assert host.strip("[]") == f"<{field['fieldPath']}>"
    assert port == config.port, f"advertised port {port}, gRPC on {config.port}"


def test_state_schema_is_migrated_before_a_replica_starts(manifests: Manifests) -> None:
    """Over PostgreSQL an init container of each replica runs ``wsgate state migrate``
    with the replicas' own settings and DSN, and the replicas only check the schema; on
    SQLite the one replica migrates at start."""
    config = _role_config(manifests, "state")
    state = manifests.wsgate_containers()["state"]
    if not config.postgres:
        assert config.migrates_at_start
        assert not state.pod.get("initContainers"), "SQLite needs no migration container"
        return
    assert not config.migrates_at_start, "replicas migrate at start: leave it to the init one"
    c = _migration(manifests)
    assert c.spec.get("command", ["wsgate"]) == ["wsgate"], c.name
    assert c.spec["args"][:2] == ["state", "migrate"], f"{c.name}: {c.spec['args']}"
    assert c.spec["image"] == state.spec["image"], "the migration and the replicas' images differ"
    env = _pod_env(manifests, c)
    names = _role_env_names("state")
    unknown = sorted(n for n in env if n.startswith("WSGATE_") and n not in names)
    assert not unknown, f"{c.name}: wsgate state reads no {unknown}"
    # The same settings as the replicas': what `wsgate state` builds from them is valid,
    # and names the same database.
    try:
        args = build_parser(env).parse_args(["state"])
    except SystemExit as exc:
        pytest.fail(f"{c.name}: wsgate state rejects its environment ({exc})")
    assert args.dsn == config.dsn


def test_migration_runs_a_command_of_the_wsgate_cli(manifests: Manifests) -> None:
    """The migration's argument list parses as ``wsgate`` parses it (skipped while the
    CLI has no ``state migrate``)."""
    if not _role_config(manifests, "state").postgres:
        return
    c = _migration(manifests)
    state_parser = _subcommands()["state"]
    nested = [a for a in state_parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not any("migrate" in a.choices for a in nested):
        pytest.skip("wsgate.cli has no `wsgate state migrate` yet")
    try:
        build_parser(_pod_env(manifests, c)).parse_args(c.spec["args"])
    except SystemExit as exc:
        pytest.fail(f"{c.name}: wsgate rejects {c.spec['args']} ({exc})")


def test_dev_overlay_runs_a_postgresql_for_the_state_tier() -> None:
    """Only the dev overlay runs a PostgreSQL: the state tier's DSN reaches it through its
    Service, names the user, password and database its entrypoint creates, and says its
    sslmode; its data directory is a directory of its own on its volume."""
    for target in TARGETS:
        if target != "overlays/dev":
            assert Manifests(target, _render(target)).postgres() is None, target
    m = Manifests("overlays/dev", _render("overlays/dev"))
    pg = m.postgres()
    assert pg is not None, "dev: no PostgreSQL"
    assert re.fullmatch(r"\d+(\.\d+)?(-[a-z0-9]+)?", _image_tag(pg.spec["image"])), pg.spec["image"]
    dsn = _dsn_parts(_role_config(m, "state").dsn)
    port = int(dsn.get("port", PG_DEFAULT_PORT))
    _assert_service_reaches(m, dsn["host"], port, pg)
    assert pg.port(_service_target(m, dsn["host"], port)) == pg.port("postgres")
    env = _pod_env(m, pg)
    assert dsn["user"] == env["POSTGRES_USER"]
    assert dsn["password"] == env["POSTGRES_PASSWORD"]
    assert dsn["dbname"] == env.get("POSTGRES_DB", env["POSTGRES_USER"])
    assert dsn.get("sslmode"), "say the sslmode (disable for the dev server, which has no TLS)"
    # initdb wants a directory of its own user, mode 0700: not the volume's root.
    claims = {t["metadata"]["name"] for t in pg.workload["spec"]["volumeClaimTemplates"]}
    (mount,) = {pg.mount_of(v) for v in claims} - {None}
    pgdata = PurePosixPath(env["PGDATA"])
    assert pgdata.is_relative_to(str(mount)), pgdata
    assert pgdata != PurePosixPath(str(mount)), pgdata
    # A fast shutdown: SIGTERM alone waits for the state replicas' sessions to end.
    assert "pg_ctl" in pg.spec["lifecycle"]["preStop"]["exec"]["command"]


async def test_dev_postgresql_lets_the_state_dsn_in(tmp_path: Path) -> None:
    """The dev overlay's user, password and database, made on a real PostgreSQL (Debian's,
    on 127.0.0.1) as the image's entrypoint makes them, with password authentication: the
    state tier's DSN (its host and port moved there) gets in, the schema is created on
    it and a replica's start accepts it; a wrong password is refused."""
    if not postgres_available():
        pytest.skip("PostgreSQL's binaries are not installed (scripts/bootstrap test does)")
    m = Manifests("overlays/dev", _render("overlays/dev"))
    pg = m.postgres()
    assert pg is not None
    env = _pod_env(m, pg)
    user, password = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]
    database = env.get("POSTGRES_DB", user)
    with running_postgres(tmp_path / "pg") as server:
        with psycopg.connect(server.dsn, autocommit=True) as admin:
            admin.execute(
                psycopg.sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                    psycopg.sql.Identifier(user), psycopg.sql.Literal(password)
                )
            )
            admin.execute(
                psycopg.sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    psycopg.sql.Identifier(database), psycopg.sql.Identifier(user)
                )
            )
            # As the image's pg_hba.conf: passwords over TCP (the admin keeps trust).
            hba = server.data_dir / "pg_hba.conf"
            hba.write_text(
                "local all all trust\n"
                f"host all {server.user} {server.host}/32 trust\n"
                f"host all all {server.host}/32 scram-sha-256\n"
            )
            admin.execute("SELECT pg_reload_conf()")
        dsn = psycopg.conninfo.make_conninfo(
            _role_config(m, "state").dsn, host=server.host, port=str(server.port)
        )
        storage = PostgresStorage(dsn, migrate=True)
        await storage.start()
        await storage.close()
        # What a replica does at start: the schema is there, at this code's version.
        replica = PostgresStorage(dsn, migrate=False)
        await replica.start()
        await replica.close()
        wrong = psycopg.conninfo.make_conninfo(dsn, password=password + "-wrong")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(wrong, connect_timeout=5).close()


# -- encryption, certificates and the hardened prod overlay -------------------------------


def _certificate_of(m: Manifests, secret: str) -> dict[str, Any] | None:
    """The cert-manager Certificate that makes the Secret, if the kustomization has one."""
    found = [c for c in m.of_kind("Certificate") if c["spec"]["secretName"] == secret]
    assert len(found) <= 1, f"{m.target}: several Certificates make {secret}: {found}"
    return found[0] if found else None


def _nats_tls_blocks(m: Manifests) -> dict[str, dict[str, str]]:
    """nats-server's tls blocks by NATS_TLS_BLOCKS' names (the cluster's, if it has one)."""
    _, files, main = _nats_files(m)
    conf = _parse_nats_conf(files, main)
    blocks = {"tls": conf.get("tls"), "cluster.tls": conf.get("cluster", {}).get("tls")}
    return {name: block for name, block in blocks.items() if block}


def _tls_files(m: Manifests) -> dict[tuple[str, str], tuple[str, str]]:
    """(reader, setting) -> (Secret, key) for every certificate file that is set: each
    role's settings of TLS_FILES, and nats-server's (reader NATS, setting
    ``<block>.<file>``). Each must be a file of a Secret its reader mounts."""
    files = {}
    for role, c in m.wsgate_containers().items():
        env = _pod_env(m, c)
        for name in TLS_FILES[role]:
            if env.get(name):
                found = _mounted_file(c, env[name])
                assert found is not None, f"{c.name}: {name}={env[name]} is in no mounted Secret"
                files[role, name] = found
    nats_c = m.nats()
    for block, tls in _nats_tls_blocks(m).items():
        for name in NATS_TLS_BLOCK_FILES:
            found = _mounted_file(nats_c, tls[name])
            assert found is not None, f"{nats_c.name}: {block} {name} is in no mounted Secret"
            files[NATS, f"{block}.{name}"] = found
    return files


def _expected_key(reader: str, setting: str) -> str:
    """The key of a cert-manager Secret that the setting must name."""
    if reader == NATS:
        return NATS_TLS_BLOCK_FILES[setting.rsplit(".", 1)[1]]
    return TLS_FILES[reader][setting]


def _tls_group(reader: str, setting: str) -> str:
    """The files that go together, a certificate, its key and the CA its reader checks the
    other side by: WSGATE_STATE_TLS_CA/_CERT/_KEY, a nats-server tls block's files."""
    if reader == NATS:
        return setting.rsplit(".", 1)[0]
    return re.sub(r"(_CLIENT)?_(CERT|KEY|CA)$", "", setting)


def test_certificate_files_come_from_secrets_mounted_whole(manifests: Manifests) -> None:
    """Every certificate file that a role's setting or nats-server's config names is the
    file of its cert-manager key (tls.crt, tls.key, ca.crt) in a Secret its reader mounts;
    a certificate, its key and the CA its reader checks the other side by come from one
    Secret, and a Secret serves one purpose only (each role its own NATS client
    certificate). Any other WSGATE_*TLS*KEY setting names a file of a mounted Secret too:
    a private key is never in a ConfigMap or the image. Every Secret that any pod mounts
    (the migration too, which builds the replica's config) is a certificate's, mounted
    the one way: whole (a subPath would never see a renewal) at /etc/wsgate/certs/<Secret>,
    read-only, mode 0440 for the pod's group (fsGroup) only, under cert-manager's key
    names. None is in git: the overlays' Certificates make every one, and for the base
    docs/deploy.md tells how to make each by hand."""
    m = manifests
    files = _tls_files(m)
    sources: dict[tuple[str, str], set[str]] = {}
    purposes: dict[str, set[tuple[str, str]]] = {}
    for (reader, setting), (secret, key) in files.items():
        expected = _expected_key(reader, setting)
        assert key == expected, f"{reader}: {setting} names {key}, not {expected}"
        group = (reader, _tls_group(reader, setting))
        sources.setdefault(group, set()).add(secret)
        purposes.setdefault(secret, set()).add(group)
    for group, secrets in sources.items():
        assert len(secrets) == 1, f"{m.target}: {group} from several Secrets: {secrets}"
    for secret, used_for in purposes.items():
        assert len(used_for) == 1, f"{m.target}: {secret} serves {sorted(used_for)}"
    for role in ROLE_CONFIGS:
        # A certificate and its key both set, or neither.
        for group in {_tls_group(role, name) for name in TLS_FILES[role]}:
            present = {(role, f"{group}{part}") in files for part in ("_CERT", "_KEY")}
            assert len(present) == 1, f"{role}: {group}_CERT without its key, or the reverse"

    containers = [
        *m.wsgate_containers().values(),
        *(c for c in m.init_containers() if _is_wsgate(c)),
    ]
    for c in containers:
        for name, value in _pod_env(m, c).items():
            if name.startswith("WSGATE_") and "TLS" in name and name.endswith("_KEY") and value:
                assert _mounted_file(c, value), f"{c.name}: {name}={value} is in no mounted Secret"
            if value.startswith("/etc/wsgate/"):
                # A path the image does not have: a volume must be mounted above it.
                mounts = [mount["mountPath"] for mount in c.spec.get("volumeMounts", [])]
                assert any(PurePosixPath(value).is_relative_to(d) for d in mounts), (
                    f"{c.name}: {name}={value} is not mounted"
                )
    mounted: set[str] = set()
    for c in m.containers() + m.init_containers():
        volumes = {v["name"]: v for v in c.pod.get("volumes", [])}
        for mount in c.spec.get("volumeMounts", []):
            # (A volume claim template is not among the pod's volumes: no Secret.)
            secret = volumes.get(mount["name"], {}).get("secret")
            if secret is None:
                continue
            name = secret["secretName"]
            mounted.add(name)
            where = f"{c.name}: {mount['name']}"
            assert mount["mountPath"] == str(CERTS_DIR / name), f"{where} at {mount['mountPath']}"
            assert mount.get("readOnly") is True, f"{where} is writable"
            assert "subPath" not in mount, f"{where} by subPath: no renewals"
            assert "items" not in secret, f"{where} renames cert-manager's keys"
            assert secret.get("defaultMode") == SECRET_MODE, f"{where}: mode {secret}"
            # Group-readable files need the pod's group to own them.
            assert c.pod["securityContext"].get("fsGroup") == RUN_AS_USER, where

    assert not {name for name in mounted if m.renders("Secret", name)}, "certificates in git"
    if m.target == "base":
        assert mounted == set(TLS_SECRETS), f"base: mounts {mounted}, not {TLS_SECRETS}"
        docs = (ROOT / "docs" / "deploy.md").read_text()
        for name in mounted:
            assert TLS_SECRET_COMMAND.format(name=name) in docs, f"docs: how to make {name}"
        for key in (CERT, KEY, CA):
            assert TLS_SECRET_KEY_OPTION.format(key=key) in docs, f"docs: the key {key}"
    else:
        unmade = {name for name in mounted if _certificate_of(m, name) is None}
        assert not unmade, f"{m.target}: Secrets no Certificate makes: {unmade}"


def _issuer(m: Manifests, secret: str) -> tuple[str, str]:
    """(kind, name) of the issuer of the Certificate that makes the Secret."""
    cert = _certificate_of(m, secret)
    assert cert is not None, f"{m.target}: no Certificate makes {secret}"
    ref = cert["spec"]["issuerRef"]
    return ref.get("kind", "Issuer"), ref["name"]


def _covers(dns_names: list[str], host: str) -> bool:
    """Whether a certificate for ``dns_names`` is valid for ``host`` (one-label ``*``)."""
    for name in dns_names:
        if name == host:
            return True
        if name.startswith("*.") and host.split(".", 1)[1:] == [name[2:]]:
            return True
    return False


def test_certificates_agree_with_the_settings(manifests: Manifests) -> None:
    """Where cert-manager makes the Secrets (every overlay): each Certificate's issuer is
    in the namespace (or a ClusterIssuer: prod's public one for the gateway); each CA
    Issuer's key is a CA certificate from a self-signed Issuer, kept at renewal; a Secret
    whose ca.crt is read comes from a CA Issuer (a public issuer writes none). Each
    certificate is for its side of the handshake (servers' for server authentication,
    clients' for client authentication, the NATS routes' for both) and signs nothing; it
    carries the names its clients verify (the state service's the fixed name the workers
    verify, NATS' the host of every role's WSGATE_NATS_URL, the routes' every route's
    pod); and each side of every mutual TLS (workers and state service, roles and NATS,
    NATS and its peers) is signed by the CA the other side checks it by. Each is renewed
    well before it ends."""
    m = manifests
    if not m.of_kind("Certificate"):
        assert m.target == "base", f"{m.target}: no Certificates"
        return
    issuers = {i["metadata"]["name"]: i["spec"] for i in m.of_kind("Issuer")}
    for cert in m.of_kind("Certificate"):
        ref, name = cert["spec"]["issuerRef"], cert["metadata"]["name"]
        assert ref.get("group", CERT_MANAGER) == CERT_MANAGER, name
        if ref.get("kind", "Issuer") == "Issuer":
            assert ref["name"] in issuers, f"Certificate {name}: no Issuer {ref['name']}"
        duration = _seconds(cert["spec"].get("duration", "2160h"))
        renew = _seconds(cert["spec"].get("renewBefore", f"{duration / 3}s"))
        # cert-manager's own bounds: at least 1 h, renewed at least 5 min before the end.
        assert duration >= 3600, name
        assert 300 <= renew < duration, name
    for name, spec in issuers.items():
        if "ca" in spec:
            ca = _certificate_of(m, spec["ca"]["secretName"])
            assert ca is not None, f"Issuer {name}: no Certificate makes its key"
            assert ca["spec"].get("isCA") is True, f"Issuer {name}: not a CA"
            assert "selfSigned" in issuers[ca["spec"]["issuerRef"]["name"]], name
            # A new key would leave every certificate signed before without a trusted CA.
            assert ca["spec"]["privateKey"]["rotationPolicy"] == "Never", name

    files = _tls_files(m)
    for secret, key in files.values():
        kind, issued_by = _issuer(m, secret)
        if key == CA:
            assert kind == "Issuer", f"{secret}: a ClusterIssuer may write no ca.crt"
            assert "ca" in issuers[issued_by], f"{secret}: its issuer writes no ca.crt"
    for (reader, setting), usages in CERT_USAGES.items():
        if (reader, setting) not in files:
            continue  # the routes' of a single NATS server
        cert = _certificate_of(m, files[reader, setting][0])
        assert cert is not None
        authentication = set(cert["spec"]["usages"]) & {"server auth", "client auth"}
        assert authentication == usages, f"{reader}: {setting} is for {authentication}"
        assert "cert sign" not in cert["spec"]["usages"], f"{reader}: {setting} may sign"
        assert not cert["spec"].get("isCA"), f"{reader}: {setting} is a CA"

    def dns_names(reader: str, setting: str) -> list[str]:
        cert = _certificate_of(m, files[reader, setting][0])
        assert cert is not None
        return list(cert["spec"].get("dnsNames", []))

    server_name = _setting(_role_config(m, "worker"), "WSGATE_STATE_TLS_SERVER_NAME")
    assert server_name, "the workers dial pod IPs: they must verify a fixed name"
    assert server_name in dns_names("state", "WSGATE_TLS_CERT"), f"state-tls: no {server_name!r}"
    for role in ROLE_CONFIGS:
        for server in _role_config(m, role).nats_servers:
            host = urlsplit(server).hostname or ""
            assert _covers(dns_names(NATS, "tls.cert_file"), host), f"{role} dials {server}"
    _, files_, main = _nats_files(m)
    for route in _parse_nats_conf(files_, main).get("cluster", {}).get("routes", []):
        host = urlsplit(route).hostname or ""
        assert _covers(dns_names(NATS, "cluster.tls.cert_file"), host), f"route {route}"

    # Mutual TLS: the CA each side checks the other by is the one that signed the other.
    for (reader, setting), peers in TRUSTS.items():
        if (reader, setting) not in files:
            continue
        trusted = _issuer(m, files[reader, setting][0])
        for peer in peers:
            assert _issuer(m, files[peer][0]) == trusted, f"{reader} ({setting}) vs {peer}"


def test_each_ca_lets_in_only_the_clients_meant_for_it(manifests: Manifests) -> None:
    """A server that requires client certificates lets in any client its CA signed: the
    state service (the workers), NATS' client port (the three roles, which then log in as
    their users) and NATS' routes (the other NATS servers, trusted with every subject).
    So each of their CAs signs for client authentication exactly the certificates meant
    for it: one CA for all would make a gateway's NATS certificate a worker's to the state
    service, and any role's a route into NATS past every permission."""
    m = manifests
    if not m.of_kind("Certificate"):
        return  # the base: the Secrets are made by hand (docs/deploy.md says with which CA)
    files = _tls_files(m)
    checked = 0
    for reader, setting in CLIENT_CAS:
        if (reader, setting) not in files:
            continue  # the routes' of a single NATS server
        checked += 1
        issuer = _issuer(m, files[reader, setting][0])
        signed = {
            cert["spec"]["secretName"]
            for cert in m.of_kind("Certificate")
            if (cert["spec"]["issuerRef"].get("kind", "Issuer"), cert["spec"]["issuerRef"]["name"])
            == issuer
            and "client auth" in cert["spec"].get("usages", [])
        }
        meant = {files[peer][0] for peer in TRUSTS[reader, setting]}
        assert signed == meant, (
            f"{m.target}: {reader} ({setting}) lets in {sorted(signed - meant)} too"
        )
    assert checked >= 2, f"{m.target}: the state service's and NATS' client CAs"


def test_clients_and_roles_talk_only_over_tls(manifests: Manifests) -> None:
    """Every kustomization: the gateway serves wss (a certificate and key) and a Service
    exposed outside the cluster reaches nothing else; the state service requires client
    certificates; the workers present one, trust a CA and verify a name; every role
    dials NATS over TLS with a client certificate and a CA to check NATS by (NATS' side,
    TLS only and client certificates required: test_nats_config_matches_its_pods_and_the_
    gateway)."""
    m = manifests
    for role in ROLE_CONFIGS:
        config = _role_config(m, role)
        for name in TLS_FILES[role]:
            assert _setting(config, name), f"{role}: {name} is not set"
        assert config.nats_tls, f"{role}: NATS in plaintext"
    worker = _role_config(m, "worker")
    assert _setting(worker, "WSGATE_STATE_TLS_SERVER_NAME"), "worker: no name to verify"
    gateway = _role_config(m, "gateway")
    gateway_c = m.wsgate_containers()["gateway"]
    for service in m.of_kind("Service"):
        if not _selects(service["spec"]["selector"], gateway_c.pod_labels):
            continue
        for port in service["spec"]["ports"]:
            target = gateway_c.port(port.get("targetPort", port["port"]))
            assert target == gateway.port, f"Service {service['metadata']['name']}: {port}"
            if service["spec"].get("type") in _EXPOSED:
                assert port["port"] == 443, f"wss on {port['port']}: clients expect 443"


def _open_origin(pattern: str) -> bool:
    """Whether an allowed-origin pattern lets in any site: no scheme://host, a wildcard
    host or one anywhere but a leading label (``https://*.example.com`` is a list of
    one site's hosts, ``https://*`` and ``https://*.com`` are everyone)."""
    scheme, sep, host = pattern.partition("://")
    if not sep or "*" in scheme:
        return True
    host = host.split(":")[0]
    rest = host[2:] if host.startswith("*.") else host
    return "*" in rest or (host != rest and "." not in rest) or not rest


def test_origins_are_an_allowlist(manifests: Manifests) -> None:
    """The gateway allows a closed list of origins everywhere (empty would be any); prod's
    are https pages of its own, not the port-forward address the base allows."""
    config = _role_config(manifests, "gateway")
    value = _setting(config, "WSGATE_ALLOWED_ORIGINS")
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    assert patterns, f"{manifests.target}: WSGATE_ALLOWED_ORIGINS is empty: any origin"
    for pattern in patterns:
        assert not _open_origin(pattern), f"{manifests.target}: {pattern!r} lets in any site"
    if manifests.target == "overlays/prod":
        for pattern in patterns:
            assert pattern.startswith("https://"), f"prod: {pattern!r} (a page over https only)"
            assert urlsplit(pattern.replace("*.", "")).hostname != "localhost", pattern


def test_open_origin_patterns_are_recognised() -> None:
    """The check above at its edges: one site's hosts pass, everyone's do not."""
    for closed in ("https://chat.example.com", "https://*.example.com", "https://localhost:8443"):
        assert not _open_origin(closed), closed
    for open_ in ("*", "https://*", "https://*.com", "*://chat.example.com", "https://a*.b.com"):
        assert _open_origin(open_), open_


def test_prod_runs_a_named_app_in_its_own_image() -> None:
    """prod deploys the user's app (WSGATE_APP names it) from the user's image, pinned;
    never the example app of the wsgate image and its demo token. Its gateway takes
    clients straight from the load balancer (their own addresses, for the per-address
    limits) unless it reads the PROXY protocol, and its certificate comes from an
    issuer outside the namespace, one that browsers trust."""
    m = Manifests("overlays/prod", _render("overlays/prod"))
    worker = _role_config(m, "worker")
    module = worker.app.split(":", 1)[0]
    assert module.split(".")[0] != "examples", f"prod runs the example app ({worker.app})"
    image = m.wsgate_containers()["worker"].spec["image"]
    assert _image_name(image) != "wsgate", f"prod: {image} is the wsgate image, not the app's"
    assert _image_tag(image) != "latest", image
    assert "WSGATE_DEMO_TOKEN" not in _pod_env(m, m.wsgate_containers()["worker"])

    gateway = _role_config(m, "gateway")
    (service,) = [s for s in m.of_kind("Service") if s["spec"].get("type") in _EXPOSED]
    if _setting(gateway, "WSGATE_PROXY_PROTOCOL") == "off":
        assert service["spec"].get("externalTrafficPolicy") == "Local", "clients' addresses"
        assert not _setting(gateway, "WSGATE_TRUSTED_PROXIES"), "a proxy trusted, none used"
    cert = _certificate_of(m, _tls_files(m)["gateway", "WSGATE_TLS_CERT"][0])
    assert cert is not None
    assert cert["spec"]["issuerRef"]["kind"] == "ClusterIssuer", "prod: the gateway's issuer"


def test_gateway_outbound_budget_fits_its_memory_limit(manifests: Manifests) -> None:
    """The bytes all clients of a gateway may leave unsent stay within half its memory
    limit: the budget must refuse before the kernel kills the pod."""
    config = _role_config(manifests, "gateway")
    c = manifests.wsgate_containers()["gateway"]
    limit = _quantity(c.spec["resources"]["limits"]["memory"])
    budget = _setting(config, "WSGATE_OUTBOUND_BUDGET_BYTES")
    assert budget <= limit / 2, f"{manifests.target}: budget {budget} of a {limit} limit"
