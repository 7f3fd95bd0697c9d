"""NATS's decentralized authentication for tests: nkeys, and the operator, account and user
JWTs that nats-server trusts in operator mode, made at test time (never a key of the
repository is valid anywhere).

A NATS JWT is a JWT with ``alg: ed25519-nkey``, signed by the issuer's nkey: the operator
signs itself and its accounts, an account signs its users. The claims follow nats-io/jwt
v2 (``iss``, ``sub`` the public keys, a ``jti``, and NATS's part under ``nats``: its
``type``, ``version: 2``, the limits, and a user's ``pub``/``sub`` allow lists). A
``.creds`` file is a user JWT and the user's seed, as ``nsc`` writes them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import nkeys

from wsgate.nats_permissions import Permissions

_PREFIXES = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}

#: What nats-io/jwt's NoLimit means: unlimited.
NO_LIMIT = -1


@dataclass(frozen=True)
class NKey:
    """An nkey: its seed (the secret, ``S...``) and public key (``O...``, ``A...``,
    ``U...``)."""

    seed: str
    public: str

    def sign(self, data: bytes) -> bytes:
        return bytes(nkeys.from_seed(bytearray(self.seed.encode())).sign(data))


def new_nkey(kind: str) -> NKey:
    """A new nkey of ``kind`` (``operator``, ``account`` or ``user``): 32 random bytes
    as the ed25519 seed, encoded as NATS encodes it."""
    seed = nkeys.encode_seed(secrets.token_bytes(32), _PREFIXES[kind])
    public = nkeys.from_seed(bytearray(seed)).public_key
    return NKey(seed.decode(), public.decode())


def mistyped(key: str) -> str:
    """``key`` (or seed) with one character changed, which its checksum must catch: the
    last but one (a seed's last character carries two bits of padding)."""
    return key[:-2] + ("B" if key[-2] == "A" else "A") + key[-1]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(issuer: NKey, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT of ``issuer`` about ``subject`` (a public key), its NATS claims
    ``nats`` (with ``version: 2`` added)."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
    }
    # As nats-io/jwt: the id is a hash of the claims without it (base32, no padding).
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    claims["nats"] = {**nats, "version": 2}
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signed = f"{header}.{payload}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def operator_jwt(operator: NKey, name: str = "wsgate-test") -> str:
    """The operator's JWT, signed by itself: what nats-server's ``operator`` trusts."""
    return encode_jwt(operator, operator.public, name, {"type": "operator"})


def account_jwt(operator: NKey, account: NKey, name: str = "wsgate") -> str:
    """An account of ``operator``, without limits (as ``nsc add account``)."""
    limits = {
        "subs": NO_LIMIT,
        "data": NO_LIMIT,
        "payload": NO_LIMIT,
        "imports": NO_LIMIT,
        "exports": NO_LIMIT,
        "wildcards": True,
        "conn": NO_LIMIT,
        "leaf": NO_LIMIT,
    }
    return encode_jwt(operator, account.public, name, {"type": "account", "limits": limits})


def user_jwt(account: NKey, user: NKey, name: str, permissions: Permissions) -> str:
    """A user of ``account`` allowed to publish and subscribe to ``permissions`` only."""
    nats = {
        "type": "user",
        "pub": {"allow": list(permissions.publish)},
        "sub": {"allow": list(permissions.subscribe)},
        "subs": NO_LIMIT,
        "data": NO_LIMIT,
        "payload": NO_LIMIT,
    }
    return encode_jwt(account, user.public, name, nats)


def creds(user_jwt: str, user: NKey) -> str:
    """The text of a ``.creds`` file: the user's JWT and seed, decorated as nsc does."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def operator_mode_config(operator: NKey, accounts: dict[NKey, str]) -> str:
    """nats-server's configuration trusting ``operator``, with the JWTs of ``accounts``
    (account key -> its JWT) preloaded in a memory resolver."""
    preload = "\n".join(f'  {account.public}: "{jwt}"' for account, jwt in accounts.items())
    return (
        f'operator: "{operator_jwt(operator)}"\n'
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n{preload}\n}}\n"
    )
