"""An OCI distribution API client for one repository on one registry endpoint.

Authentication follows the registry's `WWW-Authenticate` challenge from the
`/v2/` ping: bearer tokens from the token realm (scoped to the repository,
cached until they expire), or basic credentials. Transient failures
(connection errors, 5xx, 429 with Retry-After) are retried with backoff;
401, 403 and 404 are not and become typed errors naming image and registry.
"""

from __future__ import annotations

import base64
import hashlib
import random
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from services.imaged import manifest as mf
from services.imaged.auth import Challenge, Credentials, TokenCache, parse_challenges
from services.imaged.blobstore import BlobStore, BlobVerificationError
from services.imaged.registries_conf import Endpoint
from shared.errors import CriopyError, NotFound, PermissionDenied, Unauthenticated, Unavailable

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 5
MAX_RETRY_AFTER = 30.0
USER_AGENT = "crio-py"


class _Transient(Exception):
    """A response worth retrying (5xx, 429), with the wait the registry asked for."""

    def __init__(self, status: int, retry_after: float | None, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.retry_after = retry_after


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), MAX_RETRY_AFTER))
    except ValueError:
        return None  # an HTTP date: fall back to backoff


def _tls_verify_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_retriable(exc: BaseException) -> bool:
    # A certificate that does not verify will not verify on the next attempt either.
    return isinstance(exc, _Transient) or (isinstance(exc, httpx.TransportError) and not _tls_verify_error(exc))


def _wait(state: Any) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, _Transient) and exc.retry_after is not None:
        return exc.retry_after
    base = min(0.2 * (2 ** (state.attempt_number - 1)), 5.0)
    return base * (0.5 + random.random() / 2)


@dataclass
class HostAuth:
    """What the `/v2/` ping of a host said about authentication."""

    challenges: list[Challenge]


