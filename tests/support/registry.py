"""Debian's docker-registry on a free loopback port, plain, with htpasswd or behind a token server.

    with start_registry(tmp_path) as reg:             # anonymous, plain HTTP
        push_busybox_image(reg, "test/busybox", "latest")
    with start_registry(tmp_path, auth="basic") as reg:   # reg.username / reg.password
    with start_registry(tmp_path, auth="token") as reg:   # reg.token_server counts its tokens

Several registries may serve one storage directory (`storage_dir=`), so
images pushed once to a plain registry are visible behind every auth kind.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import httpx

REGISTRY_BIN = "/usr/bin/docker-registry"
USERNAME = "criopy"
PASSWORD = "s3cret-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bcrypt_hash(password: str) -> str:
    import bcrypt

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()


# -- the token server ---------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _libtrust_key_id(der_public_key: bytes) -> str:
    """The key id docker-registry derives from a certificate (libtrust's format)."""
    import hashlib

    s = base64.b32encode(hashlib.sha256(der_public_key).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i:i + 4] for i in range(0, len(s), 4))


class TokenServer:
    """A distribution token server on loopback: signs RS256 JWTs for known users.

    GET with basic auth (or anonymously when `anonymous_pull`), and POST
    with `grant_type=password` or `grant_type=refresh_token` (the OAuth2
    flow identity tokens use). `issued` counts tokens handed out.
    """

    def __init__(self, workdir: Path, service: str, *, users: dict[str, str], expires_in: int = 300,
                 anonymous_pull: bool = False) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
        import datetime

        self.service = service
        self.issuer = "criopy-test-issuer"
        self.users = dict(users)
        self.expires_in = expires_in
        self.anonymous_pull = anonymous_pull
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user
        self.issued = 0
        self.requests: list[dict] = []
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "criopy test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self._key, hashes.SHA256()))
        self.cert_path = workdir / "token-signer.crt"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        der = self._key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        self.key_id = _libtrust_key_id(der)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add_refresh_token(self, user: str) -> str:
        token = secrets.token_urlsafe(24)
        self.refresh_tokens[token] = user
        return token

    def issue(self, user: str, scopes: list[str], *, expires_in: int | None = None) -> str:
        """A signed registry token for `user` granting `scopes` (`repository:name:pull,push`)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) >= 3 and parts[0] == "repository":
                access.append({"type": "repository", "name": ":".join(parts[1:-1]),
                               "actions": parts[-1].split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self.key_id}
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + (expires_in or self.expires_in),
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        self.issued += 1
        return f"{signing_input}.{_b64url(sig)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _basic_user(self) -> str | None:
                header = self.headers.get("Authorization", "")
                if not header.startswith("Basic "):
                    return None
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                return user if server.users.get(user) == password else ""

            def _grant(self, user: str | None, scopes: list[str]) -> None:
                if user == "":
                    self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    return
                if user is None and not server.anonymous_pull:
                    self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})
                    return
                if user is None:
                    scopes = [s.rsplit(":", 1)[0] + ":pull" for s in scopes]
                token = server.issue(user or "", scopes)
                body = {"token": token, "access_token": token, "expires_in": server.expires_in,
                        "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                self._reply(200, body)

            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(url.query)
                server.requests.append({"method": "GET", "query": query})
                if url.path != "/token" or query.get("service", [""])[0] != server.service:
                    self._reply(404, {})
                    return
                self._grant(self._basic_user(), " ".join(query.get("scope", [])).split())

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                server.requests.append({"method": "POST", "form": form})
                grant = form.get("grant_type", [""])[0]
                scopes = " ".join(form.get("scope", [])).split()
                if grant == "refresh_token":
                    user = server.refresh_tokens.get(form.get("refresh_token", [""])[0], "")
                elif grant == "password":
                    name = form.get("username", [""])[0]
                    user = name if server.users.get(name) == form.get("password", [None])[0] else ""
                else:
                    self._reply(400, {"error": "unsupported_grant_type"})
                    return
                self._grant(user, scopes)

        return Handler

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- the registry ---------------------------------------------------------------


def make_tls_cert(workdir: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for `host`: (certificate path, key path)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"criopy test registry {host}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "registry.crt", workdir / "registry.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Registry:
    host: str  # "127.0.0.1:<port>"
    url: str  # "http://127.0.0.1:<port>"
    storage_dir: Path
    process: subprocess.Popen
    log_path: Path
    auth: str = "none"
    username: str | None = None
    password: str | None = None
    token_server: TokenServer | None = None
    ca_path: Path | None = None  # the registry's self-signed certificate when it serves HTTPS
    extra: dict = field(default_factory=dict)

    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_path)) if self.ca_path else True

    def push_auth(self) -> httpx.Auth | None:
        """Credentials that let a test client push to this registry."""
        if self.auth == "basic":
            return httpx.BasicAuth(self.username or "", self.password or "")
        if self.auth == "token":
            return _TokenAuth(self)
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.token_server is not None:
            self.token_server.stop()


class _TokenAuth(httpx.Auth):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        ts = self.registry.token_server
        assert ts is not None
        path = request.url.path
        repo = path[len("/v2/"):].rsplit("/blobs/", 1)[0].rsplit("/manifests/", 1)[0]
        token = ts.issue(self.registry.username or "", [f"repository:{repo}:pull,push"])
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


def _config_yaml(port: int, storage: Path, auth_block: str, tls: tuple[Path, Path] | None = None) -> str:
    # docker-registry reads YAML; JSON is YAML, so no YAML library is needed.
    return (
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {json.dumps(str(storage))}\n  delete:\n    enabled: true\n"
        "  cache:\n    blobdescriptor: inmemory\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: {secrets.token_hex(16)}\n"
        + (f"  tls:\n    certificate: {json.dumps(str(tls[0]))}\n    key: {json.dumps(str(tls[1]))}\n" if tls else "")
        + auth_block
    )


def _wait_ready(reg: Registry, timeout: float = 60.0) -> None:
    """Until the registry answers; long, for a loaded machine: a registry that exits fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reg.process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {reg.log_path.read_text()[-2000:]}")
        try:
            r = httpx.get(f"{reg.url}/v2/", timeout=1.0, verify=reg.verify())
            if r.status_code in (200, 401):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    reg.stop()
    raise RuntimeError(f"docker-registry did not answer on {reg.url}: {reg.log_path.read_text()[-2000:]}")


