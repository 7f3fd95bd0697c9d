"""The roles' NATS permissions, worked out on the subjects the code really uses: each
identity may use its own traffic's subjects and no other identity's. (A real nats-server
enforcing them: tests/integration/test_nats_permissions.py.)"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from tests.nats_jwt import mistyped, new_nkey
from wsgate import subjects
from wsgate.cli import main
from wsgate.errors import ConfigError
from wsgate.nats_permissions import Identity, Permissions, permissions, render_authorization

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "deploy" / "k8s" / "base" / "nats" / "authorization.conf"

P = "acme.rt"
GW_A, GW_B = "edge-a-aaaa1111", "edge-b-bbbb2222"
WORKER = "box-cccc3333"
STATE_NODE = "state"
CONN_A, CONN_B = f"{GW_A}_1", f"{GW_B}_1"


def matches(pattern: str, subject: str) -> bool:
    """Whether permission ``pattern`` covers ``subject`` as nats-server decides it: ``*``
    is one token, ``>`` one or more at the end; a subscription's own wildcards must be
    covered by wildcards as wide (``*`` by ``*`` or ``>``, ``>`` by ``>`` only)."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or got[i] == ">" or token not in ("*", got[i]):
            return False
    return len(want) == len(got)


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(matches(p, subject) for p in patterns)


def gateway_traffic(gateway_id: str) -> tuple[list[str], list[str]]:
    """What a gateway publishes to and subscribes to, as the code makes the subjects."""
    node = gateway_id.rsplit("-", 1)[0]
    inbox = subjects.inbox_prefix(P, "gateway", node)
    publishes = [
        subjects.connect_subject(P, "main", gateway_id),
        subjects.events_subject(P, "main", gateway_id),
        subjects.events_subject(P, "other app", gateway_id),
        subjects.worker_subject(P, WORKER, "events", gateway_id),
        subjects.presence_subject(P, gateway_id),
    ]
    subscribes = [
        subjects.gateway_subject(P, gateway_id),
        subjects.ack_subject(P, gateway_id, subjects.ANY, subjects.ANY),
        f"{inbox}.Abc123.*",  # nats-py's request mux: <inbox_prefix>.<nuid>.*
    ]
    return publishes, subscribes


def test_matching_follows_nats() -> None:
    assert matches("a.*.c", "a.b.c")
    assert not matches("a.*", "a.b.c")
    assert matches("a.>", "a.b.c")
    assert not matches("a.>", "a")
    assert matches("a.*.>", "a.b.c")
    # Subscription patterns against permission patterns, token by token, as NATS does for
    # a wildcard subscription: a narrower pattern is inside a wider one.
    assert matches("a.*.*", "a.*.*")
    assert matches("a.>", "a.*.>")
    assert not matches("a.*.*", "a.b.>")
    assert not matches("a.b", "a.*")


def test_a_gateway_may_use_its_own_subjects_and_no_other_gateways() -> None:
    mine = permissions("gateway", P, "edge-a")
    own_pub, own_sub = gateway_traffic(GW_A)
    assert all(allowed(mine.publish, s) for s in own_pub), own_pub
    assert all(allowed(mine.subscribe, s) for s in own_sub), own_sub
    theirs_pub, theirs_sub = gateway_traffic(GW_B)
    forged = [
        *theirs_pub,  # connect, events, presence in another gateway's name
        subjects.gateway_subject(P, GW_B),  # acks and commands for another gateway
        subjects.gateway_subject(P, GW_A),  # ... or for itself: only workers send those
        subjects.ack_subject(P, GW_B, CONN_B, 1),  # a progress ack for another gateway
        subjects.ack_subject(P, GW_A, CONN_A, 1),  # ... or for itself
        subjects.alarm_subject(P, "chat"),  # an alarm
        subjects.worker_subject(P, WORKER, "alarm"),
        subjects.worker_subject(P, WORKER, "connect", GW_A),
        subjects.replicas_subject(P),
        f"{subjects.inbox_prefix(P, 'gateway', 'edge-b')}.Abc.1",  # a reply to another
        f"{subjects.inbox_prefix(P, 'state', STATE_NODE)}.Abc.1",
    ]
    assert [s for s in forged if allowed(mine.publish, s)] == []
    spied = [
        *theirs_sub,
        subjects.connect_subject(P, "main", subjects.ANY),  # the workers' queues
        subjects.events_subject(P, "main", subjects.ANY),
        subjects.alarm_subject(P, subjects.ANY),
        subjects.presence_subject(P, subjects.ANY),
        subjects.worker_subject(P, WORKER, "events", subjects.ANY),
        subjects.replicas_subject(P),
    ]
    assert [s for s in spied if allowed(mine.subscribe, s)] == []


