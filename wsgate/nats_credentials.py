"""NATS's nkey credentials, checked before nats-py uses them: user public keys (for
nats-server's users), seed files (``WSGATE_NATS_NKEY_SEED``) and ``.creds`` files
(``WSGATE_NATS_CREDS``).

An nkey is an ed25519 key pair. Its public key is base32 of a prefix byte (``U`` for a
user), the 32 bytes of the key and a CRC-16; its seed is the same with two prefix bytes
(``SU`` for a user) and is the secret. A ``.creds`` file holds a user JWT (signed by an
account, in NATS's operator mode) and the seed of the user it names, each between
``-----BEGIN ...-----`` and ``------END ...------`` lines.

nats-py reads these files only when it connects, and some mistakes make it fail in ways
that say nothing (a ``.creds`` file without a JWT makes it loop forever, a wrong kind of
seed is a bare ``nkeys: invalid seed``, a JWT of another user an ``Authorization
Violation``). The checks here read the files the way nats-py does and raise ConfigError
naming the setting, at start. They never put a seed in an error message.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import nkeys

from wsgate.errors import ConfigError

#: The lines before the parts of a ``.creds`` file, as nats-py looks for them.
CREDS_JWT_MARKER = "BEGIN NATS USER JWT"
CREDS_SEED_MARKER = "BEGIN USER NKEY SEED"


def is_user_public_key(key: str) -> bool:
    """Whether ``key`` is a NATS user public key (``U...``, 56 characters, its checksum
    right): what nats-server's ``nkey:`` of a user takes."""
    raw = _decode(key, 56)
    return raw is not None and raw[0] == nkeys.PREFIX_BYTE_USER


def user_public_key(seed: str) -> str:
    """The public key of the user nkey ``seed`` (``SU...``). Raises ValueError, without
    the seed in its message, if ``seed`` is not the seed of a NATS user (malformed, its
    checksum wrong, or an account's or operator's seed)."""
    raw = _decode(seed, 58)
    if raw is None:
        raise ValueError("not a NATS nkey seed")
    try:
        prefix, _ = nkeys.decode_seed(seed.encode())
        public_key: bytes = nkeys.from_seed(bytearray(seed.encode())).public_key
    except (nkeys.NkeysError, ValueError):
        raise ValueError("not a NATS nkey seed") from None
    if prefix != nkeys.PREFIX_BYTE_USER:
        raise ValueError("the seed of an nkey that is not a user's (SU...)")
    return public_key.decode()


def _decode(key: str, length: int) -> bytes | None:
    """The bytes of the encoded nkey ``key`` of ``length`` characters if its checksum
    (the last two bytes) is right, else None. nkeys checks no seed's checksum: a seed
    mistyped at the end would sign, as another user."""
    if len(key) != length:
        return None
    try:
        raw = base64.b32decode(key + "=" * (-len(key) % 8))
    except (binascii.Error, ValueError):
        return None
    body, checksum = raw[:-2], raw[-2:]
    return body if nkeys.crc16_checksum(body) == checksum else None


def check_seed_file(path: str, setting: str) -> None:
    """Raise ConfigError naming ``setting`` unless the file at ``path`` can be read and
    holds a user nkey seed (alone, as ``nk -gen user`` writes it; spaces around are
    ignored, as nats-py does)."""
    text = _read(path, setting)
    try:
        user_public_key(text.strip())
    except ValueError as exc:
        raise ConfigError(
            f"{setting}: {path!r} holds no NATS user nkey seed (one line starting SU): {exc}"
        ) from None


def check_creds_file(path: str, setting: str) -> None:
    """Raise ConfigError naming ``setting`` unless the file at ``path`` can be read and
    is a user's ``.creds`` file: a user JWT and the seed of the user that JWT names."""
    lines = _read(path, setting).splitlines(keepends=True)
    where = f"{setting}: {path!r}"
    token = _after(lines, CREDS_JWT_MARKER)
    if token is None:
        raise ConfigError(f"{where} is not a .creds file: no line -----{CREDS_JWT_MARKER}-----")
    seed = _after(lines, CREDS_SEED_MARKER)
    if seed is None:
        raise ConfigError(f"{where} has no user nkey seed: no line -----{CREDS_SEED_MARKER}-----")
    try:
        seed_user = user_public_key(seed)
    except ValueError as exc:
        raise ConfigError(f"{where}: the line after {CREDS_SEED_MARKER} is {exc}") from None
    claims = _jwt_claims(token) or {}
    nats_claims = claims.get("nats")
    if not isinstance(nats_claims, dict) or nats_claims.get("type") != "user":
        raise ConfigError(f"{where}: the line after {CREDS_JWT_MARKER} is not a NATS user JWT")
    if claims.get("sub") != seed_user:
        raise ConfigError(
            f"{where}: its JWT is for the user {claims.get('sub')!r}, its seed is the user "
            f"{seed_user!r}: the server would refuse them"
        )


def _read(path: str, setting: str) -> str:
    try:
        # Bytes as they are (no newline translation): nats-py reads them so.
        return Path(path).read_bytes().decode("ascii")
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{setting}: {path!r} is not a text file of NATS keys") from None


def _after(lines: list[str], marker: str) -> str | None:
    """The line after the one with ``marker``, less its last character, which is how
    nats-py reads both parts (so a line it would misread fails here too)."""
    for index, line in enumerate(lines[:-1]):
        if marker in line:
            return lines[index + 1][:-1]
    return None


def _jwt_claims(token: str) -> dict[str, object] | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None
