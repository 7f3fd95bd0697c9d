"""The keys a JWT verifier checks signatures with, each bound to one algorithm.

A key never changes algorithm with the token: an HS256 secret only verifies HS256, an RSA
public key only RS256, an EC P-256 key only ES256. That is what defeats algorithm
confusion (a token saying ``HS256`` with the RSA public key, which is public, as its
HMAC secret): the token's ``alg`` only selects among the keys of that algorithm.

Keys come from configuration (a secret, PEM public keys or certificates, either possibly
named by ``kid``) and from a JWKS file, read again when it changes (:class:`KeyRing`).
Weak keys are refused: secrets under 32 bytes (RFC 7518 3.2), RSA under 2048 bits.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from wsgate.errors import ConfigError

log = logging.getLogger(__name__)

#: The shortest HS256 secret (RFC 7518 3.2: at least the hash's size).
MIN_SECRET_BYTES = 32
#: The smallest RSA key (RFC 7518 3.3).
MIN_RSA_BITS = 2048
#: A JWKS file is looked at (a stat) at most this often, on the connects that need a key.
JWKS_CHECK_S = 1.0

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?\r?\n-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class VerifyKey:
    """A key and the one algorithm it verifies."""

    algorithm: str
    #: ``bytes`` for HS256, a ``cryptography`` public key otherwise.
    key: Any = field(repr=False)
    kid: str | None = None


def secret_key(secret: str | bytes, kid: str | None = None) -> VerifyKey:
    """An HS256 key; raises ConfigError for a secret under 32 bytes or one that is a PEM
    key (give those as public keys)."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"an HS256 secret must be at least {MIN_SECRET_BYTES} bytes, got {len(raw)}"
        )
    if b"-----BEGIN" in raw:
        raise ConfigError("the HS256 secret is a PEM key: give public keys as public keys")
    return VerifyKey("HS256", raw, kid)


def pem_keys(pem: str | bytes, kid: str | None = None) -> list[VerifyKey]:
    """Every public key (``PUBLIC KEY``, ``RSA PUBLIC KEY``) and certificate of ``pem``,
    each with its algorithm; raises ConfigError for none, a private key, or a key of
    another kind, curve or a weak size."""
    raw = pem.encode() if isinstance(pem, str) else pem
    keys = []
    for block in _PEM_BLOCK.finditer(raw):
        kind = block.group(1).decode()
        if "PRIVATE" in kind:
            raise ConfigError("a JWT verifier takes public keys, not private ones")
        public: object
        try:
            if kind == "CERTIFICATE":
                public = x509.load_pem_x509_certificate(block.group(0)).public_key()
            else:
                public = load_pem_public_key(block.group(0))
        except ValueError as exc:
            raise ConfigError(f"unreadable PEM {kind}: {exc}") from None
        keys.append(VerifyKey(public_key_algorithm(public), public, kid))
    if not keys:
        raise ConfigError("no PEM public key or certificate found")
    return keys


def public_key_algorithm(public: object) -> str:
    """RS256 for an RSA key of 2048 bits or more, ES256 for an EC P-256 key; raises
    ConfigError for anything else."""
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise ConfigError(f"an RSA key must have at least {MIN_RSA_BITS} bits")
        return "RS256"
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, ec.SECP256R1):
            raise ConfigError(f"an EC key must be on P-256 (ES256), not {public.curve.name}")
        return "ES256"
    raise ConfigError(f"a {type(public).__name__} cannot verify HS256, RS256 or ES256")


