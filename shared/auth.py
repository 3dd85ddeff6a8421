"""Verifies bearer JWTs (HS256 with a shared secret, or RS256 against a JWKS URL) into a Principal."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, get_args

import jwt

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


class JWTVerifier:
    """One verifier for the gateway and every service, so they agree on every token."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._jwks = jwt.PyJWKClient(settings.jwt_jwks_url) if settings.jwt_jwks_url else None

    def principal(self, authorization: str | None) -> Principal:
        """The caller named by an `Authorization` header's bearer token; `AuthError` otherwise."""
        return self.verify(bearer_token(authorization))

    def verify(self, token: str) -> Principal:
        try:
            if self._jwks is not None:
                key: Any = self._jwks.get_signing_key_from_jwt(token).key
                algorithms = ["RS256"]
            else:
                key, algorithms = self.settings.jwt_secret, ["HS256"]
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
        return Principal(sub=claims["sub"], role=role, site=site if isinstance(site, str) else None)


def issue_dev_token(secret: str, role: str, site: str | None = None, sub: str | None = None,
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
    return jwt.encode(claims, secret, algorithm="HS256")
