"""JWTVerifier, its keys and where tokens come from, with no I/O but key files.

Tokens are made with PyJWT; keys with cryptography (an X.509 certificate from the test
PKI for the certificate case). Times are checked against an injected clock, so the
limits (``exp`` and ``nbf`` with the leeway) are tested at the instant, not near it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.certs import Pki
from wsgate import App, AuthFailure, ConnectRequest, DurableObject, JWTVerifier, Unauthorized
from wsgate.errors import ConfigError
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.app import Accept
from wsgate.worker.auth import Verified, authenticate, find_token, with_auth_subprotocol
from wsgate.worker.jwt_keys import KeyRing

SECRET = "0123456789abcdef0123456789abcdef"  # 32 bytes: the shortest allowed
NOW = 1_700_000_000.0


def clock() -> float:
    return NOW


class Keys:
    """Private keys of each kind and their public PEMs."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())

    @staticmethod
    def pem(private: Any) -> bytes:
        public = private.public_key()
        return bytes(
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": NOW + 60, **extra}


def hs256(payload: dict[str, Any], secret: str | bytes = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def verifier(**options: Any) -> JWTVerifier:
    options.setdefault("algorithms", ["HS256"])
    options.setdefault("clock", clock)
    if options["algorithms"] == ["HS256"]:
        options.setdefault("secret", SECRET)
    return JWTVerifier(**options)


def refused(check: JWTVerifier, token: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        check.verify_token(token)
    return caught.value


def request(
    headers: dict[str, str] | None = None, query: str = "", subprotocols: tuple[str, ...] = ()
) -> ConnectRequest:
    envelope = pb.ConnectRequest(
        connection_id="node-abcdefgh_1",
        path="/p",
        query=query,
        headers=[pb.Header(name=k, value=v) for k, v in (headers or {}).items()],
        subprotocols=subprotocols,
    )
    return ConnectRequest.from_envelope(envelope, {})


def b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


# --- each algorithm ---------------------------------------------------------------------


def test_hs256_rs256_and_es256_tokens_verify_with_their_keys(keys: Keys) -> None:
    check = JWTVerifier(
        algorithms=["HS256", "RS256", "ES256"],
        secret=SECRET,
        public_keys=[Keys.pem(keys.rsa), Keys.pem(keys.ec)],
        clock=clock,
    )
    assert check.verify_token(hs256(claims())) == claims()
    assert check.verify_token(jwt.encode(claims(), keys.rsa, algorithm="RS256")) == claims()
    assert check.verify_token(jwt.encode(claims(), keys.ec, algorithm="ES256")) == claims()


def test_a_certificate_gives_its_public_key(pki: Pki) -> None:
    files = pki.server("jwt-signer")  # an EC P-256 key: ES256
    signer = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    check = JWTVerifier(algorithms=["ES256"], public_keys=files.cert.read_bytes(), clock=clock)
    assert check.verify_token(jwt.encode(claims(), signer, algorithm="ES256"))["sub"] == "alice"


def test_keys_named_by_kid_are_chosen_by_the_tokens_kid(keys: Keys) -> None:
    check = JWTVerifier(
        algorithms=["RS256"],
        public_keys={"one": Keys.pem(keys.rsa), "two": Keys.pem(keys.rsa2)},
        clock=clock,
    )
    signed_two = jwt.encode(claims(), keys.rsa2, algorithm="RS256", headers={"kid": "two"})
    assert check.verify_token(signed_two)["sub"] == "alice"
    # Without a kid every key of the algorithm is tried.
    assert check.verify_token(jwt.encode(claims(), keys.rsa2, algorithm="RS256"))
    # A kid that names no key: refused without trying any.
    wrong_kid = jwt.encode(claims(), keys.rsa2, algorithm="RS256", headers={"kid": "three"})
    assert refused(check, wrong_kid).reason is AuthFailure.UNKNOWN_KEY
    # The right kid, the wrong key behind it.
    lying = jwt.encode(claims(), keys.rsa2, algorithm="RS256", headers={"kid": "one"})
    assert refused(check, lying).reason is AuthFailure.BAD_SIGNATURE


def test_hs256_secrets_by_kid_and_a_kid_unknown_falls_back_to_unnamed_keys() -> None:
    other = "fedcba9876543210fedcba9876543210"
    check = verifier(secret={"old": SECRET, "new": other})
    assert check.verify_token(hs256(claims(), other, kid="new"))
    assert refused(check, hs256(claims(), other, kid="old")).reason is AuthFailure.BAD_SIGNATURE
    plain = verifier()  # one unnamed secret: a token's kid does not matter to it
    assert plain.verify_token(hs256(claims(), kid="whatever"))


# --- each failed check ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason", "description"),
    [
        ({"exp": NOW - 31}, AuthFailure.EXPIRED, "token expired"),
        ({"nbf": NOW + 31}, AuthFailure.NOT_YET_VALID, "token not yet valid"),
        ({"iat": NOW + 31}, AuthFailure.NOT_YET_VALID, "token not yet valid"),
        ({"aud": "other"}, AuthFailure.WRONG_AUDIENCE, "wrong audience"),
        ({"aud": ["x", "y"]}, AuthFailure.WRONG_AUDIENCE, "wrong audience"),
        ({"iss": "https://evil.test"}, AuthFailure.WRONG_ISSUER, "wrong issuer"),
        ({"exp": None}, AuthFailure.MISSING_CLAIM, "missing claim: exp"),
        ({"iss": None}, AuthFailure.MISSING_CLAIM, "missing claim: iss"),
        ({"aud": None}, AuthFailure.MISSING_CLAIM, "missing claim: aud"),
        ({"exp": "tomorrow"}, AuthFailure.INVALID_CLAIM, "invalid claim: exp"),
        ({"nbf": True}, AuthFailure.INVALID_CLAIM, "invalid claim: nbf"),
        ({"sub": 42}, AuthFailure.INVALID_CLAIM, "invalid claim"),
    ],
)
def test_each_failed_check_has_its_reason(
    changes: dict[str, Any], reason: AuthFailure, description: str
) -> None:
    """Each check alone fails a token that passes all the others (None: the claim left
    out)."""
    check = verifier(audience="app", issuer=["https://id.test", "https://id2.test"])
    good = claims(aud="app", iss="https://id2.test")
    assert check.verify_token(hs256(good)) == good
    payload = {k: v for k, v in {**good, **changes}.items() if v is not None}
    failure = refused(check, hs256(payload))
    assert (failure.reason, failure.description) == (reason, description)


def test_audience_and_issuer_accept_any_of_theirs() -> None:
    check = verifier(audience=["a", "b"], issuer=["https://one.test", "https://two.test"])
    token = hs256(claims(aud=["z", "b"], iss="https://two.test"))
    assert check.verify_token(token)["aud"] == ["z", "b"]


def test_a_token_with_an_audience_is_refused_when_none_is_configured() -> None:
    # RFC 7519 4.1.3: whoever does not find itself in aud must refuse the token.
    assert refused(verifier(), hs256(claims(aud="app"))).reason is AuthFailure.WRONG_AUDIENCE


def test_required_claims_are_configurable() -> None:
    lenient = verifier(required_claims=())
    assert lenient.verify_token(hs256({"sub": "alice"})) == {"sub": "alice"}
    strict = verifier(required_claims=("exp", "sub"))
    failure = refused(strict, hs256({"exp": NOW + 60}))
    assert failure.description == "missing claim: sub"


def test_a_wrong_signature_and_garbage_are_told_apart() -> None:
    check = verifier()
    other = hs256(claims(), "another secret of thirty-two bytes!")
    assert refused(check, other).reason is AuthFailure.BAD_SIGNATURE
    for garbage in ("", "abc", "a.b", "a.b.c", "é.é.é", "e30.e30.sig"):  # e30: {}
        assert refused(check, garbage).reason is AuthFailure.MALFORMED, garbage
    header = b64(json.dumps({"alg": "HS256", "kid": 7}).encode())
    assert refused(check, f"{header.decode()}.e30.sig").reason is AuthFailure.MALFORMED


def test_claims_are_checked_only_once_the_signature_holds() -> None:
    # An expired token with a wrong audience, signed by someone else: only "bad signature".
    forged = hs256(claims(exp=NOW - 3600, aud="other"), "another secret of thirty-two bytes!")
    assert refused(verifier(), forged).reason is AuthFailure.BAD_SIGNATURE


_LENIENT = verifier(required_claims=())


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200) | st.from_regex(r"[A-Za-z0-9_-]{0,40}\.[A-Za-z0-9_-]{0,40}\.\S*"))
def test_any_string_is_claims_or_unauthorized(token: str) -> None:
    with contextlib.suppress(Unauthorized):
        _LENIENT.verify_token(token)


