"""Verifies bearer JWTs (HS256 with a shared secret, or RS256 against a JWKS URL) into a Principal."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import jwt
from pydantic import SecretStr

from shared.settings import Settings

Role = Literal["site_coordinator", "investigator", "pharmacist", "monitor", "dsmb", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
SITE_ROLES = frozenset({"site_coordinator", "investigator", "pharmacist"})


class AuthError(Exception):
    """The token is missing, malformed, badly signed, expired or lacks a claim: 401."""


class NoBearerToken(AuthError):
    """No `Authorization: Bearer <token>` header at all."""

    def __init__(self) -> None:
        super().__init__("A bearer token is required")


class Headers(Protocol):
    """A request's headers, every copy of each (Starlette's); this module stays framework-free."""

    def getlist(self, key: str) -> list[str]: ...


def authorization_header(headers: Headers) -> str | None:
    """The request's one `Authorization` header, none if absent. More than one is a bad
    token (401): which would count is anybody's guess, and the gateway and a service could each
    read a different one (its check and its log line one caller's, the service's act another's)."""
    found = headers.getlist("authorization")
    if len(found) > 1:
        raise AuthError("more than one Authorization header")
    return found[0] if found else None


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header: the one parser of that header."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise NoBearerToken()
    return token.strip()


@dataclass(frozen=True)
class Principal:
    sub: str
    role: str
    site: str | None

    @property
    def is_site_role(self) -> bool:
        return self.role in SITE_ROLES


# A verified token is remembered (the gateway and then a service verify the same token on
# every request a site system sends with it): for at most this long, never past its `exp`.
VERIFIED_FOR_S = 60.0
VERIFIED_KEPT = 4096  # tokens remembered at most (the oldest forgotten first)


class JWTVerifier:
    """One verifier for the gateway and every service, so they agree on every token."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._jwks = jwt.PyJWKClient(settings.jwt_jwks_url) if settings.jwt_jwks_url else None
        self._verified: dict[str, tuple[Principal, float]] = {}  # token: (who, good until)

    def principal(self, authorization: str | None) -> Principal:
        """The caller named by an `Authorization` header's bearer token; `AuthError` otherwise."""
        return self.verify(bearer_token(authorization))

    async def principal_of(self, authorization: str | None) -> Principal:
        """`principal` for async code: on the event loop, except when verifying may fetch the
        identity provider's keys (a JWKS token not remembered), which is a blocking HTTP call.
        A remembered token or an HS256 signature costs microseconds, never a thread hop."""
        token = bearer_token(authorization)
        if self._jwks is None or self._remembered(token) is not None:
            return self.verify(token)
        return await asyncio.to_thread(self.verify, token)

    def _remembered(self, token: str) -> Principal | None:
        kept = self._verified.get(token)
        return kept[0] if kept is not None and time.time() < kept[1] else None

    def verify(self, token: str) -> Principal:
        """The token's principal. A token verified in the last `VERIFIED_FOR_S` seconds, and
        not expired since, is answered from memory: the same bytes, the same signature check."""
        kept = self._remembered(token)
        if kept is not None:
            return kept
        now = time.time()
        principal, exp = self._verify(token)
        if len(self._verified) >= VERIFIED_KEPT:
            self._verified.pop(next(iter(self._verified)))
        self._verified[token] = (principal, min(exp, now + VERIFIED_FOR_S))
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            if self._jwks is not None:
                key: Any = self._jwks.get_signing_key_from_jwt(token).key
                algorithms = ["RS256"]
            else:
                key, algorithms = self.settings.jwt_secret.get_secret_value(), ["HS256"]
            claims = jwt.decode(
                token, key, algorithms=algorithms,  # a fixed list: never "none"
                audience=self.settings.jwt_audience, issuer=self.settings.jwt_issuer,
                options={"require": ["sub", "role", "exp"],
                         "verify_aud": self.settings.jwt_audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(str(exc)) from exc
        role, site = claims.get("role"), claims.get("site")
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r}")
        if role in SITE_ROLES and not (isinstance(site, str) and site):
            raise AuthError(f"role {role} needs a 'site' claim")
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise AuthError("empty 'sub' claim")
        for claim in ("exp", "iat", "nbf"):  # PyJWT takes "1767000000" as a time too
            if claim in claims and (isinstance(claims[claim], bool)
                                    or not isinstance(claims[claim], int | float)):
                raise AuthError(f"the {claim!r} claim must be a number")
        cap = self.settings.jwt_max_lifetime_s
        issued = claims.get("iat")
        if claims["exp"] - time.time() > cap or (
                isinstance(issued, int | float) and claims["exp"] - issued > cap):
            raise AuthError(f"token lifetime over the {cap} s this deployment allows")
        who = Principal(sub=claims["sub"], role=role, site=site if isinstance(site, str) else None)
        return who, float(claims["exp"])


def issue_dev_token(secret: str | SecretStr, role: str, site: str | None = None, sub: str | None = None,
                    ttl_s: int = 8 * 3600) -> str:
    """A development token signed with HS256; production tokens come from the identity provider."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if role in SITE_ROLES and not site:
        raise ValueError(f"role {role} needs --site")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub or f"dev-{role}", "role": role, "iat": now,
                              "exp": now + ttl_s}
    if site:
        claims["site"] = site
    key = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    return jwt.encode(claims, key, algorithm="HS256")
