"""Registry credentials and bearer tokens.

Credentials come from the CRI `AuthConfig` of the pull request (username and
password, the base64 `auth` field, an identity token or a registry token)
or, when the request has none, from the containers `auth.json` file.
Bearer tokens are cached per realm, service, scope and credentials until
they expire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidArgument

# A token without `expires_in` lives 60 s (the distribution token spec).
DEFAULT_TOKEN_LIFETIME = 60
# Refresh a token this long before it expires, so a request never carries a stale one.
EXPIRY_SLACK = 5


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # OAuth2 refresh token, exchanged at the token realm
    registry_token: str = ""  # a bearer token used as it is

    @property
    def empty(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def key(self) -> str:
        """A cache key that tells credentials apart without keeping secrets readable."""
        raw = "\0".join((self.username, self.password, self.identity_token, self.registry_token))
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, ...)"


def _decode_auth(value: str, where: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value, validate=False).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(f"{where}: 'auth' is not base64 of 'user:password'") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise InvalidArgument(f"{where}: 'auth' is not base64 of 'user:password'")
    return user, password


def from_cri(auth: dict | None) -> Credentials | None:
    """Credentials from a CRI AuthConfig map; None when it carries none."""
    if not auth:
        return None
    if not isinstance(auth, dict):
        raise InvalidArgument("auth must be a map")
    username = str(auth.get("username") or "")
    password = str(auth.get("password") or "")
    if auth.get("auth"):
        username, password = _decode_auth(str(auth["auth"]), "AuthConfig")
    creds = Credentials(username, password, str(auth.get("identity_token") or ""),
                        str(auth.get("registry_token") or ""))
    return None if creds.empty else creds


def _normalise_key(key: str) -> str:
    key = re.sub(r"^https?://", "", key).rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    if key in ("index.docker.io", "registry-1.docker.io"):
        key = "docker.io"
    return key


def from_auth_file(path: str, domain: str, repo_path: str) -> Credentials | None:
    """Credentials for `domain/repo_path` from a containers auth.json, most specific key first."""
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"auth file {path}: cannot read: {e}") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    entries = {_normalise_key(k): v for k, v in auths.items() if isinstance(v, dict)}
    parts = repo_path.split("/")
    wanted = [f"{domain}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)] + [domain]
    for key in wanted:
        entry = entries.get(key)
        if entry is None:
            continue
        username = str(entry.get("username") or "")
        password = str(entry.get("password") or "")
        if entry.get("auth"):
            username, password = _decode_auth(str(entry["auth"]), f"auth file {path}, entry {key}")
        creds = Credentials(username, password, str(entry.get("identitytoken") or ""), "")
        if not creds.empty:
            return creds
    return None


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: dict[str, str]


_PARAM_RE = re.compile(r'([a-zA-Z0-9_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenges(header_values: list[str]) -> list[Challenge]:
    """Parse `WWW-Authenticate` values (Bearer realm="..",service="..",scope="..")."""
    out: list[Challenge] = []
    for value in header_values:
        starts = [m for m in re.finditer(r'(?:^|(?<=[\s,]))(Bearer|Basic)(?=\s|$)', value, re.IGNORECASE)]
        for i, m in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(value)
            text = value[m.end():end]
            params = {k.lower(): (q.replace('\\"', '"') if q else u) for k, q, u in _PARAM_RE.findall(text)}
            out.append(Challenge(m.group(1).lower(), params))
    return out


@dataclass
class Token:
    value: str
    expires_at: float  # time.monotonic()


class TokenCache:
    """Bearer tokens by (realm, service, scope, credentials), kept until they expire."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str, str], Token] = {}

    def get(self, key: tuple[str, str, str, str]) -> str | None:
        token = self._tokens.get(key)
        if token is None:
            return None
        if time.monotonic() >= token.expires_at - EXPIRY_SLACK:
            del self._tokens[key]
            return None
        return token.value

    def put(self, key: tuple[str, str, str, str], value: str, expires_in: int | None) -> None:
        lifetime = expires_in if isinstance(expires_in, int) and expires_in > 0 else DEFAULT_TOKEN_LIFETIME
        self._tokens[key] = Token(value, time.monotonic() + lifetime)

    def drop(self, key: tuple[str, str, str, str]) -> None:
        self._tokens.pop(key, None)