class RegistryClient:
    def __init__(self, http: httpx.AsyncClient, tokens: TokenCache, host_auth: dict[str, HostAuth],
                 endpoint: Endpoint, credentials: Credentials | None, image: str) -> None:
        self.http = http
        self.tokens = tokens
        self.host_auth = host_auth
        self.endpoint = endpoint
        self.credentials = credentials
        self.image = image
        self.registry = endpoint.host
        self.scope = f"repository:{endpoint.path}:pull"

    # -- errors ------------------------------------------------------------

    def _status_error(self, resp: httpx.Response, what: str) -> CriopyError:
        where = f"pulling image {self.image} from registry {self.registry}"
        if resp.status_code == 401:
            hint = "credentials were refused" if self.credentials else "authentication is required"
            return Unauthenticated(f"{where}: {what}: {hint} (HTTP 401)")
        if resp.status_code == 403:
            return PermissionDenied(f"{where}: {what}: access denied (HTTP 403)")
        if resp.status_code == 404:
            return NotFound(f"{where}: {what} not found (HTTP 404)")
        return Unavailable(f"{where}: {what}: unexpected HTTP {resp.status_code}", retriable=False)

    def _final_error(self, exc: BaseException, what: str) -> CriopyError:
        # Already retried here with backoff: the frontend must not run the whole pull again
        # until the kubelet's deadline, but answer now so the kubelet backs off, as with CRI-O.
        where = f"pulling image {self.image} from registry {self.registry}"
        if isinstance(exc, _Transient):
            return Unavailable(f"{where}: {what}: registry kept failing ({exc})", retriable=False)
        if _tls_verify_error(exc):
            return Unavailable(f"{where}: {what}: the registry's TLS certificate does not verify against the "
                               f"system's CAs ({exc}); mark the registry insecure to use plain HTTP", retriable=False)
        return Unavailable(f"{where}: {what}: {type(exc).__name__}: {exc or 'connection failed'}", retriable=False)

    async def _retrying(self, what: str, op: Any) -> Any:
        try:
            async for attempt in AsyncRetrying(retry=retry_if_exception(_is_retriable), wait=_wait,
                                               stop=stop_after_attempt(MAX_ATTEMPTS), reraise=True):
                with attempt:
                    return await op()
        except (_Transient, httpx.TransportError) as e:
            raise self._final_error(e, what) from None

    # -- authentication ----------------------------------------------------

    async def _ping(self) -> HostAuth:
        resp = await self.http.get(f"{self.endpoint.base_url}/v2/")
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Transient(resp.status_code, _retry_after(resp), "ping /v2/")
        if resp.status_code == 401:
            auth = HostAuth(parse_challenges(resp.headers.get_list("www-authenticate")))
        elif resp.status_code in (200, 404):
            # 404: a registry without the /v2/ endpoint still serves its API.
            auth = HostAuth([])
        else:
            raise self._status_error(resp, "ping /v2/")
        self.host_auth[self.endpoint.base_url] = auth
        return auth

    async def _auth_header(self, refresh: bool = False) -> dict[str, str]:
        creds = self.credentials
        if creds is not None and creds.registry_token:
            return {"Authorization": f"Bearer {creds.registry_token}"}
        auth = self.host_auth.get(self.endpoint.base_url)
        if auth is None or refresh:
            auth = await self._ping()
        for ch in auth.challenges:
            if ch.scheme == "bearer" and ch.params.get("realm"):
                return {"Authorization": f"Bearer {await self._token(ch, refresh)}"}
        for ch in auth.challenges:
            if ch.scheme == "basic" and creds is not None and creds.username:
                raw = f"{creds.username}:{creds.password}".encode()
                return {"Authorization": f"Basic {base64.b64encode(raw).decode()}"}
        return {}

    async def _token(self, ch: Challenge, refresh: bool) -> str:
        realm = ch.params["realm"]
        service = ch.params.get("service", "")
        creds = self.credentials
        key = (realm, service, self.scope, creds.key() if creds else "")
        if refresh:
            self.tokens.drop(key)
        cached = self.tokens.get(key)
        if cached is not None:
            return cached
        what = f"token from {realm}"
        if creds is not None and creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "service": service, "scope": self.scope, "client_id": USER_AGENT}
            resp = await self.http.post(realm, data=form)
        else:
            params = {"scope": self.scope}
            if service:
                params["service"] = service
            basic = httpx.BasicAuth(creds.username, creds.password) if creds and creds.username else None
            resp = await self.http.get(realm, params=params, auth=basic)
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Transient(resp.status_code, _retry_after(resp), what)
        if resp.status_code != 200:
            raise self._status_error(resp, what)
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise Unauthenticated(f"pulling image {self.image}: {what}: reply has no token")
        expires_in = body.get("expires_in")
        self.tokens.put(key, token, expires_in if isinstance(expires_in, int) else None)
        log.debug("registry_token_issued", realm=realm, scope=self.scope, expires_in=expires_in)
        return token

    async def _send(self, method: str, url: str, headers: dict[str, str], *, stream: bool) -> httpx.Response:
        """One request with authentication; a 401 gets one retry with a fresh challenge and token."""
        for refresh in (False, True):
            req = self.http.build_request(method, url, headers={**headers, **await self._auth_header(refresh)})
            resp = await self.http.send(req, stream=stream)
            if resp.status_code != 401 or refresh:
                return resp
            await resp.aclose()
        raise AssertionError("unreachable")

    # -- the API -----------------------------------------------------------

    async def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest by tag or digest, verified when by digest."""
        url = f"{self.endpoint.base_url}/v2/{self.endpoint.path}/manifests/{reference}"
        what = f"manifest {reference}"

        async def op() -> tuple[bytes, str, str]:
            resp = await self._send("GET", url, {"Accept": mf.ACCEPT}, stream=True)
            try:
                if resp.status_code >= 500 or resp.status_code == 429:
                    raise _Transient(resp.status_code, _retry_after(resp), what)
                if resp.status_code != 200:
                    raise self._status_error(resp, what)
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > mf.MAX_MANIFEST_BYTES:
                    raise BlobVerificationError(
                        f"pulling image {self.image} from registry {self.registry}: {what} is {declared} bytes, "
                        f"more than the {mf.MAX_MANIFEST_BYTES}-byte limit")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > mf.MAX_MANIFEST_BYTES:
                        raise BlobVerificationError(
                            f"pulling image {self.image} from registry {self.registry}: {what} exceeds the "
                            f"{mf.MAX_MANIFEST_BYTES}-byte limit")
                return bytes(body), resp.headers.get("content-type", ""), ""
            finally:
                await resp.aclose()

        body, content_type, _ = await self._retrying(what, op)
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        if reference.startswith("sha256:") and digest != reference:
            raise BlobVerificationError(
                f"pulling image {self.image} from registry {self.registry}: {what}: content digest {digest} "
                "does not match")
        return body, content_type, digest

    async def fetch_blob(self, store: BlobStore, digest: str, size: int, what: str) -> Path:
        """Download a blob into the store, verified against digest and size."""
        url = f"{self.endpoint.base_url}/v2/{self.endpoint.path}/blobs/{digest}"
        label = f"pulling image {self.image} from registry {self.registry}: {what} {digest}"

        async def op() -> Path:
            resp = await self._send("GET", url, {}, stream=True)
            try:
                if resp.status_code >= 500 or resp.status_code == 429:
                    raise _Transient(resp.status_code, _retry_after(resp), f"{what} {digest}")
                if resp.status_code != 200:
                    raise self._status_error(resp, f"{what} {digest}")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > size:
                    raise BlobVerificationError(
                        f"{label}: registry announces {declared} bytes, the manifest declares {size}")
                chunks: AsyncIterator[bytes] = resp.aiter_bytes()
                return await store.ingest(digest, size, chunks, what=label)
            finally:
                await resp.aclose()

        return await self._retrying(f"{what} {digest}", op)
