"""Bearer token verification: HS256 with a shared secret, RS256 against a JWKS, and what must fail."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.datastructures import Headers

from shared.auth import (
    ROLES,
    SITE_ROLES,
    AuthError,
    JWTVerifier,
    Principal,
    authorization_header,
    issue_dev_token,
)
from shared.settings import Settings

SECRET = "unit-test-secret-" + "0123456789abcdef" * 4  # long enough for HS512 too
JWKS_URL = "https://idp.example/.well-known/jwks.json"
KID = "key-1"


def hs_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"jwt_secret": SECRET, "jwt_jwks_url": None, "jwt_issuer": None,
                              "jwt_audience": None, **overrides}
    return Settings(**values)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "user-1", "role": "investigator", "site": "S1", "iat": now,
                            "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs_token(payload: dict[str, Any], secret: str = SECRET, **kwargs: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", **kwargs)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value).encode())


# --- HS256 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_dev_token_is_accepted(role: str) -> None:
    site = "S2" if role in SITE_ROLES else None
    token = issue_dev_token(SECRET, role, site=site, sub="alice")
    assert JWTVerifier(hs_settings()).verify(token) == Principal(sub="alice", role=role, site=site)


def test_dev_token_defaults_its_subject_and_expires_later() -> None:
    token = issue_dev_token(SECRET, "monitor", ttl_s=60)
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert payload["sub"] == "dev-monitor"
    assert "site" not in payload
    assert 0 < payload["exp"] - time.time() <= 60


def test_site_role_principal_is_site_role() -> None:
    who = JWTVerifier(hs_settings()).verify(hs_token(claims()))
    assert who == Principal(sub="user-1", role="investigator", site="S1")
    assert who.is_site_role


def test_monitor_without_site_is_accepted() -> None:
    who = JWTVerifier(hs_settings()).verify(hs_token(claims(role="monitor", site=None)))
    assert who.site is None
    assert not who.is_site_role


def test_expired_token_is_rejected() -> None:
    now = int(time.time())
    with pytest.raises(AuthError, match="xpired"):
        JWTVerifier(hs_settings()).verify(hs_token(claims(iat=now - 600, exp=now - 10)))


def test_token_not_yet_valid_is_rejected() -> None:
    with pytest.raises(AuthError):
        JWTVerifier(hs_settings()).verify(hs_token(claims(nbf=int(time.time()) + 600)))


def test_wrong_signature_is_rejected() -> None:
    with pytest.raises(AuthError):
        JWTVerifier(hs_settings()).verify(hs_token(claims(), secret="another-secret-" + "f" * 64))


def test_tampered_payload_is_rejected() -> None:
    header, _, signature = hs_token(claims(role="monitor", site=None)).split(".")
    forged = ".".join([header, b64json(claims(role="admin", site=None)), signature])
    with pytest.raises(AuthError):
        JWTVerifier(hs_settings()).verify(forged)


def test_alg_none_token_is_rejected() -> None:
    token = f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(claims(role='admin', site=None))}."
    with pytest.raises(AuthError, match="alg"):
        JWTVerifier(hs_settings()).verify(token)


def test_other_hmac_algorithm_is_rejected() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS512")
    with pytest.raises(AuthError):
        JWTVerifier(hs_settings()).verify(token)


@pytest.mark.parametrize("token", ["", "garbage", "a.b", "a.b.c", "Bearer x.y.z", "..", "ÿ.ÿ.ÿ"])
def test_malformed_token_is_rejected(token: str) -> None:
    with pytest.raises(AuthError):
        JWTVerifier(hs_settings()).verify(token)


@pytest.mark.parametrize("claim", ["sub", "role", "exp"])
def test_missing_required_claim_is_rejected(claim: str) -> None:
    payload = claims(role="monitor", site=None)
    del payload[claim]
    with pytest.raises(AuthError):
        JWTVerifier(hs_settings()).verify(hs_token(payload))


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
def test_a_time_claim_that_is_not_a_number_is_a_bad_token_not_a_500(claim: str) -> None:
    """PyJWT takes "1767000000" as a time; the lifetime check then subtracted a string (500)."""
    now = int(time.time())
    value = {"exp": now + 300, "iat": now - 10, "nbf": now - 10}[claim]
    with pytest.raises(AuthError, match=f"'{claim}'"):
        JWTVerifier(hs_settings()).verify(hs_token(claims(**{claim: str(value)})))
    with pytest.raises(AuthError):  # a boolean is no time either
        JWTVerifier(hs_settings()).verify(hs_token(claims(**{claim: True})))


def test_more_than_one_authorization_header_is_a_bad_token() -> None:
    token = f"Bearer {hs_token(claims())}"
    one = Headers(raw=[(b"authorization", token.encode())])
    assert authorization_header(one) == token
    assert authorization_header(Headers(raw=[])) is None
    two = Headers(raw=[(b"authorization", token.encode()), (b"authorization", token.encode())])
    with pytest.raises(AuthError, match="more than one"):
        authorization_header(two)


def test_empty_subject_is_rejected() -> None:
    with pytest.raises(AuthError):
        JWTVerifier(hs_settings()).verify(hs_token(claims(sub="")))


@pytest.mark.parametrize("role", ["superuser", "Admin", "", ["admin"], 1])
def test_unknown_role_is_rejected(role: object) -> None:
    with pytest.raises(AuthError):
        JWTVerifier(hs_settings()).verify(hs_token(claims(role=role, site="S1")))


@pytest.mark.parametrize("role", sorted(SITE_ROLES))
@pytest.mark.parametrize("site", [None, "", 7])
def test_site_role_without_a_site_is_rejected(role: str, site: object) -> None:
    payload = claims(role=role)
    payload.pop("site")
    if site is not None:
        payload["site"] = site
    with pytest.raises(AuthError, match="site"):
        JWTVerifier(hs_settings()).verify(hs_token(payload))


def test_issuer_and_audience_are_enforced_when_configured() -> None:
    verifier = JWTVerifier(hs_settings(jwt_issuer="https://idp.example", jwt_audience="trial-api"))
    good = claims(iss="https://idp.example", aud="trial-api")
    assert verifier.verify(hs_token(good)).sub == "user-1"
    for bad in ({**good, "iss": "https://evil.example"}, {**good, "aud": "other-api"},
                {k: v for k, v in good.items() if k != "iss"},
                {k: v for k, v in good.items() if k != "aud"}):
        with pytest.raises(AuthError):
            verifier.verify(hs_token(bad))


def test_issue_dev_token_refuses_unknown_roles() -> None:
    with pytest.raises(ValueError, match="role"):
        issue_dev_token(SECRET, "superuser")


@pytest.mark.parametrize("role", sorted(SITE_ROLES))
@pytest.mark.parametrize("site", [None, ""])
def test_issue_dev_token_refuses_site_roles_without_a_site(role: str, site: str | None) -> None:
    with pytest.raises(ValueError, match="site"):
        issue_dev_token(SECRET, role, site=site)


# --- RS256 against a JWKS, with the fetch replaced (no network) ---------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwks_verifier(rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[JWTVerifier]:
    jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    jwks = {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS256"}]}
    fetched: list[str] = []

    def fetch_data(self: jwt.PyJWKClient) -> Any:
        fetched.append(self.uri)
        return jwks

    monkeypatch.setattr(jwt.PyJWKClient, "fetch_data", fetch_data)
    verifier = JWTVerifier(hs_settings(jwt_jwks_url=JWKS_URL))
    yield verifier
    assert set(fetched) <= {JWKS_URL}


def rs_token(key: rsa.RSAPrivateKey, payload: dict[str, Any], kid: str = KID) -> str:
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


def test_rs256_token_from_the_jwks_key_is_accepted(jwks_verifier: JWTVerifier,
                                                     rsa_key: rsa.RSAPrivateKey) -> None:
    assert jwks_verifier.verify(rs_token(rsa_key, claims())) == Principal("user-1", "investigator", "S1")


def test_rs256_token_signed_by_another_key_is_rejected(jwks_verifier: JWTVerifier,
                                                        other_rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(AuthError):
        jwks_verifier.verify(rs_token(other_rsa_key, claims()))


def test_rs256_token_with_an_unknown_kid_is_rejected(jwks_verifier: JWTVerifier,
                                                      rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(AuthError):
        jwks_verifier.verify(rs_token(rsa_key, claims(), kid="key-404"))


def test_rs256_expired_token_is_rejected(jwks_verifier: JWTVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    with pytest.raises(AuthError):
        jwks_verifier.verify(rs_token(rsa_key, claims(iat=now - 600, exp=now - 10)))


def test_hs256_dev_token_is_rejected_in_jwks_mode(jwks_verifier: JWTVerifier) -> None:
    with pytest.raises(AuthError):
        jwks_verifier.verify(issue_dev_token(SECRET, "admin"))
    with pytest.raises(AuthError):
        jwks_verifier.verify(hs_token(claims(), headers={"kid": KID}))


def test_hs256_token_keyed_with_the_public_key_is_rejected(jwks_verifier: JWTVerifier,
                                                            rsa_key: rsa.RSAPrivateKey) -> None:
    # Algorithm confusion: HMAC "signed" with the public key the verifier trusts.
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': KID})}.{b64json(claims(role='admin'))}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(AuthError, match="alg"):
        jwks_verifier.verify(f"{signing_input}.{b64url(signature)}")


def test_alg_none_token_is_rejected_in_jwks_mode(jwks_verifier: JWTVerifier) -> None:
    token = f"{b64json({'alg': 'none', 'kid': KID})}.{b64json(claims(role='admin', site=None))}."
    with pytest.raises(AuthError):
        jwks_verifier.verify(token)


def test_jwks_mode_still_checks_role_and_site(jwks_verifier: JWTVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(AuthError):
        jwks_verifier.verify(rs_token(rsa_key, claims(role="root")))
    with pytest.raises(AuthError):
        jwks_verifier.verify(rs_token(rsa_key, claims(role="pharmacist", site=None)))


# --- verified tokens remembered ---------------------------------------------------------------


def counted_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens `jwt.decode` checks from now on (its signature and claims check)."""
    calls: list[str] = []
    real = jwt.decode

    def counted(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counted)
    return calls