def test_a_worker_serves_everyone_but_cannot_pose_as_a_gateway_or_the_state() -> None:
    mine = permissions("worker", P, "box")
    assert all(
        allowed(mine.publish, s)
        for s in (
            subjects.gateway_subject(P, GW_A),
            subjects.ack_subject(P, GW_B, CONN_B, 12),
            subjects.worker_subject(P, "other-dddd4444", "events", GW_A),
            subjects.worker_subject(P, "other-dddd4444", "alarm"),
            f"{subjects.inbox_prefix(P, 'gateway', 'edge-a')}.Abc.1",
            f"{subjects.inbox_prefix(P, 'state', STATE_NODE)}.Abc.1",
        )
    )
    assert all(
        allowed(mine.subscribe, s)
        for s in (
            subjects.connect_subject(P, subjects.ANY, subjects.ANY),
            subjects.events_subject(P, "main", subjects.ANY),
            subjects.alarm_subject(P, "chat"),
            subjects.worker_subject(P, WORKER, "connect", subjects.ANY),
            subjects.worker_subject(P, WORKER, "alarm"),
            subjects.replicas_subject(P),
        )
    )
    posing = [
        *gateway_traffic(GW_A)[0][:2],
        subjects.presence_subject(P, GW_A),
        subjects.alarm_subject(P, "chat"),
        subjects.replicas_subject(P),
    ]
    assert [s for s in posing if allowed(mine.publish, s)] == []
    spied = [
        subjects.gateway_subject(P, GW_A),
        subjects.ack_subject(P, GW_A, subjects.ANY, subjects.ANY),
        subjects.presence_subject(P, subjects.ANY),
        subjects.worker_subject(P, "other-dddd4444", "events", subjects.ANY),
        f"{subjects.inbox_prefix(P, 'gateway', 'edge-a')}.Abc.*",
    ]
    assert [s for s in spied if allowed(mine.subscribe, s)] == []


def test_the_state_service_broadcasts_and_fires_alarms_but_takes_no_requests() -> None:
    mine = permissions("state", P, STATE_NODE)
    assert allowed(mine.publish, subjects.gateway_subject(P, GW_A))
    assert allowed(mine.publish, subjects.alarm_subject(P, "chat"))
    assert allowed(mine.subscribe, subjects.presence_subject(P, subjects.ANY))
    assert not allowed(mine.subscribe, subjects.connect_subject(P, "main", subjects.ANY))
    assert not allowed(mine.publish, subjects.presence_subject(P, GW_A))
    assert not allowed(mine.publish, subjects.ack_subject(P, GW_A, CONN_A, 1))


def test_every_pattern_is_under_the_prefix() -> None:
    for role in ("gateway", "worker", "state"):
        granted: Permissions = permissions(role, P, "n-1")
        for pattern in granted.publish + granted.subscribe:
            assert pattern.startswith(f"{P}."), (role, pattern)
            assert ">" not in pattern or pattern.startswith(f"{P}.inbox."), (role, pattern)


