"""``JWTVerifier``: checks the JSON Web Token a client connects with (PyJWT underneath).

::

    from wsgate import App, JWTVerifier

    verifier = JWTVerifier(algorithms=["RS256"], public_keys=PEM, audience="chat",
                           issuer="https://id.example.com")
    app = App()
    chat = app.route("/chat", auth=verifier)       # verified before on_connect, or:

    @other.on_connect
    async def on_connect(conn, request):
        claims = verifier.verify(request)            # raises Unauthorized (uncaught: 401)

What is checked, in order: a token is present (:func:`wsgate.worker.auth.find_token`); it parses;
its ``alg`` is one the verifier allows (never ``none``: only HS256, RS256 and ES256 exist
here); a key of that algorithm (named by the token's ``kid`` if it names a known one)
verifies its signature; the required claims are there (``exp`` by default); ``aud`` names
one of the audiences (a token with an ``aud`` is refused when none is configured, RFC 7519
4.1.3) and ``iss`` is one of the issuers, when configured; and, with ``leeway_s`` of clock
skew forgiven, ``exp`` is not past, ``nbf`` and ``iat`` are not ahead. The claims are
checked only once the signature holds: a forger learns nothing but "bad signature".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from wsgate.config import JWT_ALGORITHMS, MAX_JWT_LEEWAY_S, JWTConfig, from_environ
from wsgate.errors import ConfigError
from wsgate.values import Value
from wsgate.worker.auth import find_token
from wsgate.worker.errors import AuthFailure, Unauthorized
from wsgate.worker.jwt_keys import KeyRing, VerifyKey, pem_keys, secret_key

if TYPE_CHECKING:
    from wsgate.worker.app import ConnectRequest

#: The claims checked here against the clock (PyJWT checks the others).
_TIMED = ("exp", "nbf", "iat")

KeyText = str | bytes


class JWTVerifier:
    """Verifies JWTs signed with HS256, RS256 or ES256. One may serve many routes (on one
    event loop); a connect costs one signature check per candidate key, usually one.

    - ``algorithms``: the allow list (a subset of HS256, RS256, ES256).
    - ``secret``: the HS256 secret (at least 32 bytes), or ``{kid: secret}``.
    - ``public_keys``: PEM text of public keys or certificates (one text may hold
      several), a list of them, or ``{kid: pem}``.
    - ``jwks``: the path of a JWKS file, read again when it changes.
    - ``audience``, ``issuer``: a value or several accepted ones (None: not checked, but
      see the module's note on ``aud``).
    - ``leeway_s``: clock skew forgiven on ``exp``, ``nbf`` and ``iat`` (0..300 s).
    - ``required_claims``: claims every token must carry (``exp`` by default).
    - ``subprotocol``, ``query_param``: where else a token may be (see
      :mod:`wsgate.worker.auth`); the header ``Authorization: Bearer`` is always looked at.
    - ``clock``: seconds since the epoch (tests give their own).

    Raises ConfigError for an algorithm outside the three, no key, a key that no allowed
    algorithm uses, or a weak key.
    """

    def __init__(
        self,
        *,
        algorithms: Iterable[str],
        secret: KeyText | Mapping[str, KeyText] | None = None,
        public_keys: KeyText | Iterable[KeyText] | Mapping[str, KeyText] = (),
        jwks: str | os.PathLike[str] | None = None,
        audience: str | Iterable[str] | None = None,
        issuer: str | Iterable[str] | None = None,
        leeway_s: float = 30.0,
        required_claims: Iterable[str] = ("exp",),
        subprotocol: str | None = "bearer",
        query_param: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        allowed = tuple(dict.fromkeys(algorithms))
        for algorithm in allowed:
            if algorithm not in JWT_ALGORITHMS:
                raise ConfigError(
                    f"algorithms may be {', '.join(JWT_ALGORITHMS)}, not {algorithm!r}"
                )
        if not allowed:
            raise ConfigError("a JWT verifier needs at least one algorithm")
        if not 0 <= leeway_s <= MAX_JWT_LEEWAY_S:
            raise ConfigError(f"leeway_s must be in 0..{MAX_JWT_LEEWAY_S:g}, got {leeway_s}")
        fixed = _secret_keys(secret) + _public_keys(public_keys)
        for key in fixed:
            if key.algorithm not in allowed:
                raise ConfigError(
                    f"a configured key is for {key.algorithm}, which algorithms "
                    f"({', '.join(allowed)}) does not allow"
                )
        self.algorithms = allowed
        self.audience = _values(audience)
        self.issuer = _values(issuer)
        self.leeway_s = float(leeway_s)
        self.required_claims = tuple(required_claims)
        self.subprotocol = subprotocol
        self.query_param = query_param
        self._clock = clock
        self._keys = KeyRing(fixed, allowed, jwks)
        self._jwt = jwt.PyJWT(
            options={
                # Timed claims are checked here, against self._clock, after the rest.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_iss": self.issuer is not None,
                "require": list(self.required_claims),
                "enforce_minimum_key_length": True,
            }
        )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        subprotocol: str | None = "bearer",
        query_param: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> JWTVerifier:
        """A verifier configured by ``WSGATE_JWT_*`` (:class:`wsgate.config.JWTConfig`):
        ``ALGORITHMS`` (default all three), ``SECRET``, ``PUBLIC_KEY`` (a PEM file's path),
        ``JWKS`` (a JWKS file's path), ``AUDIENCE`` and ``ISSUER`` (comma-separated),
        ``LEEWAY_S`` (default 30), ``REQUIRED_CLAIMS`` (default ``exp``). Raises
        ConfigError naming the variable at fault, or when no key is set."""
        config = from_environ(JWTConfig, os.environ if environ is None else environ)
        allowed = config.algorithm_list
        secret = config.secret or None
        if secret is not None and "HS256" not in allowed:
            raise ConfigError("WSGATE_JWT_SECRET is set but WSGATE_JWT_ALGORITHMS lacks HS256")
        try:
            if secret is not None:
                secret_key(secret)
        except ConfigError as exc:
            raise ConfigError(f"secret (WSGATE_JWT_SECRET): {exc}") from None
        public_keys: list[bytes] = []
        if config.public_key:
            try:
                public_keys.append(Path(config.public_key).read_bytes())
                pem_keys(public_keys[0])
            except (OSError, ConfigError) as exc:
                raise ConfigError(f"public_key (WSGATE_JWT_PUBLIC_KEY): {exc}") from None
        try:
            return cls(
                algorithms=allowed,
                secret=secret,
                public_keys=public_keys,
                jwks=config.jwks or None,
                audience=config.audience_list or None,
                issuer=config.issuer_list or None,
                leeway_s=config.leeway_s,
                required_claims=config.required_claim_list,
                subprotocol=subprotocol,
                query_param=query_param,
                clock=clock,
            )
        except ConfigError as exc:
            raise ConfigError(f"WSGATE_JWT_*: {exc}") from None

    @staticmethod
    def configured(environ: Mapping[str, str] | None = None) -> bool:
        """Whether the environment sets a key (``WSGATE_JWT_SECRET``, ``_PUBLIC_KEY`` or
        ``_JWKS``): what :meth:`from_env` needs."""
        env = os.environ if environ is None else environ
        return any(env.get(f"WSGATE_JWT_{name}") for name in ("SECRET", "PUBLIC_KEY", "JWKS"))

    def verify(self, request: ConnectRequest) -> dict[str, Value]:
        """The claims of the token ``request`` carries; raises Unauthorized with the
        reason."""
        token = find_token(request, subprotocol=self.subprotocol, query_param=self.query_param)
        return self.verify_token(token)

    def subprotocol_for(self, request: ConnectRequest) -> str | None:
        """The subprotocol to accept ``request`` with when the app has none to choose: the
        marker, if the client sent its token that way (a browser insists on one)."""
        if self.subprotocol is not None and self.subprotocol in request.subprotocols:
            return self.subprotocol
        return None

    def verify_token(self, token: str) -> dict[str, Value]:
        """The claims of ``token``; raises Unauthorized with the reason."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized(AuthFailure.MALFORMED) from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise Unauthorized(AuthFailure.MALFORMED)
        if algorithm not in self.algorithms:  # "none" included: it is never allowed
            raise Unauthorized(AuthFailure.ALGORITHM_NOT_ALLOWED)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized(AuthFailure.MALFORMED)
        candidates = self._keys.candidates(algorithm, kid)
        if not candidates:
            raise Unauthorized(AuthFailure.UNKNOWN_KEY)
        claims = self._decode(token, algorithm, candidates)
        self._check_times(claims)
        return claims

    def _decode(self, token: str, algorithm: str, candidates: list[VerifyKey]) -> dict[str, Value]:
        for key in candidates:
            try:
                return self._jwt.decode(
                    token,
                    key.key,
                    algorithms=[algorithm],  # the key's own: see worker/jwt_keys.py
                    audience=self.audience,
                    issuer=self.issuer,
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise _refusal(exc) from None
        raise Unauthorized(AuthFailure.BAD_SIGNATURE)

    def _check_times(self, claims: Mapping[str, Value]) -> None:
        now = self._clock()
        leeway = self.leeway_s
        times: dict[str, float] = {}
        for name in _TIMED:
            if name in claims:
                value = claims[name]
                if not _is_number(value):
                    raise Unauthorized(AuthFailure.INVALID_CLAIM, f"invalid claim: {name}")
                times[name] = value
        # RFC 7519 4.1.4: valid only before exp; 4.1.5: not before nbf.
        if "exp" in times and now >= times["exp"] + leeway:
            raise Unauthorized(AuthFailure.EXPIRED)
        if "nbf" in times and now < times["nbf"] - leeway:
            raise Unauthorized(AuthFailure.NOT_YET_VALID)
        if "iat" in times and now < times["iat"] - leeway:
            raise Unauthorized(AuthFailure.NOT_YET_VALID)

    def __repr__(self) -> str:
        return f"JWTVerifier(algorithms={list(self.algorithms)})"  # nothing of the keys


def _refusal(exc: jwt.PyJWTError) -> Unauthorized:
    """PyJWT's error as a reason; never its message (it may say more than the client
    should hear)."""
    if isinstance(exc, jwt.InvalidAudienceError):
        return Unauthorized(AuthFailure.WRONG_AUDIENCE)
    if isinstance(exc, jwt.InvalidIssuerError):
        return Unauthorized(AuthFailure.WRONG_ISSUER)
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return Unauthorized(AuthFailure.MISSING_CLAIM, f"missing claim: {exc.claim}")
    if isinstance(exc, InvalidSubjectError | InvalidJTIError | jwt.InvalidIssuedAtError):
        return Unauthorized(AuthFailure.INVALID_CLAIM)
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return Unauthorized(AuthFailure.ALGORITHM_NOT_ALLOWED)
    return Unauthorized(AuthFailure.MALFORMED)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, Real) and not isinstance(value, bool)


def _values(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    return values or None


def _secret_keys(secret: KeyText | Mapping[str, KeyText] | None) -> list[VerifyKey]:
    if secret is None:
        return []
    if isinstance(secret, Mapping):
        return [secret_key(value, kid) for kid, value in secret.items()]
    return [secret_key(secret)]


def _public_keys(keys: KeyText | Iterable[KeyText] | Mapping[str, KeyText]) -> list[VerifyKey]:
    if isinstance(keys, str | bytes):
        return pem_keys(keys)
    if isinstance(keys, Mapping):
        return [key for kid, pem in keys.items() for key in pem_keys(pem, kid)]
    return [key for pem in keys for key in pem_keys(pem)]