# --- exp and nbf at their limits, with the leeway ----------------------------------------


def at(now: float, **options: Any) -> JWTVerifier:
    return verifier(clock=lambda: now, **options)


@pytest.mark.parametrize("leeway_s", [0.0, 30.0])
def test_exp_is_valid_just_inside_the_leeway_and_refused_at_it(leeway_s: float) -> None:
    token = hs256(claims(exp=NOW))
    assert at(NOW + leeway_s - 0.001, leeway_s=leeway_s).verify_token(token)
    failure = refused(at(NOW + leeway_s, leeway_s=leeway_s), token)
    assert failure.reason is AuthFailure.EXPIRED


@pytest.mark.parametrize("leeway_s", [0.0, 30.0])
def test_nbf_is_valid_from_the_leeway_before_and_refused_just_earlier(leeway_s: float) -> None:
    token = hs256(claims(nbf=NOW, exp=NOW + 3600))
    assert at(NOW - leeway_s, leeway_s=leeway_s).verify_token(token)
    failure = refused(at(NOW - leeway_s - 0.001, leeway_s=leeway_s), token)
    assert failure.reason is AuthFailure.NOT_YET_VALID


def test_the_leeway_is_bounded() -> None:
    assert verifier(leeway_s=0).leeway_s == 0
    assert verifier(leeway_s=300).leeway_s == 300
    for bad in (-0.001, 300.001):
        with pytest.raises(ConfigError, match="leeway_s"):
            verifier(leeway_s=bad)


