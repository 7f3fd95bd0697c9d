"""JWTs for tests: a secret drawn for the session, given to workers' apps by environment
(``WSGATE_JWT_*``, read by ``JWTVerifier.from_env``), and tokens signed with it."""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt

#: The HS256 secret of this test session (never a constant: no token of the repository
#: is valid anywhere).
SECRET = secrets.token_urlsafe(32)
AUDIENCE = "wsgate-tests"
ISSUER = "https://issuer.test"

#: The environment of a worker whose app verifies with ``JWTVerifier.from_env()``.
JWT_ENV = {
    "WSGATE_JWT_ALGORITHMS": "HS256",
    "WSGATE_JWT_SECRET": SECRET,
    "WSGATE_JWT_AUDIENCE": AUDIENCE,
    "WSGATE_JWT_ISSUER": ISSUER,
}


def token(sub: str = "alice", *, lifetime_s: float = 300, **claims: Any) -> str:
    """A token of this session's secret for ``sub``, valid for ``lifetime_s`` from now
    (negative: expired that long ago, beyond the default leeway of 30 s if over it);
    ``claims`` add to or replace the defaults (``aud``, ``iss``, ``exp``)."""
    payload = {"sub": sub, "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time() + lifetime_s)}
    return jwt.encode({**payload, **claims}, SECRET, algorithm="HS256")
