"""``patinox tenants tls`` and ``patinox serve --tls``: a certificate set from the command
line is validated, never printed with its key, and served by SNI by the real server
process (``python -m patinox serve --tls``)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.api.test_tls import CA, Issued
from tests.cli.conftest import assert_error, cli, first_json

BASE = "patinox.test"


@pytest.fixture
def base_domain(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> str:
    monkeypatch.setenv("PATINOX_BASE_DOMAIN", BASE)
    return BASE


def _files(tmp_path: Path, name: str, issued: Issued) -> tuple[str, str]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.write_text(issued.cert_pem)
    key.write_text(issued.key_pem)
    return str(cert), str(key)


def _served_serial(port: int, sni: str) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


@pytest.fixture
def server(base_domain: str, data_dir: Path, tmp_path: Path) -> Iterator[tuple[int, Issued, CA]]:
    ca = CA()
    deployment = ca.issue("deployment", [BASE])
    cert, key = _files(tmp_path, "deployment", deployment)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "PATINOX_DATA_DIR": str(data_dir), "PATINOX_BASE_DOMAIN": BASE,
           "PATINOX_TLS_CERT": cert, "PATINOX_TLS_KEY": key, "PATINOX_LOG_LEVEL": "warning"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "patinox", "serve", "--tls", "--port", str(port)], env=env)
    try:
        while True:  # until it listens (or exits)
            assert proc.poll() is None, "the server exited during start-up"
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.1)
        yield port, deployment, ca
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait()


def test_set_show_and_serve_a_tenants_certificate(
    server: tuple[int, Issued, CA], acme: str, tmp_path: Path
) -> None:
    port, deployment, ca = server
    host = f"acme.{BASE}"
    assert _served_serial(port, host) == deployment.serial
    issued = ca.issue("acme", [host])
    cert, key = _files(tmp_path, "acme", issued)
    result = cli("tenants", "tls", "set", "acme", "--cert", cert, "--key", key)
    assert result.exit_code == 0, result.output
    assert (
        "PRIVATE KEY" not in result.output
        and issued.key_pem.split("-----")[2].strip()[:40] not in result.output
    )
    assert first_json(result.stdout)["sans"] == [host]
    assert _served_serial(port, host) == issued.serial  # the running server, no restart
    assert _served_serial(port, f"other.{BASE}") == deployment.serial
    shown = cli("tenants", "tls", "show", "acme")
    assert shown.exit_code == 0 and first_json(shown.stdout)["subject"] == "CN=acme"
    assert cli("tenants", "tls", "remove", "acme").exit_code == 0
    assert _served_serial(port, host) == deployment.serial


def test_a_refused_pair_fails_cleanly(base_domain: str, acme: str, tmp_path: Path) -> None:
    ca = CA()
    cert, _ = _files(tmp_path, "a", ca.issue("acme", [f"acme.{BASE}"]))
    _, other_key = _files(tmp_path, "b", ca.issue("acme", [f"acme.{BASE}"]))
    assert_error(cli("tenants", "tls", "set", "acme", "--cert", cert, "--key", other_key), "does not belong")
    cert, key = _files(tmp_path, "c", ca.issue("acme", ["globex.example"]))
    assert_error(cli("tenants", "tls", "set", "acme", "--cert", cert, "--key", key), "does not cover")


def test_serve_tls_needs_the_deployment_certificate(data_dir: Path) -> None:
    assert_error(cli("serve", "--tls"), "--tls-cert")
