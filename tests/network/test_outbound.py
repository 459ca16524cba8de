"""The outbound-request guard against real local HTTP and HTTPS servers: what it refuses
(schemes, user-info, hosts off the allow-list, loopback, private, link-local and mapped
addresses, redirects to any of those), that it connects to the address it checked (a
second DNS answer never reaches the connection), and its caps (body, redirects, time)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from patinox.errors import EgressRefused, InvalidRequest, OutboundFailed
from patinox.network import OutboundGuard, OutboundPolicy, host_allowed, normal_host
from patinox.network.outbound import Address

LOCAL = OutboundPolicy.ranges(["127.0.0.0/8"])


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host")))  # type: ignore[attr-defined]
        if self.path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect-to/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.split("?")[0] == "/slow":
            time.sleep(3)
        body = b"x" * 5000 if self.path == "/big" else f"hello {self.headers.get('Host')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.seen.append((self.path, self.rfile.read(length).decode()))  # type: ignore[attr-defined]
        self.send_response(303)
        self.send_header("Location", "/after-post")
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (the timeout test) or refused the certificate


def _serve(context: ssl.SSLContext | None = None) -> Iterator[ThreadingHTTPServer]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.seen = []  # type: ignore[attr-defined]
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_server() -> Iterator[ThreadingHTTPServer]:
    yield from _serve()


def _port(server: ThreadingHTTPServer) -> int:
    return int(server.server_address[1])


def _resolver(answers: dict[str, list[str]], calls: list[str] | None = None):  # type: ignore[no-untyped-def]
    """A resolver answering from ``answers`` (the name under test resolves as the test says);
    each call is appended to ``calls``."""

    async def resolve(host: str, port: int) -> list[Address]:
        if calls is not None:
            calls.append(host)
        if host not in answers:
            raise OSError(f"{host} does not resolve")
        return [ipaddress.ip_address(a) for a in answers[host]]

    return resolve


def _refused(guard: OutboundGuard, url: str) -> EgressRefused:
    with pytest.raises(EgressRefused) as info:
        asyncio.run(guard.check(url))
    return info.value


# --- what is refused --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/",
        "https://[::1]/",
        "https://10.1.2.3/",
        "https://192.168.0.10/",
        "https://172.16.5.4/",
        "https://169.254.169.254/latest/meta-data/",  # cloud metadata
        "https://100.64.0.1/",  # shared address space
        "https://0.0.0.0/",
        "https://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
        "https://[fd00::1]/",
        "https://[fe80::1]/",
        "https://224.0.0.1/",
    ],
)
def test_non_public_addresses_are_refused(url: str) -> None:
    err = _refused(OutboundGuard(OutboundPolicy()), url)
    assert err.reason == "address_not_allowed" and err.code == "egress_refused" and err.http_status == 403


def test_a_name_that_resolves_to_loopback_is_refused_with_the_system_resolver() -> None:
    err = _refused(OutboundGuard(OutboundPolicy()), "https://localhost/")
    assert err.reason == "address_not_allowed"
    assert err.fields["host"] == "localhost"


def test_a_name_with_any_private_address_among_public_ones_is_refused() -> None:
    guard = OutboundGuard(OutboundPolicy(), _resolver({"mixed.example": ["93.184.216.34", "10.0.0.7"]}))
    err = _refused(guard, "https://mixed.example/")
    assert err.fields["address"] == "10.0.0.7"


def test_a_public_name_is_allowed_and_resolved_once() -> None:
    calls: list[str] = []
    guard = OutboundGuard(OutboundPolicy(), _resolver({"api.example.com": ["93.184.216.34"]}, calls))
    target = asyncio.run(guard.check("https://API.Example.com./v1?q=1"))
    assert (target.host, target.port, str(target.address)) == ("api.example.com", 443, "93.184.216.34")
    assert calls == ["api.example.com"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://api.example.com/", "scheme"),
        ("ftp://api.example.com/", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("https://user:secret@api.example.com/", "userinfo"),
        ("https:///nohost", "invalid_url"),
        ("https://nowhere.example/", "unresolvable"),
    ],
)
def test_bad_urls_are_refused_with_their_reason(url: str, reason: str) -> None:
    guard = OutboundGuard(OutboundPolicy(), _resolver({"api.example.com": ["93.184.216.34"]}))
    err = _refused(guard, url)
    assert err.reason == reason, err
    assert "secret" not in err.message and "secret" not in str(err.fields)


def test_the_allow_list_admits_only_its_hosts() -> None:
    answers = {
        "api.example.com": ["93.184.216.34"],
        "a.b.example.org": ["93.184.216.35"],
        "example.org": ["93.184.216.36"],
        "evilexample.org": ["93.184.216.37"],
        "other.com": ["93.184.216.38"],
    }
    guard = OutboundGuard(
        OutboundPolicy(allowed_hosts=("api.example.com", "*.example.org")), _resolver(answers)
    )
    asyncio.run(guard.check("https://api.example.com/"))
    asyncio.run(guard.check("https://a.b.example.org/"))
    for url in ("https://example.org/", "https://evilexample.org/", "https://other.com/"):
        assert _refused(guard, url).reason == "host_not_allowed", url
    # An empty allow-list reaches nothing.
    nothing = OutboundGuard(OutboundPolicy(allowed_hosts=()), _resolver(answers))
    assert _refused(nothing, "https://api.example.com/").reason == "host_not_allowed"


def test_hosts_compare_after_idna_and_case_normalisation() -> None:
    assert normal_host("BÜCHER.example.") == "xn--bcher-kva.example"
    assert host_allowed("xn--bcher-kva.example", ["bücher.EXAMPLE"])
    assert not host_allowed("xn--bcher-kva.example", ["bucher.example"])
    guard = OutboundGuard(
        OutboundPolicy(allowed_hosts=("bücher.example",)),
        _resolver({"xn--bcher-kva.example": ["93.184.216.34"]}),
    )
    assert asyncio.run(guard.check("https://BÜCHER.example/")).host == "xn--bcher-kva.example"


def test_the_operator_allows_and_denies_ranges() -> None:
    allowed = OutboundGuard(OutboundPolicy(allowed_ranges=OutboundPolicy.ranges(["10.20.0.0/16"])))
    assert str(asyncio.run(allowed.check("https://10.20.3.4/")).address) == "10.20.3.4"
    assert _refused(allowed, "https://10.21.0.1/").reason == "address_not_allowed"
    denied = OutboundGuard(
        OutboundPolicy(
            allowed_ranges=OutboundPolicy.ranges(["10.0.0.0/8"]),
            denied_ranges=OutboundPolicy.ranges(["10.9.0.0/16", "93.184.216.34"]),
        )
    )
    assert _refused(denied, "https://10.9.1.1/").reason == "address_not_allowed"
    assert _refused(denied, "https://93.184.216.34/").reason == "address_not_allowed"


def test_bad_policies_are_refused_by_name() -> None:
    with pytest.raises(InvalidRequest):
        OutboundPolicy(schemes=frozenset({"gopher"}))
    with pytest.raises(InvalidRequest):
        OutboundPolicy(allowed_hosts=("*.*.example.com",))
    with pytest.raises(InvalidRequest):
        OutboundPolicy(allowed_hosts=("example.com/path",))
    with pytest.raises(InvalidRequest) as info:
        OutboundPolicy.ranges(["10.0.0.0/8", "not-a-range"])
    assert info.value.fields["range"] == "not-a-range"


# --- real exchanges ---------------------------------------------------------------------


def _local_guard(**policy: object) -> tuple[OutboundGuard, list[str]]:
    calls: list[str] = []
    settings = {"allowed_ranges": LOCAL, "schemes": frozenset({"http", "https"}), **policy}
    return (
        OutboundGuard(
            OutboundPolicy(**settings),  # type: ignore[arg-type]
            _resolver({"receiver.test": ["127.0.0.1"], "elsewhere.test": ["10.0.0.9"]}, calls),
        ),
        calls,
    )


def test_a_request_goes_to_the_checked_address_with_the_name_as_host(
    http_server: ThreadingHTTPServer,
) -> None:
    guard, calls = _local_guard()
    port = _port(http_server)
    got = asyncio.run(guard.request("GET", f"http://receiver.test:{port}/hi"))
    assert got.status == 200
    assert got.body == f"hello receiver.test:{port}".encode()
    assert got.address == "127.0.0.1"
    assert calls == ["receiver.test"]  # one resolution, the connection went to its answer


def test_dns_rebinding_never_reaches_the_connection(http_server: ThreadingHTTPServer) -> None:
    """The name answers an allowed address to the check and a refused one afterwards: the
    request is served by the checked address, and the second answer is never asked for."""
    answers = iter([["127.0.0.1"], ["10.0.0.9"]])
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[Address]:
        calls.append(host)
        return [ipaddress.ip_address(a) for a in next(answers)]

    guard = OutboundGuard(OutboundPolicy(allowed_ranges=LOCAL, schemes=frozenset({"http"})), rebinding)
    got = asyncio.run(guard.request("GET", f"http://rebind.test:{_port(http_server)}/x"))
    assert got.status == 200 and got.address == "127.0.0.1"
    assert calls == ["rebind.test"]


def test_redirects_are_checked_like_the_first_hop(http_server: ThreadingHTTPServer) -> None:
    guard, calls = _local_guard()
    port = _port(http_server)
    # To a refused address: refused, not followed.
    with pytest.raises(EgressRefused) as info:
        asyncio.run(guard.request("GET", f"http://receiver.test:{port}/redirect-to/http://elsewhere.test/"))
    assert info.value.reason == "address_not_allowed"
    with pytest.raises(EgressRefused):
        asyncio.run(guard.request("GET", f"http://receiver.test:{port}/redirect-to/http://169.254.169.254/"))
    # To an allowed one: followed, resolved again.
    calls.clear()
    got = asyncio.run(
        guard.request("GET", f"http://receiver.test:{port}/redirect-to/http://receiver.test:{port}/done")
    )
    assert got.status == 200 and len(got.redirects) == 1
    assert calls == ["receiver.test", "receiver.test"]
    # A POST answered 303 continues as a GET without its body.
    got = asyncio.run(guard.request("POST", f"http://receiver.test:{port}/submit", content=b"payload"))
    assert got.status == 200
    assert ("/submit", "payload") in http_server.seen  # type: ignore[attr-defined]


def test_redirect_loops_body_size_and_time_are_capped(http_server: ThreadingHTTPServer) -> None:
    port = _port(http_server)
    guard, _ = _local_guard(max_redirects=3)
    with pytest.raises(OutboundFailed) as info:
        asyncio.run(guard.request("GET", f"http://receiver.test:{port}/loop"))
    assert info.value.reason == "too_many_redirects"
    small, _ = _local_guard(max_response_bytes=1000)
    with pytest.raises(OutboundFailed) as info:
        asyncio.run(small.request("GET", f"http://receiver.test:{port}/big"))
    assert info.value.reason == "too_large" and info.value.http_status == 502
    hasty, _ = _local_guard(timeout_s=0.5)
    with pytest.raises(OutboundFailed) as info:
        asyncio.run(hasty.request("GET", f"http://receiver.test:{port}/slow?token=query-s3cret"))
    assert info.value.reason == "timeout"
    # The query (often a credential) is left out of the error, as on every other failure.
    assert "query-s3cret" not in f"{info.value.message} {info.value.fields}"


def test_a_closed_port_fails_with_connect() -> None:
    guard, _ = _local_guard()
    with pytest.raises(OutboundFailed) as info:
        asyncio.run(guard.request("GET", "http://receiver.test:9/"))
    assert info.value.reason == "connect"


# --- HTTPS: SNI and certificate checks against the name, not the address ----------------


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
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
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ThreadingHTTPServer, Path]]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    ca = _cert("Test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("receiver.test", key, ca_name, ca_key, ca=False)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    for server in _serve(context):
        yield server, tmp_path / "ca.pem"


def test_https_verifies_the_certificate_against_the_name(
    tls_server: tuple[ThreadingHTTPServer, Path],
) -> None:
    server, ca = tls_server
    port = _port(server)
    guard, _ = _local_guard(ca_bundle=str(ca))
    got = asyncio.run(guard.request("GET", f"https://receiver.test:{port}/secure"))
    assert got.status == 200 and got.body == f"hello receiver.test:{port}".encode()
    # The same server under a name its certificate does not cover fails TLS.
    other = OutboundGuard(
        OutboundPolicy(allowed_ranges=LOCAL, ca_bundle=str(ca)),
        _resolver({"impostor.test": ["127.0.0.1"]}),
    )
    with pytest.raises(OutboundFailed) as info:
        asyncio.run(other.request("GET", f"https://impostor.test:{port}/"))
    assert info.value.reason == "tls"
    # And without the CA bundle, the system's CAs do not trust it.
    untrusted, _ = _local_guard()
    with pytest.raises(OutboundFailed) as info:
        asyncio.run(untrusted.request("GET", f"https://receiver.test:{port}/"))
    assert info.value.reason == "tls"