def test_a_remembered_token_is_checked_again_once_past_its_exp(
        monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = JWTVerifier(hs_settings())
    calls = counted_decodes(monkeypatch)
    now = time.time()
    token = hs_token(claims(exp=int(now) + 30))
    verifier.verify(token)
    monkeypatch.setattr(time, "time", lambda: now + 29)
    verifier.verify(token)
    assert len(calls) == 1  # from memory, before its exp
    monkeypatch.setattr(time, "time", lambda: now + 31)
    verifier.verify(token)  # (PyJWT keeps its own clock, which has not moved)
    assert len(calls) == 2  # past its exp: never from memory


def test_a_token_is_verified_again_after_the_memory_span(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = JWTVerifier(hs_settings())
    calls = counted_decodes(monkeypatch)
    token = hs_token(claims())
    verifier.verify(token)
    verifier.verify(token)
    assert len(calls) == 1  # the second came from memory
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)
    verifier.verify(token)
    assert len(calls) == 2
    # A different token (one byte of signature changed) is never taken for the remembered one.
    header, payload, signature = token.split(".")
    forged = ".".join((header, payload, ("A" if signature[0] != "A" else "B") + signature[1:]))
    with pytest.raises(AuthError):
        verifier.verify(forged)


async def test_a_jwks_key_is_fetched_off_the_event_loop_and_a_known_token_stays_on_it(
        jwks_verifier: JWTVerifier, rsa_key: rsa.RSAPrivateKey,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The identity provider's keys come over blocking HTTP: never on the loop every request
    # shares. A token verified a moment ago, or an HS256 one, is answered on the loop.
    on_loop = threading.get_ident()
    verified_on: list[int] = []
    verify = JWTVerifier.verify

    def watched(self: JWTVerifier, token: str) -> Principal:
        verified_on.append(threading.get_ident())
        return verify(self, token)

    monkeypatch.setattr(JWTVerifier, "verify", watched)
    header = f"Bearer {rs_token(rsa_key, claims())}"
    first = await jwks_verifier.principal_of(header)
    again = await jwks_verifier.principal_of(header)
    assert first == again == Principal("user-1", "investigator", "S1")
    assert verified_on[0] != on_loop and verified_on[1] == on_loop
    hs = JWTVerifier(hs_settings())
    assert (await hs.principal_of(f"Bearer {hs_token(claims())}")).sub == "user-1"
    assert verified_on[2] == on_loop