# --- algorithms: the allow list, none, and confusion -------------------------------------


def test_none_and_unknown_algorithms_are_refused_in_tokens_and_in_configuration() -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert refused(verifier(), unsigned).reason is AuthFailure.ALGORITHM_NOT_ALLOWED
    stripped = hs256(claims()).rsplit(".", 1)[0] + "."
    assert refused(verifier(), stripped).reason is AuthFailure.BAD_SIGNATURE
    hs512 = jwt.encode(claims(), SECRET + SECRET, algorithm="HS512")
    assert refused(verifier(), hs512).reason is AuthFailure.ALGORITHM_NOT_ALLOWED
    no_signature = b64(json.dumps({"alg": "HS256"}).encode()).decode() + ".."
    assert refused(verifier(), no_signature).reason is AuthFailure.BAD_SIGNATURE
    for bad in (["none"], ["HS512"], ["hs256"], []):
        with pytest.raises(ConfigError):
            JWTVerifier(algorithms=bad, secret=SECRET)


def test_an_allowed_algorithm_without_a_key_is_an_unknown_key(keys: Keys) -> None:
    check = JWTVerifier(algorithms=["HS256", "RS256"], secret=SECRET, clock=clock)
    token = jwt.encode(claims(), keys.rsa, algorithm="RS256")
    assert refused(check, token).reason is AuthFailure.UNKNOWN_KEY


