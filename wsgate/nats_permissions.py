"""What each role may publish and subscribe to on NATS, and nats-server's configuration of it.

The allow lists are built from the subject functions of :mod:`wsgate.subjects`, with
wildcards where a role serves anyone (:data:`~wsgate.subjects.ANY`) and the identity's own
node where a subject belongs to one gateway or worker
(:func:`~wsgate.subjects.any_id_of`). NATS denies everything an allow list does not name
(``$SYS``, JetStream's API, ``_INBOX``...). :func:`render_authorization` writes the
``authorization { users = [...] }`` block that ``deploy/k8s/base/nats/authorization.conf``
ships (``wsgate nats-auth`` writes it; a test fails when the file and this module differ).

What the lists guarantee (tests/integration/test_nats_permissions.py runs them on a real
nats-server):

- A **gateway** publishes only its own connect requests, events, presence and events for a
  durable object's host, each on a subject that names its identity; it reads only its own
  command subject (final acks and commands), event replies and inbox. It cannot send a
  command, an ack, an alarm or a presence for another gateway, nor take requests from the
  workers' queues.
- A **worker** takes the queues' requests, alarms and calls and its own subjects; it
  answers any gateway, worker and the state service, calls any object, and sends
  commands to any gateway (it serves them all).
  It cannot announce a gateway's presence, send connect requests or events as a gateway,
  send alarms or announce a state replica.
- The **state service** hears presence and replicas, sends broadcasts (commands) to any
  gateway and alarms to the workers; it takes no worker requests.

Identities: NATS has one user per identity (a gateway's or worker's node name, the state
service's node name); all processes of one identity share its permissions. The
Kubernetes Deployments run every gateway pod as the identity ``gateway`` (and so on):
isolating one gateway pod from another needs an identity per pod (a StatefulSet, whose
pods have stable names, each its own user here) or NATS JWT permission templates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wsgate import subjects
from wsgate.errors import ConfigError
from wsgate.ids import validate_node_name
from wsgate.nats_credentials import is_user_public_key
from wsgate.subjects import ANY, any_id_of

#: The roles that connect to NATS, each with its own permissions.
ROLES = ("gateway", "worker", "state")


@dataclass(frozen=True)
class Permissions:
    """The subjects one identity may publish to and subscribe to (NATS patterns)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def gateway_permissions(prefix: str, node: str) -> Permissions:
    """A gateway of identity ``node``: its own subjects only."""
    own = any_id_of(node)
    return Permissions(
        publish=(
            subjects.connect_subject(prefix, ANY, own),
            subjects.events_subject(prefix, ANY, own),
            subjects.request_subject(prefix, ANY, own),
            # A connection's events go straight to the worker hosting its durable object.
            subjects.worker_subject(prefix, ANY, "events", own),
            subjects.presence_subject(prefix, own),
            # Receipts for the server API's commands (a worker's request).
            subjects.under(subjects.inbox_prefix(prefix, "worker", ANY)),
        ),
        subscribe=(
            subjects.gateway_subject(prefix, own),
            subjects.ack_subject(prefix, own, ANY, ANY),
            subjects.under(subjects.inbox_prefix(prefix, "gateway", node)),
        ),
    )


def worker_permissions(prefix: str, node: str) -> Permissions:
    """A worker of identity ``node``: the queues, its own subjects, answers to anyone."""
    own = any_id_of(node)
    return Permissions(
        publish=(
            subjects.gateway_subject(prefix, ANY),
            subjects.ack_subject(prefix, ANY, ANY, ANY),
            # Requests forwarded to the worker that hosts their durable object.
            subjects.worker_subject(prefix, ANY, "connect", ANY),
            subjects.worker_subject(prefix, ANY, "events", ANY),
            subjects.worker_subject(prefix, ANY, "alarm"),
            subjects.worker_subject(prefix, ANY, "call"),
            subjects.worker_subject(prefix, ANY, "request"),
            # Calls of durable objects' methods, made by handlers.
            subjects.call_subject(prefix, ANY),
            # Answers to gateways' connect requests, to the state service's alarms and to
            # other workers' calls.
            subjects.under(subjects.inbox_prefix(prefix, "gateway", ANY)),
            subjects.under(subjects.inbox_prefix(prefix, "state", ANY)),
            subjects.under(subjects.inbox_prefix(prefix, "worker", ANY)),
        ),
        subscribe=(
            subjects.connect_subject(prefix, ANY, ANY),
            subjects.events_subject(prefix, ANY, ANY),
            subjects.request_subject(prefix, ANY, ANY),
            subjects.alarm_subject(prefix, ANY),
            subjects.worker_subject(prefix, own, "connect", ANY),
            subjects.worker_subject(prefix, own, "events", ANY),
            subjects.worker_subject(prefix, own, "alarm"),
            subjects.call_subject(prefix, ANY),
            subjects.worker_subject(prefix, own, "call"),
            subjects.worker_subject(prefix, own, "request"),
            subjects.replicas_subject(prefix),
            subjects.under(subjects.inbox_prefix(prefix, "worker", node)),
        ),
    )


