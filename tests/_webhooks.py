"""The shared fixtures and helpers of the webhook tests.

A real HTTPS webhook receiver: a local server on 127.0.0.1 with a certificate for that
address signed by a CA made for the test (``cryptography``), recording every request and
answering the statuses a test queues (:func:`https_receiver`, the ``receiver`` fixture);
the ``rt`` runtime that may send to it and its ``client``; :class:`Tenant` (a tenant with a
``webhooks:write`` key and an agent); :func:`deliver` (one pass of a delivery loop) and
:func:`pending` (an endpoint's outbox rows); :class:`ProcessDied` (a process dying
mid-settlement, for the crash tests). A test module uses a fixture by importing it."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.control import WebhookSettings
from patinox.isolation import Template
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend
from tests.conftest import ALL_DEPLOYMENTS, Deployment, TenantHandle, auth


@dataclass
class Received:
    """One request the receiver got: its path, headers (lower-case names) and raw body."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """The running receiver: ``url`` (``https://127.0.0.1:<port>/hook``), ``ca_bundle`` (the
    PEM of the CA that signed its certificate), what it ``received``; ``answers`` is the
    list of statuses to answer next, in order (200 once it is empty)."""

    url: str
    ca_bundle: str
    received: list[Received] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("receiver.test")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class _Server(ThreadingHTTPServer):
    receiver: Receiver

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        r = self.server.receiver
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with r.lock:
            r.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            status = r.answers.pop(0) if r.answers else 200
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def https_receiver(tmp_path: Path) -> Iterator[Receiver]:
    """Run a receiver for the duration of the generator (a fixture's body)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Webhook test CA")])
    ca = _cert("Webhook test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("127.0.0.1", key, ca_name, ca_key, ca=False)
    (tmp_path / "wh-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "wh-leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "wh-leaf.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "wh-leaf.pem", tmp_path / "wh-leaf.key")
    server = _Server(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    receiver = Receiver(
        url=f"https://127.0.0.1:{server.server_address[1]}/hook", ca_bundle=str(tmp_path / "wh-ca.pem")
    )
    server.receiver = receiver
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


class ProcessDied(BaseException):
    """Stands for the worker process dying: nothing after it runs, nothing catches it."""


EVERY_DEPLOYMENT = pytest.mark.parametrize("deployment", ALL_DEPLOYMENTS, indirect=True)

WRITE_SCOPES = ["agents:write", "runs:write", "read", "webhooks:write"]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A running HTTPS receiver (see :func:`https_receiver`)."""
    yield from https_receiver(tmp_path)


@pytest.fixture
def rt(
    deployment: Deployment,
    backend: SqlBackend,
    kek_url: str,
    exec_template: Template,
    exec_root: Path,
    exec_cgroup_prefix: str,
    receiver: Receiver,
) -> Iterator[Runtime]:
    """A runtime whose operator allows 127.0.0.0/8 and trusts the receiver's CA; no
    embedded worker (the tests drive the delivery loops themselves); no wait between
    attempts; an endpoint disabled after 3 consecutive failed attempts."""
    settings = Settings(
        database_url=deployment.db_url,
        owner_url=deployment.owner_url,
        kek_url=kek_url,
        exec_root=exec_root,
        exec_cgroup_prefix=exec_cgroup_prefix,
        embedded_workers=0,
        webhooks=WebhookSettings(
            allowed_ranges=("127.0.0.0/8",),
            ca_bundle=receiver.ca_bundle,
            timeout_s=5.0,
            max_attempts=5,
            backoff_base_s=0.0,
            backoff_max_s=0.0,
            disable_after=3,
        ),
    )
    runtime = Runtime.build(settings, backend=backend, template=exec_template)
    yield runtime
    runtime.close()


@pytest.fixture
def client(rt: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=rt), raise_server_exceptions=False) as c:
        yield c


class Tenant:
    """A tenant with a key that may write webhooks, and one agent."""

    def __init__(self, client: TestClient, rt: Runtime, name: str, storage_model: str) -> None:
        op = rt.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret
        handle = TenantHandle(client, op, name, storage_model=storage_model)
        self.id = handle.id
        r = client.post(
            f"/admin/tenants/{self.id}/keys", json={"name": "wh", "scopes": WRITE_SCOPES}, headers=auth(op)
        )
        assert r.status_code == 201, r.text
        self.h = auth(r.json()["key"])
        self.c = client
        handle.h = self.h
        self.agent = handle.agent()

    def endpoint(self, url: str, events: list[str] | None = None) -> dict[str, Any]:
        body = {"url": url, "event_types": events or ["run.succeeded", "run.failed", "run.cancelled"]}
        r = self.c.post("/v1/webhooks", json=body, headers=self.h)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def run(self, **kw: Any) -> dict[str, Any]:
        r = self.c.post(f"/v1/agents/{self.agent}/runs", json={"input": "hello there", **kw}, headers=self.h)
        assert r.status_code in (200, 201, 202), r.text
        return dict(r.json())

    def log(self, endpoint_id: str) -> list[dict[str, Any]]:
        r = self.c.get(f"/v1/webhooks/{endpoint_id}/deliveries", headers=self.h)
        assert r.status_code == 200, r.text
        return list(r.json())


def deliver(rt: Runtime, holder: str = "loop-a") -> int:
    return asyncio.run(rt.webhook_dispatcher(holder=holder).deliver_due())


def pending(rt: Runtime, tenant_id: str, endpoint_id: str) -> list[dict[str, Any]]:
    assert rt.webhooks is not None
    return rt.webhooks.outbox.deliveries(tenant_id, endpoint_id)