def confused_token(public_pem: bytes) -> str:
    """HS256 over the token with the RSA *public* key as the HMAC secret: anyone can make
    it, and a verifier that let the token choose the algorithm would accept it."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims()).encode())
    signature = b64(hmac.new(public_pem, header + b"." + payload, hashlib.sha256).digest())
    return (header + b"." + payload + b"." + signature).decode()


def test_algorithm_confusion_is_refused(keys: Keys) -> None:
    public_pem = Keys.pem(keys.rsa)
    forged = confused_token(public_pem)
    # RS256 only: HS256 is not allowed at all.
    rs_only = JWTVerifier(algorithms=["RS256"], public_keys=public_pem, clock=clock)
    assert refused(rs_only, forged).reason is AuthFailure.ALGORITHM_NOT_ALLOWED
    # Both allowed, an RSA key and a secret: the RSA key never verifies HS256.
    both = JWTVerifier(
        algorithms=["HS256", "RS256"], secret=SECRET, public_keys=public_pem, clock=clock
    )
    failure = refused(both, forged)
    assert failure.reason is AuthFailure.BAD_SIGNATURE
    # Both allowed, no secret: no HS256 key at all.
    no_secret = JWTVerifier(algorithms=["HS256", "RS256"], public_keys=public_pem, clock=clock)
    assert refused(no_secret, forged).reason is AuthFailure.UNKNOWN_KEY
    # Nor does the refusal say anything of the key.
    assert failure.reject().body == "bad signature"


def test_a_public_key_cannot_be_configured_as_the_secret(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="PEM"):
        JWTVerifier(algorithms=["HS256"], secret=Keys.pem(keys.rsa))


def test_a_key_of_an_algorithm_not_allowed_is_a_configuration_error(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="RS256"):
        JWTVerifier(algorithms=["ES256"], public_keys=Keys.pem(keys.rsa))
    with pytest.raises(ConfigError, match="HS256"):
        JWTVerifier(algorithms=["RS256"], secret=SECRET)


# --- weak or wrong keys --------------------------------------------------------------------


def test_a_secret_of_32_bytes_is_taken_and_31_refused() -> None:
    assert verifier(secret=SECRET)
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        verifier(secret=SECRET[:31])


def test_weak_or_unsupported_public_keys_are_refused(keys: Keys) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="2048"):
        JWTVerifier(algorithms=["RS256"], public_keys=Keys.pem(small))
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigError, match="P-256"):
        JWTVerifier(algorithms=["ES256"], public_keys=Keys.pem(p384))
    private = keys.ec.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ConfigError, match="not private"):
        JWTVerifier(algorithms=["ES256"], public_keys=private)
    with pytest.raises(ConfigError, match="no PEM"):
        JWTVerifier(algorithms=["ES256"], public_keys="not a key")
    with pytest.raises(ConfigError, match="at least one key"):
        JWTVerifier(algorithms=["ES256"])


# --- JWKS ---------------------------------------------------------------------------------


def jwk(private: Any, **fields: Any) -> dict[str, Any]:
    algorithm = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(private, rsa.RSAPrivateKey)
        else (jwt.algorithms.ECAlgorithm)
    )
    entry: dict[str, Any] = json.loads(algorithm.to_jwk(private.public_key()))
    return {**entry, **fields}


def write_jwks(path: Path, *entries: dict[str, Any]) -> None:
    path.write_text(json.dumps({"keys": list(entries)}))


def test_a_jwks_file_gives_keys_by_kid_and_skips_what_it_cannot_use(
    keys: Keys, tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    oct_key = {"kty": "oct", "k": b64(SECRET.encode()).decode(), "kid": "h"}
    write_jwks(
        path,
        jwk(keys.rsa, kid="r", use="sig"),
        jwk(keys.ec, kid="e"),
        jwk(keys.rsa2, kid="enc", use="enc"),  # for encryption: skipped
        jwk(keys.rsa2, kid="r512", alg="RS512"),  # not allowed: skipped
        oct_key,
        "not a key",
    )
    check = JWTVerifier(algorithms=["RS256", "ES256", "HS256"], jwks=path, clock=clock)
    assert check.verify_token(jwt.encode(claims(), keys.rsa, "RS256", headers={"kid": "r"}))
    assert check.verify_token(jwt.encode(claims(), keys.ec, "ES256", headers={"kid": "e"}))
    assert check.verify_token(hs256(claims(), kid="h"))
    for kid in ("enc", "r512"):
        token = jwt.encode(claims(), keys.rsa2, "RS256", headers={"kid": kid})
        assert refused(check, token).reason is AuthFailure.UNKNOWN_KEY


def test_a_jwks_without_a_usable_key_is_a_configuration_error(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, jwk(keys.rsa, kid="r"))
    with pytest.raises(ConfigError, match="no key usable"):
        JWTVerifier(algorithms=["ES256"], jwks=path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        JWTVerifier(algorithms=["RS256"], jwks=path)
    with pytest.raises(ConfigError, match="cannot read"):
        JWTVerifier(algorithms=["RS256"], jwks=tmp_path / "missing.json")


def test_a_jwks_file_is_read_again_when_it_changes_and_a_bad_version_keeps_the_keys(
    keys: Keys, tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, jwk(keys.rsa, kid="one"))
    now = [0.0]
    ring = KeyRing([], ["RS256"], path, check_interval_s=1.0, clock=lambda: now[0])
    assert [k.kid for k in ring.keys] == ["one"]

    write_jwks(path, jwk(keys.rsa2, kid="two"))
    os.utime(path, ns=(1, 1))  # a change the stat sees even within the clock's resolution
    now[0] = 0.999  # not yet time to look
    assert [k.kid for k in ring.keys] == ["one"]
    now[0] = 1.0
    assert [k.kid for k in ring.keys] == ["two"]

    path.write_text("{broken")  # mid-rotation garbage: the keys we have stay
    now[0] = 2.0
    assert [k.kid for k in ring.keys] == ["two"]
    path.unlink()
    now[0] = 3.0
    assert [k.kid for k in ring.keys] == ["two"]
    write_jwks(path, jwk(keys.rsa, kid="one"), jwk(keys.rsa2, kid="two"))
    now[0] = 4.0
    assert sorted(str(k.kid) for k in ring.keys) == ["one", "two"]


# --- where the token comes from -------------------------------------------------------------


def test_the_token_comes_from_the_header_the_subprotocol_or_an_enabled_query() -> None:
    assert find_token(request({"Authorization": "Bearer abc"})) == "abc"
    assert find_token(request({"authorization": "bearer  abc "})) == "abc"
    assert find_token(request(subprotocols=("chat", "bearer", "abc"))) == "abc"
    assert find_token(request(query="token=abc"), query_param="token") == "abc"
    # The header wins over the rest.
    both = request({"Authorization": "Bearer h"}, query="token=q", subprotocols=("bearer", "s"))
    assert find_token(both, query_param="token") == "h"
    without_query = {"subprotocol": "bearer", "query_param": None}
    for nothing, where in (
        (request(query="token=abc"), without_query),  # the query is off unless named
        (request({"Authorization": "Basic dXNlcjpwYXNz"}), without_query),
        (request({"Authorization": "Bearer "}), without_query),
        (request(subprotocols=("chat", "bearer")), without_query),  # nothing after it
        (request(subprotocols=("bearer", "abc")), {"subprotocol": None}),  # marker off
    ):
        with pytest.raises(Unauthorized) as missing:
            find_token(nothing, **where)
        assert missing.value.reason is AuthFailure.MISSING_TOKEN


def test_verify_reads_the_request_and_picks_the_marker_subprotocol() -> None:
    check = verifier(query_param="access_token")
    token = hs256(claims())
    assert check.verify(request(query=f"access_token={token}"))["sub"] == "alice"
    offered = request(subprotocols=("bearer", token))
    assert check.verify(offered)["sub"] == "alice"
    assert check.subprotocol_for(offered) == "bearer"
    assert check.subprotocol_for(request({"Authorization": f"Bearer {token}"})) is None
    assert refused_request(check, request()).reason is AuthFailure.MISSING_TOKEN


def refused_request(check: JWTVerifier, connect: ConnectRequest) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        check.verify(connect)
    return caught.value


# --- the refusal, and the SDK's side ------------------------------------------------------


def test_the_refusal_is_a_401_with_a_bearer_challenge() -> None:
    expired = Unauthorized(AuthFailure.EXPIRED).reject()
    assert (expired.status, expired.body) == (401, "token expired")
    assert expired.headers == {
        "WWW-Authenticate": 'Bearer error="invalid_token", error_description="token expired"'
    }
    # RFC 6750 3.1: no error code for a request that had no token.
    assert Unauthorized(AuthFailure.MISSING_TOKEN).reject().headers == {
        "WWW-Authenticate": "Bearer"
    }
    quoted = Unauthorized(AuthFailure.INVALID_CLAIM, 'a "b" \\c').reject()
    assert quoted.headers["WWW-Authenticate"].endswith('error_description="a \\"b\\" \\\\c"')


def test_routes_declare_an_authenticator_and_it_gives_read_only_claims() -> None:
    check = verifier()
    app = App()
    route = app.route("/private", auth=check)

    @app.durable("/room/{name}", auth=check)
    class Room(DurableObject):
        pass

    assert route.auth is check
    assert app.resolve("/room/x") is not None
    assert app.resolve("/room/x")[0].auth is check  # type: ignore[index]
    assert app.route("/open").auth is None

    token = hs256(claims())
    verified = authenticate(check, request(subprotocols=("bearer", token)))
    assert verified == Verified(verified.claims, "bearer")
    assert dict(verified.claims) == claims()
    with pytest.raises(TypeError):
        verified.claims["sub"] = "mallory"  # type: ignore[index]
    assert with_auth_subprotocol(Accept(), verified).subprotocol == "bearer"
    assert with_auth_subprotocol(Accept(subprotocol="chat"), verified).subprotocol == "chat"
    assert with_auth_subprotocol(Accept(), None).subprotocol is None
    assert request().claims == {}


# --- from the environment -------------------------------------------------------------------


def test_from_env_builds_a_verifier_from_wsgate_jwt_variables(keys: Keys, tmp_path: Path) -> None:
    pem = tmp_path / "public.pem"
    pem.write_bytes(Keys.pem(keys.rsa) + Keys.pem(keys.ec))  # two keys in one file
    environ = {
        "WSGATE_JWT_ALGORITHMS": "RS256, ES256",
        "WSGATE_JWT_PUBLIC_KEY": str(pem),
        "WSGATE_JWT_AUDIENCE": "a,b",
        "WSGATE_JWT_ISSUER": "https://id.test",
        "WSGATE_JWT_LEEWAY_S": "5",
    }
    assert JWTVerifier.configured(environ)
    check = JWTVerifier.from_env(environ, clock=clock)
    assert (check.algorithms, check.audience, check.issuer, check.leeway_s) == (
        ("RS256", "ES256"),
        ["a", "b"],
        ["https://id.test"],
        5.0,
    )
    payload = claims(aud="b", iss="https://id.test")
    assert check.verify_token(jwt.encode(payload, keys.ec, algorithm="ES256"))
    assert check.verify_token(jwt.encode(payload, keys.rsa, algorithm="RS256"))
    # The defaults: all three algorithms, a leeway of 30 s, exp required.
    default = JWTVerifier.from_env({"WSGATE_JWT_SECRET": SECRET}, clock=clock)
    assert (default.algorithms, default.leeway_s, default.required_claims) == (
        ("HS256", "RS256", "ES256"),
        30.0,
        ("exp",),
    )


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({}, "WSGATE_JWT_SECRET"),
        ({"WSGATE_JWT_SECRET": SECRET, "WSGATE_JWT_LEEWAY_S": "soon"}, "WSGATE_JWT_LEEWAY_S"),
        ({"WSGATE_JWT_SECRET": SECRET, "WSGATE_JWT_LEEWAY_S": "301"}, "WSGATE_JWT_LEEWAY_S"),
        ({"WSGATE_JWT_SECRET": SECRET, "WSGATE_JWT_ALGORITHMS": "none"}, "WSGATE_JWT_ALGORITHMS"),
        ({"WSGATE_JWT_SECRET": SECRET, "WSGATE_JWT_ALGORITHMS": "RS256"}, "WSGATE_JWT_ALGORITHMS"),
        ({"WSGATE_JWT_SECRET": "short"}, "WSGATE_JWT_SECRET"),
        ({"WSGATE_JWT_PUBLIC_KEY": "/no/such.pem"}, "WSGATE_JWT_PUBLIC_KEY"),
        ({"WSGATE_JWT_JWKS": "/no/such.json"}, "WSGATE_JWT_JWKS"),
    ],
)
def test_from_env_names_the_variable_at_fault(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        JWTVerifier.from_env(environ)


def test_configured_is_whether_a_key_is_set() -> None:
    assert not JWTVerifier.configured({})
    assert not JWTVerifier.configured({"WSGATE_JWT_SECRET": "", "WSGATE_JWT_AUDIENCE": "a"})
    assert JWTVerifier.configured({"WSGATE_JWT_JWKS": "/etc/jwks.json"})
