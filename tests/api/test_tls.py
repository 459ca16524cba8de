"""Per-tenant TLS: each tenant host name served with its own certificate, chosen by SNI.

A real HTTPS server (uvicorn, configured by :func:`patinox.cli.serve.https_config`, the code
``patinox serve --tls`` runs) listens on 127.0.0.1; a real TLS client sends each name as
SNI (the names do not resolve here). The CA and every certificate are made by the test
with ``cryptography``.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.cli.serve import https_config
from patinox.control.tls import name_covered
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend
from tests.conftest import Deployment, auth

BASE = "patinox.test"

pytestmark = pytest.mark.only_deployments("sqlite-pool", "pg-pool")


# --- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert_pem: str
    key_pem: str
    serial: int


class CA:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Patinox test CA")])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, cn: str, sans: list[str], *, days: float = 90, ago: float = 1, key: Any = None) -> Issued:
        own = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(own.public_key())
            .serial_number(serial)
            .not_valid_before(now - timedelta(days=ago))
            .not_valid_after(now + timedelta(days=days))
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = (key or own).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode(), serial)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


# --- the deployment and its HTTPS server ----------------------------------------------


@pytest.fixture
def tls_runtime(
    deployment: Deployment, backend: SqlBackend, kek_url: str, exec_root: Path
) -> Iterator[Runtime]:
    settings = Settings(
        database_url=deployment.db_url,
        owner_url=deployment.owner_url,
        kek_url=kek_url,
        exec_root=exec_root,
        isolation_levels=frozenset(),
        base_domain=BASE,
        base_hosts=("localhost",),
    )
    rt = Runtime.build(settings, backend=backend)
    yield rt
    rt.close()


@pytest.fixture
def api(tls_runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=tls_runtime), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def op_key(tls_runtime: Runtime) -> str:
    return tls_runtime.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret


@pytest.fixture
def deployment_cert(ca: CA, tmp_path: Path) -> tuple[Issued, Path, Path]:
    issued = ca.issue("deployment", [BASE, "localhost"])
    cert, key = tmp_path / "deployment.pem", tmp_path / "deployment.key"
    cert.write_text(issued.cert_pem)
    key.write_text(issued.key_pem)
    return issued, cert, key


@pytest.fixture
def https_port(tls_runtime: Runtime, deployment_cert: tuple[Issued, Path, Path]) -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = uvicorn.Config(
        create_app(runtime=tls_runtime), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(
        https_config(config, tls_runtime, cert_file=deployment_cert[1], key_file=deployment_cert[2])
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the HTTPS server did not start")
        threading.Event().wait(0.02)
    yield port
    server.should_exit = True
    thread.join()


def _on(host: str, key: str) -> dict[str, Any]:
    return {**auth(key), "Host": host}


def _tenant(api: TestClient, op_key: str, name: str) -> tuple[str, str]:
    r = api.post("/admin/tenants", json={"name": name}, headers=_on(BASE, op_key))
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    r = api.post(
        f"/admin/tenants/{tid}/keys",
        json={"name": "k", "scopes": ["read", "secrets:write"]},
        headers=_on(BASE, op_key),
    )
    assert r.status_code == 201, r.text
    return tid, r.json()["key"]


def _put(api: TestClient, host: str, key: str, issued: Issued) -> Any:
    return api.put(
        "/v1/tls",
        json={"certificate": issued.cert_pem, "private_key": issued.key_pem},
        headers=_on(host, key),
    )


def _served(port: int, sni: str | None, *, cafile: str | None = None) -> x509.Certificate:
    """The certificate the server presents for ``sni``; verified against ``cafile`` (host
    name included) when given."""
    if cafile is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=cafile)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        if sni is not None:  # the server answers HTTP over that connection
            tls.sendall(f"GET /healthz HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            assert tls.recv(64).startswith(b"HTTP/1.1 200")
    return x509.load_der_x509_certificate(der)


# --- the tests -------------------------------------------------------------------------


def test_sni_serves_each_tenant_its_own_certificate_and_other_names_the_deployment_one(
    api: TestClient,
    op_key: str,
    ca: CA,
    https_port: int,
    deployment_cert: tuple[Issued, Path, Path],
    tmp_path: Path,
) -> None:
    acme, acme_key = _tenant(api, op_key, "acme")
    globex, _ = _tenant(api, op_key, "globex")
    r = api.put(
        f"/admin/tenants/{globex}/endpoint",
        json={"domains": ["api.globex.example"]},
        headers=_on(BASE, op_key),
    )
    assert r.status_code == 200, r.text
    acme_cert = ca.issue("acme", [f"acme.{BASE}"])
    globex_cert = ca.issue("globex", [f"globex.{BASE}", "*.globex.example"])
    assert _put(api, f"acme.{BASE}", acme_key, acme_cert).status_code == 200
    # The operator's route sets a tenant's certificate as well.
    r = api.put(
        f"/admin/tenants/{globex}/tls",
        json={"certificate": globex_cert.cert_pem, "private_key": globex_cert.key_pem},
        headers=_on(BASE, op_key),
    )
    assert r.status_code == 200, r.text
    assert r.json()["sans"] == [f"globex.{BASE}", "*.globex.example"]

    cafile = tmp_path / "ca.pem"
    cafile.write_text(ca.pem)
    assert _served(https_port, f"acme.{BASE}", cafile=str(cafile)).serial_number == acme_cert.serial
    assert _served(https_port, f"ACME.{BASE}.").serial_number == acme_cert.serial  # case, final dot
    assert _served(https_port, f"globex.{BASE}", cafile=str(cafile)).serial_number == globex_cert.serial
    assert _served(https_port, "api.globex.example", cafile=str(cafile)).serial_number == globex_cert.serial
    default = deployment_cert[0].serial
    assert _served(https_port, f"unknown.{BASE}").serial_number == default
    assert _served(https_port, "acme.example").serial_number == default
    assert _served(https_port, BASE, cafile=str(cafile)).serial_number == default
    assert _served(https_port, None).serial_number == default  # no SNI at all
    assert acme != globex


def test_a_replaced_certificate_is_served_without_a_restart(
    api: TestClient, op_key: str, ca: CA, https_port: int, deployment_cert: tuple[Issued, Path, Path]
) -> None:
    _, key = _tenant(api, op_key, "acme")
    host = f"acme.{BASE}"
    assert _served(https_port, host).serial_number == deployment_cert[0].serial  # none yet
    first, second = ca.issue("acme-1", [host]), ca.issue("acme-2", [host])
    assert _put(api, host, key, first).json()["version"] == 1
    assert _served(https_port, host).serial_number == first.serial
    assert _served(https_port, host).serial_number == first.serial  # from the cache, same
    assert _put(api, host, key, second).json()["version"] == 2
    assert _served(https_port, host).serial_number == second.serial
    assert api.delete("/v1/tls", headers=_on(host, key)).status_code == 204
    assert _served(https_port, host).serial_number == deployment_cert[0].serial


def test_a_deleted_tenants_names_get_the_deployment_certificate(
    api: TestClient, op_key: str, ca: CA, https_port: int, deployment_cert: tuple[Issued, Path, Path]
) -> None:
    tid, key = _tenant(api, op_key, "acme")
    host = f"acme.{BASE}"
    issued = ca.issue("acme", [host])
    assert _put(api, host, key, issued).status_code == 200
    assert _served(https_port, host).serial_number == issued.serial
    assert api.delete(f"/admin/tenants/{tid}", headers=_on(BASE, op_key)).status_code == 200
    assert _served(https_port, host).serial_number == deployment_cert[0].serial


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("mismatched key", "tls_key_mismatch"),
        ("name not covered", "tls_name_not_covered"),
        ("expired", "tls_expired"),
        ("not pem", "invalid_tls"),
        ("no san", "tls_name_not_covered"),
        ("partial wildcard", "tls_name_not_covered"),
    ],
)
def test_bad_uploads_are_refused_with_their_code_and_nothing_is_stored(
    api: TestClient, op_key: str, ca: CA, case: str, code: str
) -> None:
    _, key = _tenant(api, op_key, "acme")
    host = f"acme.{BASE}"
    good = ca.issue("acme", [host])
    bad = {
        "mismatched key": ca.issue("acme", [host], key=ec.generate_private_key(ec.SECP256R1())),
        "name not covered": ca.issue("acme", [f"globex.{BASE}", f"*.acme.{BASE}"]),
        "expired": ca.issue("acme", [host], days=-1, ago=30),
        "not pem": Issued("not a certificate", good.key_pem, 0),
        "no san": ca.issue(host, []),
        "partial wildcard": ca.issue("acme", [f"ac*.{BASE}"]),
    }[case]
    r = _put(api, host, key, bad)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code
    assert bad.key_pem not in r.text
    r = api.get("/v1/tls", headers=_on(host, key))
    assert r.status_code == 404
    assert [s["name"] for s in api.get("/v1/secrets", headers=_on(host, key)).json()] == []


def test_the_generic_secret_route_cannot_write_a_tls_secret(api: TestClient, op_key: str) -> None:
    _, key = _tenant(api, op_key, "acme")
    r = api.put("/v1/secrets/tls:certificate", json={"value": "x"}, headers=_on(f"acme.{BASE}", key))
    assert r.status_code == 422
    assert r.json()["error"]["details"]["field"] == "name"


def test_the_key_never_appears_in_any_answer_and_expiry_is_reported(
    api: TestClient, op_key: str, ca: CA
) -> None:
    tid, key = _tenant(api, op_key, "acme")
    host = f"acme.{BASE}"
    soon = ca.issue("acme", [host], days=10)
    body = soon.key_pem.split("-----")[2].strip()  # the base64 of the key
    answers = [_put(api, host, key, soon)]
    answers.append(api.get("/v1/tls", headers=_on(host, key)))
    answers.append(api.get(f"/admin/tenants/{tid}/tls", headers=_on(BASE, op_key)))
    answers.append(api.get("/v1/secrets", headers=_on(host, key)))
    answers.append(api.get(f"/admin/tenants/{tid}/secrets", headers=_on(BASE, op_key)))
    for r in answers:
        assert r.status_code == 200, r.text
        assert body[:40] not in r.text and "PRIVATE KEY" not in r.text
    shown = answers[1].json()
    assert shown["subject"] == "CN=acme"
    assert shown["sans"] == [host]
    assert shown["hosts"] == [host] and shown["hosts_not_covered"] == []
    assert shown["days_left"] in (9, 10)
    assert "expires in" in shown["warning"]
    assert shown["version"] == 1
    # A certificate with time left carries no warning.
    assert _put(api, host, key, ca.issue("acme", [host], days=90)).json()["warning"] is None


def test_a_key_without_secrets_write_cannot_set_a_certificate(api: TestClient, op_key: str, ca: CA) -> None:
    tid, _ = _tenant(api, op_key, "acme")
    r = api.post(
        f"/admin/tenants/{tid}/keys", json={"name": "r", "scopes": ["read"]}, headers=_on(BASE, op_key)
    )
    reader = r.json()["key"]
    r = _put(api, f"acme.{BASE}", reader, ca.issue("acme", [f"acme.{BASE}"]))
    assert r.status_code == 403


@pytest.mark.parametrize(
    ("host", "sans", "covered"),
    [
        ("acme.patinox.test", ["acme.patinox.test"], True),
        ("acme.patinox.test", ["*.patinox.test"], True),
        ("acme.patinox.test", ["ACME.Patinox.Test."], True),
        ("a.acme.patinox.test", ["*.patinox.test"], False),  # one label only
        ("patinox.test", ["*.patinox.test"], False),
        ("acme.test", ["*.test"], False),  # not on a public suffix-like single label
        ("acme.patinox.test", ["ac*.patinox.test"], False),  # no partial wildcards
        ("acme.patinox.test", ["*.*.test"], False),
        ("acme.patinox.test", ["globex.patinox.test"], False),
    ],
)
def test_name_coverage_follows_rfc_6125(host: str, sans: list[str], covered: bool) -> None:
    assert name_covered(host, sans) is covered
