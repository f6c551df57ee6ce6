"""Real parts the security tests attack: an OIDC issuer (discovery document + JWKS over real HTTP, RSA keys made
here), service processes (``eo-controller``, ``eo-wrapper``) and in-process apps on loopback, a recording HTTP
server (an S3 endpoint or a redirect target that must never be reached), and small HTTP helpers."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import tempfile
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from services.local_platform.infra import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CANARY = "CANARY-7f3a9c1e-never-store-me"


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


_TLS_FILES: tuple[str, str] | None = None


def loopback_tls_files() -> tuple[str, str]:
    """(certificate, key) of a self-signed certificate for 127.0.0.1 and localhost, made once per test run: the
    certificate is also the CA file the verifier trusts (``EOML_AUTH_CA_FILE``), as the cluster CA is in a pod."""
    global _TLS_FILES
    if _TLS_FILES is None:
        key = new_rsa_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eoml-test-issuer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                       .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                       .not_valid_after(now + datetime.timedelta(days=1))
                       .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                       .add_extension(x509.SubjectAlternativeName([
                           x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                           critical=False)
                       .sign(key, hashes.SHA256()))
        folder = Path(tempfile.mkdtemp(prefix="eoml-test-tls-"))
        (folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        _TLS_FILES = (str(folder / "cert.pem"), str(folder / "key.pem"))
    return _TLS_FILES


def issuer_ca_file() -> str:
    return loopback_tls_files()[0]


class Issuer:
    """An OIDC issuer as the Kubernetes API server is one: ``/.well-known/openid-configuration`` and ``/openid/v1/jwks``
    over https (a certificate made here, ``issuer_ca_file()``); tokens signed with its RSA key (``kid`` ``test-key-1``).

    Knobs for attacks on the key fetch: ``jwks_uri`` (what the discovery document names), ``redirect_to`` (every
    answer a 302 there), ``status`` (every answer that HTTP status: an issuer that is down), ``jwks_delay_s`` (a slow
    JWKS answer); ``requests`` and ``request_headers`` record what reached it."""

    def __init__(self, *, tls: bool = True) -> None:
        self.key = new_rsa_key()
        self.kid = "test-key-1"
        self.requests: list[str] = []
        self.request_headers: list[dict[str, str]] = []
        self.redirect_to = ""
        self.status = 200
        self.jwks_delay_s = 0.0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*loopback_tls_files())
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self._server.server_address[1]}"
        self.jwks_uri = f"{self.url}/openid/v1/jwks"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def jwks(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                issuer.requests.append(self.path)
                issuer.request_headers.append({k.lower(): v for k, v in self.headers.items()})
                if issuer.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", issuer.redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if issuer.status != 200:
                    self.send_error(issuer.status)
                    return
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.jwks_uri,
                            "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["RS256"]}
                elif self.path == "/openid/v1/jwks":
                    time.sleep(issuer.jwks_delay_s)
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                pass

        return Handler

    def token(self, subject: str, audience: str, *, expires_in_s: float = 600, issuer: str | None = None,
              key: rsa.RSAPrivateKey | None = None, kid: str | None = None, algorithm: str = "RS256",
              issued_at: int | None = None) -> str:
        now = int(time.time())
        claims = {"iss": issuer or self.url, "aud": [audience], "sub": subject,
                  "iat": now - 5 if issued_at is None else issued_at, "nbf": now - 5, "exp": now + int(expires_in_s)}
        return jwt.encode(claims, key or self.key, algorithm=algorithm, headers={"kid": kid or self.kid})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class RecordingServer:
    """Answers every request with ``status`` (and ``headers``) and records it: an S3 endpoint that must stay unused,
    or a redirect source/target."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    tls: bool = False  # https with the certificate of loopback_tls_files() (127.0.0.1, localhost)
    requests: list[tuple[str, str]] = field(default_factory=list)
    request_headers: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                recorder.requests.append((self.command, self.path))
                recorder.request_headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(recorder.status)
                for name, value in recorder.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any  # noqa: N815

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*loopback_tls_files())
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class InProcessApp:
    """An aiohttp app served from a background thread's event loop on a free loopback port."""

    def __init__(self, app: web.Application) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, access_log=None)
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert started.wait(10), "app did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class ServiceProcess:
    """A service started as its console command would be (``python -m ...``), its log in a file."""

    def __init__(self, module: str, args: list[str], env: Mapping[str, str], log_path: Path, health_url: str,
                 timeout_s: float = 60.0) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                        stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{module} exited: {self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(health_url, timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{module} did not answer {health_url}: {self.log()[-3000:]}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def http(method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
         timeout_s: float = 20.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cloudevent_headers(namespace: str, topic: str, offset: int = 0) -> dict[str, str]:
    return {"ce-specversion": "1.0", "ce-id": f"partition:0/offset:{offset}", "ce-type": "dev.knative.kafka.event",
            "ce-source": f"/apis/v1/namespaces/{namespace}/kafkasources/src#{topic}",
            "ce-subject": f"partition:0#{offset}", "Content-Type": "application/json"}


def wait_until(condition: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def files_text(root: Path, exclude_suffix: str = ".credentials.json") -> Iterator[tuple[Path, str]]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.endswith(exclude_suffix):
            yield path, path.read_text(errors="replace")
