"""Attacks on network and configuration isolation: the egress guard's address checks, key
lifetimes minted through the tenant key API, and the model allow-list's default model.

Each test is an attack that worked before its fix (or one that must keep failing): an
``http_fetch`` URL whose IPv6 address carries an internal IPv4 address a translator
(NAT64, 6to4, SIIT, the old IPv4-compatible form) delivers to; a short-lived key that
mints or rotates into a key living for ever; an operator narrowing a tenant's models
while its default model stays outside them.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.errors import EgressRefused
from patinox.network import OutboundGuard, OutboundPolicy
from patinox.runtime import Runtime, Settings
from tests.api._server import Server
from tests.conftest import auth

ON_BOTH = pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)

# --- egress: IPv6 forms of internal IPv4 addresses ---------------------------------------

#: IPv6 literals that name loopback, the metadata address or a private address through a
#: translation prefix, and the standard that defines it.
EMBEDDED = [
    "::7f00:1",  # IPv4-compatible ::127.0.0.1 (RFC 4291, deprecated)
    "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT, RFC 2765)
    "64:ff9b::a9fe:a9fe",  # NAT64 well-known prefix (RFC 6052) to 169.254.169.254
    "64:ff9b::a00:1",  # NAT64 to 10.0.0.1
    "64:ff9b:1::7f00:1",  # NAT64 local-use prefix (RFC 8215)
    "2002:a9fe:a9fe::1",  # 6to4 (RFC 3056) of 169.254.169.254
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "fec0::1",  # site-local (RFC 3879, deprecated): a private range
]


@pytest.mark.parametrize("address", EMBEDDED)
def test_egress_refuses_ipv6_addresses_that_carry_an_internal_ipv4_address(address: str) -> None:
    guard = OutboundGuard(OutboundPolicy(allowed_hosts=None, schemes=frozenset({"http", "https"})))
    with pytest.raises(EgressRefused) as caught:
        asyncio.run(guard.check(f"http://[{address}]:5432/"))
    assert caught.value.fields["reason"] == "address_not_allowed"


def test_egress_still_reaches_a_public_ipv4_address_through_nat64() -> None:
    """An IPv6-only deployment reaches public IPv4 hosts through NAT64; only the internal
    ones are refused."""
    guard = OutboundGuard(OutboundPolicy(allowed_hosts=None))
    target = asyncio.run(guard.check("https://[64:ff9b::5db8:d822]/"))  # 93.184.216.34
    assert str(target.address) == "64:ff9b::5db8:d822"


# --- keys: a key cannot outlive the key that made it -------------------------------------


def _expiring_key(
    client: TestClient, operator_key: str, tenant_id: str, within_s: float
) -> tuple[str, str, datetime]:
    ends = datetime.now(UTC) + timedelta(seconds=within_s)
    r = client.post(
        f"/admin/tenants/{tenant_id}/keys",
        json={"name": "contractor", "scopes": ["keys:write", "read"], "expires_at": ends.isoformat()},
        headers=auth(operator_key),
    )
    assert r.status_code == 201, r.text
    return r.json()["key"], r.json()["id"], datetime.fromisoformat(r.json()["expires_at"])


@ON_BOTH
def test_an_expiring_key_cannot_mint_a_key_that_outlives_it(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    t = make_tenant("acme")
    key, _, ends = _expiring_key(client, operator_key, t.id, 3600)
    r = client.post("/v1/keys", json={"name": "forever", "scopes": ["read"]}, headers=auth(key))
    assert r.status_code in (201, 403), r.text
    if r.status_code == 201:
        made = r.json()["expires_at"]
        assert made is not None and datetime.fromisoformat(made) <= ends, r.text
    later = (ends + timedelta(days=365)).isoformat()
    r = client.post(
        "/v1/keys", json={"name": "later", "scopes": ["read"], "expires_at": later}, headers=auth(key)
    )
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "forbidden", r.text


@ON_BOTH
def test_an_expiring_key_cannot_rotate_itself_into_a_key_without_expiry(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    t = make_tenant("acme")
    key, key_id, ends = _expiring_key(client, operator_key, t.id, 3600)
    r = client.post(f"/v1/keys/{key_id}/rotate", json={"overlap_s": 0}, headers=auth(key))
    assert r.status_code in (201, 403), r.text
    if r.status_code == 201:
        made = r.json()["expires_at"]
        assert made is not None and datetime.fromisoformat(made) <= ends, r.text


# --- models: the default model follows the allow-list ------------------------------------


@ON_BOTH
def test_a_narrowed_model_list_does_not_leave_an_outside_default_model_usable(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    t = make_tenant("acme", "pro", {"allowed_models": ["simulated*"], "default_model": "simulated:instant"})
    r = client.patch(
        f"/admin/tenants/{t.id}",
        json={"limits": {"allowed_models": ["simulated:ttft_ms=0,tpot_ms=0"]}},
        headers=auth(operator_key),
    )
    if r.status_code == 422:  # refused: the default it keeps is outside the new list
        return
    assert r.status_code == 200, r.text
    made = client.post("/v1/agents", json={"name": "d"}, headers=t.h)
    assert made.status_code == 403, made.text
    assert made.json()["error"]["code"] == "model_not_allowed", made.text


# --- tenant host names on a real server: raw requests no client library would send -----

BASE = "patinox.test"


@pytest.fixture
def host_server(deployment: Any, backend: Any, kek_url: str, exec_root: Any) -> Iterator[Server]:
    settings = Settings(
        database_url=deployment.db_url,
        owner_url=deployment.owner_url,
        kek_url=kek_url,
        exec_root=exec_root,
        isolation_levels=frozenset(),
        base_domain=BASE,
        base_hosts=("localhost", "127.0.0.1"),
    )
    rt = Runtime.build(settings, backend=backend)
    server = Server(rt)
    yield server
    server.close()
    rt.close()


def _raw(server: Server, head: str) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers, CRLF-separated) as bytes; the status and body."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("utf-8") + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2]


@ON_BOTH
def test_raw_host_header_tricks_never_let_a_key_in_on_another_tenants_host(host_server: Server) -> None:
    acme = host_server.tenant("acme")
    host_server.tenant("globex")
    on_globex = f"globex.{BASE}"
    # The control: the same raw request on acme's own host name is answered.
    status, body = _raw(
        host_server,
        f"GET /v1/agents HTTP/1.1\r\nHost: acme.{BASE}\r\n" + f"Authorization: Bearer {acme.key}\r\n",
    )
    assert status == 200, body
    tricks = [
        # duplicate Host headers: the acme one second, the globex one first, and the reverse
        f"GET /v1/agents HTTP/1.1\r\nHost: {on_globex}\r\nHost: acme.{BASE}\r\n",
        f"GET /v1/agents HTTP/1.1\r\nHost: acme.{BASE}\r\nHost: {on_globex}\r\n",
        # the absolute-form request target names acme, the Host header globex
        f"GET http://acme.{BASE}/v1/agents HTTP/1.1\r\nHost: {on_globex}\r\n",
        # X-Forwarded-Host naming acme (or the base host) on globex's host name
        f"GET /v1/agents HTTP/1.1\r\nHost: {on_globex}\r\nX-Forwarded-Host: acme.{BASE}\r\n",
        f"GET /v1/agents HTTP/1.1\r\nHost: {on_globex}\r\nX-Forwarded-Host: localhost\r\n",
        # case, a final dot, a port, spaces
        f"GET /v1/agents HTTP/1.1\r\nHost: GLOBEX.{BASE.upper()}.:443\r\n",
        f"GET /v1/agents HTTP/1.1\r\nHost:  {on_globex}  \r\n",
        # a Cyrillic look-alike of acme's host name
        f"GET /v1/agents HTTP/1.1\r\nHost: \u0430cme.{BASE}\r\n",
    ]
    for trick in tricks:
        head = trick + f"Authorization: Bearer {acme.key}\r\n"
        status, body = _raw(host_server, head)
        if "Host: acme" in trick and "Host: globex" not in trick.split("Host: acme")[0]:
            continue  # acme's own host first: not an attack
        assert status in (400, 401, 404), (trick, status, body)
        assert not body.startswith(b"["), (trick, body)  # never the agents list
    # /admin on a tenant host: not there, whatever the Host header tricks
    for trick in [
        f"GET /admin/tenants HTTP/1.1\r\nHost: {on_globex}\r\nHost: localhost\r\n",
        f"GET /admin/tenants HTTP/1.1\r\nHost: {on_globex}\r\nX-Forwarded-Host: localhost\r\n",
        f"GET http://localhost/admin/tenants HTTP/1.1\r\nHost: {on_globex}\r\n",
    ]:
        status, body = _raw(host_server, trick + f"Authorization: Bearer {host_server.operator}\r\n")
        assert status in (400, 404), (trick, status, body)


# --- egress: a compressing server ----------------------------------------------------------

PAGE = "the page's own words, in plain text " * 20


class _Gzipping(BaseHTTPRequestHandler):
    """Answers gzip-compressed whenever the request accepts gzip, as most public servers do."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = PAGE.encode()
        gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
        if gzipped:
            body = gzip.compress(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_http_fetch_reads_the_page_not_its_compressed_bytes() -> None:
    """The guard reads the body raw (so a small compressed body cannot expand past the size
    cap); it must then not ask for a compressed one, or the model reads gzip bytes."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gzipping)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        guard = OutboundGuard(
            OutboundPolicy(
                allowed_hosts=None,
                allowed_ranges=OutboundPolicy.ranges(["127.0.0.1"]),
                schemes=frozenset({"http"}),
            )
        )
        got = asyncio.run(guard.request("GET", f"http://127.0.0.1:{server.server_address[1]}/"))
    finally:
        server.shutdown()
        server.server_close()
    assert got.status == 200
    assert got.body.decode("utf-8") == PAGE


# --- secrets: a canary value never echoes back from a bad write ---------------------------

CANARY = "sk-canary-7f3a9c2e1b5d"


@ON_BOTH
def test_a_secret_value_never_echoes_in_the_answer_to_a_malformed_write(
    client: TestClient,
    operator_key: str,
    make_tenant: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = make_tenant("acme")
    r = client.post(
        f"/admin/tenants/{t.id}/keys",
        json={"name": "s", "scopes": ["secrets:write"]},
        headers=auth(operator_key),
    )
    h = auth(r.json()["key"])
    bodies: list[Any] = [
        {"value": CANARY, "extra": CANARY},
        {"value": [CANARY]},
        {"value": {"nested": CANARY}},
        [CANARY],
        {"value": CANARY + "é" * 40_000},  # under 64 Ki characters, over 64 KiB of UTF-8
        {"value": CANARY + "\u0000"},
    ]
    answers = [client.put("/v1/secrets/canary", json=b, headers=h) for b in bodies]
    answers.append(client.put("/v1/secrets/bad name!", json={"value": CANARY}, headers=h))
    answers.append(client.put("/v1/secrets/canary", content=f'{{"value": "{CANARY}"', headers=h))
    answers.append(client.put("/v1/secrets/canary", data={"value": CANARY}, headers=h))
    answers.append(client.put("/v1/secrets/canary", json={"value": CANARY}, headers=t.h))  # no scope
    for r in answers:
        assert 400 <= r.status_code < 500, r.text
        assert CANARY not in r.text, r.text
    assert client.get("/v1/secrets", headers=h).json() == []
    out, err = capfd.readouterr()
    assert CANARY not in out + err + caplog.text