def launch_registry(workdir: Path, *, auth: str = "none", storage_dir: Path | None = None,
                    token_expires_in: int = 300, anonymous_pull: bool = False, tls: bool = False) -> Registry:
    """Start a registry; the caller must call `stop()` (or use `start_registry`)."""
    if shutil.which(REGISTRY_BIN) is None:
        raise RuntimeError(f"{REGISTRY_BIN} is missing (Debian package docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    storage = storage_dir or workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    token_server = None
    username = password = None
    if auth == "none":
        block = ""
    elif auth == "basic":
        username, password = USERNAME, PASSWORD
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(f"{username}:{_bcrypt_hash(password)}\n")
        block = f"auth:\n  htpasswd:\n    realm: criopy-test\n    path: {json.dumps(str(htpasswd))}\n"
    elif auth == "token":
        username, password = USERNAME, PASSWORD
        service = f"criopy-test-registry-{port}"
        token_server = TokenServer(workdir, service, users={username: password}, expires_in=token_expires_in,
                                   anonymous_pull=anonymous_pull)
        block = ("auth:\n  token:\n"
                 f"    realm: {json.dumps(token_server.realm)}\n    service: {json.dumps(service)}\n"
                 f"    issuer: {json.dumps(token_server.issuer)}\n"
                 f"    rootcertbundle: {json.dumps(str(token_server.cert_path))}\n")
    else:
        raise ValueError(f"unknown auth kind {auth!r}")
    cert = make_tls_cert(workdir) if tls else None
    config = workdir / f"config-{port}.yml"
    config.write_text(_config_yaml(port, storage, block, cert))
    log_path = workdir / f"registry-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
    scheme = "https" if tls else "http"
    reg = Registry(f"127.0.0.1:{port}", f"{scheme}://127.0.0.1:{port}", storage, proc, log_path, auth,
                   username, password, token_server, cert[0] if cert else None)
    try:
        _wait_ready(reg)
    except BaseException:
        reg.stop()
        raise
    return reg


@contextlib.contextmanager
def start_registry(workdir: Path, **kwargs: object) -> Iterator[Registry]:
    """A running registry for the duration of the `with` block."""
    reg = launch_registry(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield reg
    finally:
        reg.stop()