def jwks_keys(text: str | bytes, allowed: Collection[str]) -> list[VerifyKey]:
    """The keys of a JWKS document that can verify one of ``allowed``. Keys for another
    use (``"use": "enc"``), of another algorithm, or weak are skipped (logged); raises
    ConfigError when the document is not a JWKS or none of its keys is usable."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"the JWKS is not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ConfigError('the JWKS must be a JSON object with a "keys" list')
    keys = []
    for index, entry in enumerate(entries):
        try:
            keys.append(_jwk(entry, allowed))
        except (ConfigError, jwt.PyJWTError) as exc:
            log.warning("JWKS key #%d skipped: %s", index, exc)
    if not keys:
        raise ConfigError(f"the JWKS has no key usable with {', '.join(sorted(allowed))}")
    return keys


def _jwk(entry: object, allowed: Collection[str]) -> VerifyKey:
    if not isinstance(entry, dict):
        raise ConfigError("not a JSON object")
    if entry.get("use", "sig") != "sig":
        raise ConfigError(f"its use is {entry.get('use')!r}, not sig")
    parsed = jwt.PyJWK.from_dict(entry)
    algorithm = parsed.algorithm_name
    if algorithm not in allowed:
        raise ConfigError(f"its algorithm {algorithm} is not allowed")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ConfigError("its kid is not a string")
    if algorithm == "HS256":
        return secret_key(parsed.key, kid)
    key = parsed.key
    if hasattr(key, "public_key"):
        key = key.public_key()  # a private JWK: only its public half is needed (or kept)
    if public_key_algorithm(key) != algorithm:
        raise ConfigError(f"its key does not fit its algorithm {algorithm}")
    return VerifyKey(algorithm, key, kid)


class KeyRing:
    """The keys of a verifier: ``fixed`` ones and, with ``jwks_path``, a JWKS file's.

    The file is read at construction (ConfigError if unusable) and again when its
    modification time, size or inode change (a ConfigMap's update included), looked at at
    most every ``check_interval_s`` when keys are asked for. A new version that is
    unreadable or unusable is logged and the previous keys stay in use.
    """

    def __init__(
        self,
        fixed: Iterable[VerifyKey],
        allowed: Collection[str],
        jwks_path: str | os.PathLike[str] | None = None,
        *,
        check_interval_s: float = JWKS_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fixed = list(fixed)
        self._allowed = frozenset(allowed)
        self._path = Path(jwks_path) if jwks_path is not None else None
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._jwks: list[VerifyKey] = []
        self._version: tuple[int, int, int] | None = None
        #: A version found unusable: not read (nor logged) again until the file changes.
        self._refused: tuple[int, int, int] | None = None
        self._next_check = 0.0
        if self._path is not None:
            try:
                version = self._stat()
                self._jwks = jwks_keys(self._path.read_bytes(), self._allowed)
            except OSError as exc:
                raise ConfigError(f"cannot read the JWKS {self._path}: {exc}") from None
            self._version = version
            self._next_check = clock() + check_interval_s
        if not self._fixed and not self._jwks:
            raise ConfigError("a JWT verifier needs at least one key")

    @property
    def keys(self) -> list[VerifyKey]:
        """Every key now (the JWKS file looked at first if it is time)."""
        self._refresh()
        return self._fixed + self._jwks

    def candidates(self, algorithm: str, kid: str | None) -> list[VerifyKey]:
        """The keys to try for a token of ``algorithm``: those named ``kid`` if the token
        names one that is known, else the unnamed ones; every key of the algorithm for a
        token without ``kid``."""
        keys = [k for k in self.keys if k.algorithm == algorithm]
        if kid is None:
            return keys
        named = [k for k in keys if k.kid == kid]
        return named or [k for k in keys if k.kid is None]

    def _stat(self) -> tuple[int, int, int]:
        assert self._path is not None
        st = self._path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        if self._path is None:
            return
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._check_interval_s
        version = None
        try:
            version = self._stat()
            if version in (self._version, self._refused):
                return
            keys = jwks_keys(self._path.read_bytes(), self._allowed)
        except (OSError, ConfigError) as exc:
            # Between two writes, or a bad version: keep serving with the keys we have.
            self._refused = version
            log.error("JWKS %s not reloaded, the previous keys stay: %s", self._path, exc)
            return
        self._jwks, self._version = keys, version
        log.info("JWKS %s reloaded: %d key(s)", self._path, len(keys))