def state_permissions(prefix: str, node: str) -> Permissions:
    """A state replica of identity ``node``: broadcasts, alarms, presence, replicas."""
    return Permissions(
        publish=(
            subjects.gateway_subject(prefix, ANY),
            subjects.alarm_subject(prefix, ANY),
            subjects.replicas_subject(prefix),
        ),
        subscribe=(
            subjects.presence_subject(prefix, ANY),
            subjects.replicas_subject(prefix),
            subjects.under(subjects.inbox_prefix(prefix, "state", node)),
        ),
    )


_BUILDERS = {
    "gateway": gateway_permissions,
    "worker": worker_permissions,
    "state": state_permissions,
}


def permissions(role: str, prefix: str, node: str) -> Permissions:
    """The permissions of identity ``node`` of ``role``. Raises ConfigError for an unknown
    role or an unusable prefix or node name."""
    if role not in _BUILDERS:
        raise ConfigError(f"no NATS permissions for role {role!r}; roles: {', '.join(ROLES)}")
    subjects.validate_prefix(prefix)
    validate_node_name(node)
    return _BUILDERS[role](prefix, node)


@dataclass(frozen=True)
class Identity:
    """One NATS user: a role's identity (its node name, ``WSGATE_NODE_NAME``), whose user
    name and password nats-server reads from the environment variables
    ``NATS_<NODE>_USER`` and ``NATS_<NODE>_PASSWORD`` (``-`` as ``_``); or, given
    ``nkey``, the user of that nkey (its public key, ``U...``, not a secret: it is written
    in the configuration), who logs in with its seed (``WSGATE_NATS_NKEY_SEED``)."""

    role: str
    node: str
    nkey: str = ""

    @property
    def variable_stem(self) -> str:
        return "NATS_" + re.sub(r"[^A-Z0-9]", "_", self.node.upper())

    @property
    def user_variable(self) -> str:
        return f"{self.variable_stem}_USER"

    @property
    def password_variable(self) -> str:
        return f"{self.variable_stem}_PASSWORD"


def render_authorization(prefix: str, identities: Iterable[Identity], *, command: str) -> str:
    """nats-server's ``authorization`` block for ``identities``, one user each (by name
    and password, or by nkey), with the permissions of its role. ``command`` is named in
    the header as the way to make the file again. Raises ConfigError for an identity
    listed twice (a node name is one user, whatever its role), an nkey that is not a user
    public key or is given twice, or an unusable prefix or node name."""
    listed: list[Identity] = list(identities)
    stems: dict[str, Identity] = {}
    nkeys: dict[str, Identity] = {}
    for identity in listed:
        if identity.nkey:
            if not is_user_public_key(identity.nkey):
                # Not echoed: it may be a seed, the secret, given by mistake.
                seed = " (a seed, the secret?)" if identity.nkey.startswith("S") else ""
                raise ConfigError(
                    f"the nkey of NATS identity {identity.role}:{identity.node} is not a NATS "
                    f"user public key{seed}: U..., 56 characters, as `nk -gen user -pubout` "
                    "prints it"
                )
            same = nkeys.setdefault(identity.nkey, identity)
            if same is not identity:
                raise ConfigError(
                    f"NATS identities {same.role}:{same.node} and {identity.role}:"
                    f"{identity.node} have the same nkey: give each its own"
                )
        clash = stems.setdefault(identity.variable_stem, identity)
        if clash is not identity:
            raise ConfigError(
                f"NATS identities {clash.role}:{clash.node} and {identity.role}:{identity.node} "
                f"share the variables {identity.variable_stem}_*: give them different node names"
            )
    lines = [
        "# The NATS users of the wsgate roles and what each may publish and subscribe to.",
        f"# Generated by `{command}` from wsgate/nats_permissions.py:",
        "# do not edit it by hand (a test compares it with what the code makes).",
        "# User names and passwords come from the environment (NATS_<NODE>_USER/_PASSWORD).",
        *(
            ["# Users given by nkey log in with its seed; their public keys are written here."]
            if any(identity.nkey for identity in listed)
            else []
        ),
        "authorization {",
        "  users = [",
    ]
    for identity in listed:
        allowed = permissions(identity.role, prefix, identity.node)
        lines += [
            f"    # {identity.role} identity {identity.node!r} (WSGATE_NODE_NAME={identity.node})",
            "    {",
            *(
                [f"      nkey: {identity.nkey}"]
                if identity.nkey
                else [
                    f"      user: ${identity.user_variable}",
                    f"      password: ${identity.password_variable}",
                ]
            ),
            "      permissions {",
            *_allow_block("publish", allowed.publish),
            *_allow_block("subscribe", allowed.subscribe),
            "      }",
            "    }",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _allow_block(kind: str, patterns: Sequence[str]) -> list[str]:
    return [
        f"        {kind} {{",
        "          allow: [",
        *(f'            "{pattern}"' for pattern in patterns),
        "          ]",
        "        }",
    ]