def test_unknown_roles_and_bad_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no NATS permissions for role 'admin'"):
        permissions("admin", P, "x")
    with pytest.raises(ConfigError, match="WSGATE_NODE_NAME"):
        permissions("gateway", P, "Not.A.Node")
    with pytest.raises(ConfigError, match="WSGATE_PREFIX"):
        permissions("gateway", "a.*", "x")


def test_two_identities_sharing_variables_are_refused() -> None:
    with pytest.raises(ConfigError, match="NATS_GW_1_"):
        render_authorization(
            P, [Identity("gateway", "gw-1"), Identity("worker", "gw-1")], command="x"
        )


def test_each_identity_is_a_user_read_from_the_environment() -> None:
    text = render_authorization(
        P, [Identity("gateway", "edge-a"), Identity("gateway", "edge-b")], command="x"
    )
    assert text.count("user: $NATS_EDGE_A_USER") == 1
    assert text.count("password: $NATS_EDGE_B_PASSWORD") == 1
    assert '"acme.rt.gw.edge-b.*"' in text


def test_an_identity_given_an_nkey_is_the_user_of_that_key() -> None:
    key = new_nkey("user").public
    text = render_authorization(
        P, [Identity("gateway", "edge-a", key), Identity("worker", "box")], command="x"
    )
    edge_a = text[text.index("'edge-a'") : text.index("'box'")]
    assert f"      nkey: {key}\n" in edge_a
    assert "user:" not in edge_a
    assert "password:" not in edge_a
    assert '"acme.rt.gw.edge-a.*"' in edge_a
    assert text.count("user: $NATS_BOX_USER") == 1


@pytest.mark.parametrize(
    "nkey",
    [
        new_nkey("account").public,
        mistyped(new_nkey("user").public),  # its checksum wrong
        "Uxyz",
        new_nkey("user").seed,  # the secret, by mistake
    ],
    ids=["an account's", "mistyped", "short", "a seed"],
)
def test_an_nkey_that_is_not_a_user_public_key_is_refused(nkey: str) -> None:
    with pytest.raises(ConfigError, match="edge-a is not a NATS user public key") as caught:
        render_authorization(P, [Identity("gateway", "edge-a", nkey)], command="x")
    assert nkey not in str(caught.value)


def test_two_identities_with_one_nkey_are_refused() -> None:
    key = new_nkey("user").public
    with pytest.raises(ConfigError, match="edge-a and gateway:edge-b have the same nkey"):
        render_authorization(
            P, [Identity("gateway", "edge-a", key), Identity("gateway", "edge-b", key)], command="x"
        )


def test_nats_auth_takes_nkeys_by_node(capsys: pytest.CaptureFixture[str]) -> None:
    key = new_nkey("user").public
    assert main(["nats-auth", "--gateway", "edge-a", "--nkey", f"edge-a={key}"]) == 0
    out = capsys.readouterr().out
    assert f"`wsgate nats-auth --gateway edge-a --nkey edge-a={key}`" in out
    assert f"nkey: {key}" in out
    assert "$NATS_WORKER_USER" in out
    for wrong in (f"nobody={key}", "edge-a"):
        with pytest.raises(SystemExit) as exit_:
            main(["nats-auth", "--gateway", "edge-a", "--nkey", wrong])
        assert exit_.value.code == 2
    assert "--nkey for no identity: nobody" in capsys.readouterr().err


def test_the_shipped_authorization_is_what_the_code_makes() -> None:
    """deploy/k8s/base/nats/authorization.conf is ``wsgate nats-auth``'s output: a subject
    or a permission changed in the code, and not in the file, fails here. Make the file
    again with ``wsgate nats-auth --output deploy/k8s/base/nats/authorization.conf``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["nats-auth"]) == 0
    assert SHIPPED.read_text() == out.getvalue(), (
        "deploy/k8s/base/nats/authorization.conf is stale: run "
        "`wsgate nats-auth --output deploy/k8s/base/nats/authorization.conf`"
    )
