"""API keys: who may call which operation, for which tenants.

A client sends `Authorization: Bearer <key>`. The config file lists each key
only by its SHA-256, so a leaked config leaks no key:

    [[api_keys]]
    sha256 = "<hex of SHA-256(key)>"
    role = "ingest"            # ingest | read | admin
    tenants = ["t1", "t2"]     # or ["*"]; admin keys are always ["*"]

`ingest` may POST /pulses, `read` may call the GET listings, `admin` may do
everything (it includes the other two). Tenant scope is applied by the
handlers: a scoped key's pulses for other tenants are rejected one by one,
and its reads show only its tenants.

A presented key is hashed and compared with every configured hash by
`hmac.compare_digest`, without stopping at a match, so the time an answer
takes tells nothing about which hash was close. With no keys configured the
service is in open mode (every request acts as an admin of every tenant);
the settings allow that only on a loopback bind.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from .config import ApiKey
from .errors import RequestError

__all__ = [
    "Forbidden",
    "Keyring",
    "Need",
    "Principal",
    "Role",
    "Unauthorized",
    "new_key",
]

Role = Literal["ingest", "read", "admin"]
Need = Literal["public", "ingest", "read", "admin"]


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: a role and the tenants it may act for (None: every tenant).

    `label` names the key in logs without revealing it: the first 12 hex
    digits of its hash, or "open" in open mode.
    """

    role: Role
    tenants: frozenset[str] | None
    label: str

    def may(self, need: Need) -> bool:
        return need == "public" or self.role in ("admin", need)

    def sees(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


OPEN = Principal("admin", None, "open")


class Unauthorized(RequestError):
    """401: no key, a malformed Authorization header, or a key nobody configured."""

    def __init__(self, message: str, *, invalid_token: bool) -> None:
        super().__init__(401, "unauthorized", message)
        challenge = 'Bearer realm="billing-ingestor"'
        if invalid_token:
            challenge += ', error="invalid_token"'
        self.challenge = challenge


class Forbidden(RequestError):
    """403: a known key that lacks the role, or acts for a tenant outside its scope."""

    def __init__(self, message: str, code: str = "forbidden") -> None:
        super().__init__(403, code, message)


class Keyring:
    """The configured keys, ready to authenticate a request's Authorization header."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = [
            (
                bytes.fromhex(key.sha256),
                Principal(
                    key.role,
                    None if key.tenants == ("*",) else frozenset(key.tenants),
                    key.sha256[:12].lower(),
                ),
            )
            for key in keys
        ]

    @property
    def open(self) -> bool:
        """True when no keys are configured: every request acts as an admin."""
        return not self._keys

    def authenticate(
        self,
        authorization: str | Sequence[str] | None,
        hosts: Sequence[str] = (),
        origins: Sequence[str] = (),
    ) -> Principal:
        """The principal of a request's Authorization header (or of its every
        value, as a request gives them), or raise Unauthorized.

        Open, a request must name a loopback host (`hosts`, its Host headers):
        a web page a browser on this machine opens can reach 127.0.0.1 by DNS
        rebinding, as its own origin, but its requests name the page's host.
        A request naming none (HTTP/1.0, an empty Host) comes from no browser.
        Nor may it come from a page of another site (`origins`, its Origin
        headers): a page may POST to 127.0.0.1 without a CORS preflight
        (`/aggregates/commit?date=` needs no body), and with no key asked
        for, commit a day. Browsers name the page's origin on every POST and
        every cross-origin fetch; a key is no cookie: a page has none to send.
        """
        if not self._keys:
            for host in hosts:
                if host and not _loopback(host):
                    raise Forbidden(
                        "a server without API keys answers only requests to localhost,"
                        f" 127.0.0.1 or [::1]; this one is to {host[:100]!r}"
                    )
            for origin in origins:
                if not _loopback_origin(origin):
                    raise Forbidden(
                        "a server without API keys answers no request a web page of"
                        f" another site sends; this one's Origin is {origin[:100]!r}"
                    )
            return OPEN
        if authorization is not None and not isinstance(authorization, str):
            # Two headers: one route would read the first, another the last.
            if len(authorization) > 1:
                raise Unauthorized("send one Authorization header, not several", invalid_token=True)
            authorization = authorization[0] if authorization else None
        if not authorization:
            raise Unauthorized(
                "send an API key as 'Authorization: Bearer <key>'", invalid_token=False
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("expected 'Authorization: Bearer <key>'", invalid_token=True)
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        for expected, principal in self._keys:
            # Every hash is compared, match or not: no early exit to time.
            if hmac.compare_digest(digest, expected):
                found = principal
        if found is None:
            raise Unauthorized("unknown API key", invalid_token=True)
        return found

    @staticmethod
    def require(principal: Principal, need: Need, what: str) -> None:
        """Raise Forbidden unless `principal` may do `what`, which needs `need`."""
        if not principal.may(need):
            roles = "admin" if need == "admin" else f"{need} or admin"
            raise Forbidden(
                f"{what} needs a key with role {roles}; this key's role is {principal.role}"
            )


def _loopback_origin(origin: str) -> bool:
    """Whether an Origin header names a page of this machine ("null": of none)."""
    try:
        host = urlsplit(origin).netloc if "://" in origin else ""
    except ValueError:  # "http://[::1"
        return False
    return bool(host) and _loopback(host)


def _loopback(host: str) -> bool:
    """Whether a Host header names this machine: localhost or a loopback address."""
    name = host.strip()
    if name.startswith("["):  # [::1]:8081
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:  # 127.0.0.1:8081, localhost:8081
        name = name.partition(":")[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def new_key(role: Role, tenants: Sequence[str]) -> tuple[str, str]:
    """A new random key and the TOML table that configures it (by its hash only)."""
    key = secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    listed = ", ".join(map(_toml_string, tenants))
    table = f'[[api_keys]]\nsha256 = "{digest}"\nrole = "{role}"\ntenants = [{listed}]\n'
    return key, table


def _toml_string(text: str) -> str:
    """`text` as an ASCII TOML basic string.

    Not JSON's: it escapes a character past U+FFFF as two UTF-16 surrogates,
    which TOML refuses; TOML has `\\UXXXXXXXX` for it.
    """
    escaped = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            escaped.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            escaped.append(char)
        elif code <= 0xFFFF:
            escaped.append(f"\\u{code:04x}")
        else:
            escaped.append(f"\\U{code:08x}")
    return '"' + "".join(escaped) + '"'
