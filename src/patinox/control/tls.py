"""Per-tenant TLS certificates: validated on upload, stored as a tenant secret, chosen by
SNI when the server serves TLS (``patinox serve --tls``).

- A tenant's certificate chain and private key are kept together in one tenant secret,
  :data:`TLS_SECRET` (sealed under the tenant's DEK like every secret, so crypto-shredding
  makes them unreadable and export leaves them out unless ``include_secrets``). One secret,
  not two, so a certificate and its key are replaced in one transaction: no handshake ever
  sees a new certificate with the old key. Names starting with :data:`RESERVED_PREFIX` are
  written only here (the generic secret routes refuse them), so an unvalidated pair is
  never stored.
- An upload is refused unless the PEM parses (``invalid_tls``), the private key is the
  leaf certificate's (``tls_key_mismatch``), every host name of the tenant (its slug host
  and custom domains, :class:`~patinox.control.endpoints.TenantEndpoints`) is covered by a
  ``subjectAltName`` DNS name (wildcards as RFC 6125 section 6.4.3: a whole left-most label
  matching one label; ``tls_name_not_covered``), and the certificate is not expired
  (``tls_expired``). All four are 422.
- :class:`SniCertificates` is the ``ssl.SSLContext.sni_callback`` of the server: it maps
  the client's SNI name to its tenant, and serves that tenant's certificate from one cached
  ``SSLContext`` per tenant, rebuilt when the secret's version changes (a replaced
  certificate is served from the next handshake on, no restart). Any other name, or a
  tenant without a certificate, gets the deployment certificate.

Obtaining certificates (ACME) is out of scope: the operator or tenant uploads them.

This module sits in :mod:`patinox.control` because the routes, the CLI and the server all
use it and it needs the tenant endpoints and secrets; it imports only :mod:`ssl` and
``cryptography`` (no HTTP server), so the queue worker may import the control plane.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from patinox.control.endpoints import TenantEndpoints, normal_request_host
from patinox.control.secrets import RESERVED_SECRET_PREFIX
from patinox.errors import InvalidTls, NotFound, PatinoxError, TlsExpired, TlsKeyMismatch, TlsNameNotCovered
from patinox.storage import SqlBackend, TenantStore
from patinox.tenancy import TenantContext

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "RESERVED_PREFIX",
    "TLS_SECRET",
    "SniCertificates",
    "TenantTls",
    "TlsCertificateInfo",
    "check_tls_pair",
    "name_covered",
    "server_context",
]

#: Secret names that start with this are written only by :class:`TenantTls`.
RESERVED_PREFIX: Final = RESERVED_SECRET_PREFIX
#: The secret holding a tenant's certificate chain and private key (JSON of two PEM texts).
TLS_SECRET: Final = "tls:certificate"
#: Under this many days to expiry an upload and ``GET /v1/tls`` carry a warning.
EXPIRY_WARNING_DAYS: Final = 30

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsCertificateInfo:
    """What may be said of a tenant's certificate: never its key.

    Attributes:
        subject: the leaf certificate's subject (RFC 4514 string).
        issuer: its issuer (RFC 4514 string).
        sans: its ``subjectAltName`` DNS names.
        not_before: start of validity (UTC).
        not_after: end of validity (UTC).
        days_left: whole days from now to ``not_after`` (0 on the last day).
        hosts: the tenant's host names now.
        hosts_not_covered: those the certificate does not cover (a domain added after the
            upload); empty when all are.
        warning: a sentence when under :data:`EXPIRY_WARNING_DAYS` days are left or a host
            is not covered, else ``None``.
        version: the secret's version (1 on first upload, one more per replacement).
    """

    subject: str
    issuer: str
    sans: list[str]
    not_before: datetime
    not_after: datetime
    days_left: int
    hosts: list[str]
    hosts_not_covered: list[str]
    warning: str | None
    version: int


def name_covered(host: str, sans: list[str]) -> bool:
    """Whether the host name ``host`` (IDNA A-labels) is covered by one of ``sans`` (DNS
    names of a certificate), as RFC 6125 section 6.4.3 reads wildcards: ``*`` only as the
    whole left-most label, matching exactly one label, with at least two labels after it.
    Case-insensitive; a final dot is ignored."""
    name = host.lower().rstrip(".")
    for san in sans:
        pattern = san.lower().rstrip(".")
        if pattern == name:
            return True
        first, dot, rest = pattern.partition(".")
        if first != "*" or not dot or "*" in rest or rest.count(".") < 1:
            continue
        label, dot2, tail = name.partition(".")
        if dot2 and label and tail == rest:
            return True
    return False


def _leaf_info(leaf: x509.Certificate) -> tuple[str, str, list[str]]:
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [str(n) for n in sans.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        dns = []
    return leaf.subject.rfc4514_string(), leaf.issuer.rfc4514_string(), dns


def _describe(leaf: x509.Certificate, hosts: list[str], version: int, now: datetime) -> TlsCertificateInfo:
    subject, issuer, sans = _leaf_info(leaf)
    not_after = leaf.not_valid_after_utc
    days_left = max(0, (not_after - now).days)
    missing = [h for h in hosts if not name_covered(h, sans)]
    warnings = []
    if days_left < EXPIRY_WARNING_DAYS:
        warnings.append(f"the certificate expires in {days_left} days ({not_after.isoformat()}); replace it")
    if missing:
        warnings.append(f"host names not covered: {', '.join(missing)}")
    return TlsCertificateInfo(
        subject=subject,
        issuer=issuer,
        sans=sans,
        not_before=leaf.not_valid_before_utc,
        not_after=not_after,
        days_left=days_left,
        hosts=hosts,
        hosts_not_covered=missing,
        warning="; ".join(warnings) or None,
        version=version,
    )


def _parse(cert_pem: str, key_pem: str) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    """The chain (leaf first) and the key. Raises InvalidRequest (``invalid_tls``)."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem.encode("utf-8"))
    except ValueError:
        raise InvalidTls("the certificate is not a PEM certificate chain", field="certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem.encode("utf-8"), password=None)
    except (ValueError, TypeError):
        # Never quote the key text, nor the library's message (it may echo input).
        raise InvalidTls(
            "the private key is not an unencrypted PEM private key", field="private_key"
        ) from None
    return chain, key


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_tls_pair(
    cert_pem: str, key_pem: str, hosts: list[str], *, now: datetime | None = None
) -> TlsCertificateInfo:
    """Validate a certificate chain and its private key for a tenant with host names
    ``hosts``.

    Args:
        cert_pem: PEM certificates, the tenant's (leaf) certificate first, then its
            intermediates.
        key_pem: the leaf's private key, unencrypted PEM (PKCS#8 or traditional).
        hosts: the tenant's host names (IDNA A-labels); each must be covered.
        now: the time to check validity at (default: now, UTC).

    Returns:
        The certificate's description (version 0: not stored yet).

    Raises:
        InvalidTls: ``invalid_tls`` (not PEM, no host names, not yet valid, or the
            TLS library refuses the pair), ``tls_key_mismatch``, ``tls_name_not_covered``
            (field ``hosts`` lists the names), ``tls_expired``; all 422.
    """
    now = now or datetime.now(UTC)
    chain, key = _parse(cert_pem, key_pem)
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise TlsKeyMismatch("the private key does not belong to the (first) certificate")
    if not hosts:
        raise InvalidTls(
            "the tenant has no host names (tenant endpoints off: set PATINOX_BASE_DOMAIN, or give it a slug)"
        )
    info = _describe(leaf, hosts, 0, now)
    if info.hosts_not_covered:
        raise TlsNameNotCovered(
            "the certificate's subjectAltName does not cover: " + ", ".join(info.hosts_not_covered),
            hosts=info.hosts_not_covered,
            sans=info.sans,
        )
    if leaf.not_valid_after_utc <= now:
        raise TlsExpired(
            f"the certificate expired at {leaf.not_valid_after_utc.isoformat()}",
            not_after=leaf.not_valid_after_utc.isoformat(),
        )
    if leaf.not_valid_before_utc > now:
        raise InvalidTls(f"the certificate is not valid before {leaf.not_valid_before_utc.isoformat()}")
    try:
        server_context(cert_pem, key_pem)
    except ssl.SSLError:
        raise InvalidTls("the TLS library refuses this certificate and key") from None
    return info


@contextlib.contextmanager
def _pem_file(text: str) -> Iterator[str]:
    """A path holding ``text`` that no other process can read: an anonymous memory file on
    Linux (never on disk), else a 0600 temporary file removed on exit."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("patinox-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode("utf-8"))
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="patinox-tls-") as tmp:  # pragma: no cover - not Linux
        path = Path(tmp) / "pem"
        path.touch(mode=0o600)
        path.write_text(text)
        yield str(path)


def server_context(cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """A server ``SSLContext`` (TLS 1.2 or later) presenting ``cert_pem`` (chain) with
    ``key_pem``; the key never touches a disk on Linux.

    Raises:
        ssl.SSLError: the TLS library refuses the pair.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with _pem_file(cert_pem) as cert_path, _pem_file(key_pem) as key_path:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class TenantTls:
    """Set, describe and remove a tenant's TLS certificate (see the module docstring).

    Args:
        backend: the deployment's control-plane store.
        endpoints: the tenant endpoints (``None``: off; uploads are then refused).
    """

    def __init__(self, backend: SqlBackend, endpoints: TenantEndpoints | None) -> None:
        self._backend = backend
        self._endpoints = endpoints

    def _store(self, tenant: TenantContext | str) -> TenantStore:
        if isinstance(tenant, TenantContext):
            return self._backend.tenant_store(tenant)
        return self._backend.acting_on(tenant)

    def _hosts(self, tenant_id: str) -> list[str]:
        return [] if self._endpoints is None else self._endpoints.get(tenant_id).hosts

    def put(
        self, tenant: TenantContext | str, cert_pem: str, key_pem: str, *, actor: str
    ) -> TlsCertificateInfo:
        """Validate (:func:`check_tls_pair`) and store the tenant's certificate and key,
        replacing any before (one secret write, audited ``secret.set`` / ``secret.rotate``).

        Returns:
            The stored certificate's description (never the key).

        Raises:
            InvalidTls: the pair is refused (codes in :func:`check_tls_pair`); nothing
                was stored.
            TenantNotFound: no such tenant.
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
        store = self._store(tenant)
        tenant_id = store.tenant_id
        info = check_tls_pair(cert_pem, key_pem, self._hosts(tenant_id))
        value = json.dumps({"certificate": cert_pem, "private_key": key_pem})
        secret, _ = store.secrets().put(TLS_SECRET, value, actor=actor)
        return dataclasses.replace(info, version=secret.version)

    def get(self, tenant: TenantContext | str, *, actor: str) -> TlsCertificateInfo:
        """The tenant's certificate, described against its host names now (the secret
        read is audited ``secret.use``, purpose ``tls:describe``).

        Raises:
            NotFound: the tenant has no certificate.
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
        store = self._store(tenant)
        version = _version(store)
        if version is None:
            raise NotFound("the tenant has no TLS certificate")
        cert_pem, _ = _load(store, actor=actor, purpose="tls:describe")
        chain = x509.load_pem_x509_certificates(cert_pem.encode("utf-8"))
        return _describe(chain[0], self._hosts(store.tenant_id), version, datetime.now(UTC))

    def delete(self, tenant: TenantContext | str, *, actor: str) -> None:
        """Remove the tenant's certificate (its names then get the deployment's).

        Raises:
            NotFound: the tenant has none.
        """
        self._store(tenant).secrets().delete(TLS_SECRET, actor=actor)


def _version(store: TenantStore) -> int | None:
    """The TLS secret's version, or ``None`` (one read of names and versions; no audit)."""
    return next((s.version for s in store.secrets().list() if s.name == TLS_SECRET), None)


def _load(store: TenantStore, *, actor: str, purpose: str) -> tuple[str, str]:
    raw = json.loads(store.secrets().value(TLS_SECRET, actor=actor, purpose=purpose))
    return str(raw["certificate"]), str(raw["private_key"])


class SniCertificates:
    """The ``sni_callback`` of the server's ``SSLContext``: each tenant host name is
    served with its tenant's certificate, any other name with the default context's.

    One ``SSLContext`` per tenant is cached with the secret version it was built from;
    each handshake on a tenant name costs the host-name lookup and one read of the
    tenant's secret names and versions, and a rebuild (an audited secret read, purpose
    ``tls:serve``) only when the version changed. A failure to find or open a tenant's
    certificate (deleted, crypto-shredded, database down) serves the deployment
    certificate and logs a warning: a handshake never fails for it.

    Args:
        backend: the control-plane store.
        endpoints: the tenant endpoints (``None``: every name gets the default).
    """

    def __init__(self, backend: SqlBackend, endpoints: TenantEndpoints | None) -> None:
        self._backend = backend
        self._endpoints = endpoints
        self._cache: dict[str, tuple[int, ssl.SSLContext]] = {}
        self._lock = threading.Lock()

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context to serve ``server_name`` with, ``None`` for the default."""
        if self._endpoints is None or not server_name:
            return None
        name = normal_request_host(server_name)
        if name is None:
            return None
        try:
            tenant_id = self._endpoints.locate(name).tenant_id
            if tenant_id is None:
                return None
            store = self._backend.acting_on(tenant_id)
            version = _version(store)
            if version is None:
                return None
            with self._lock:
                cached = self._cache.get(tenant_id)
            if cached is not None and cached[0] == version:
                return cached[1]
            ctx = server_context(*_load(store, actor="tls", purpose="tls:serve"))
            with self._lock:
                self._cache[tenant_id] = (version, ctx)
            return ctx
        except (PatinoxError, ssl.SSLError, ValueError, KeyError) as err:
            _log.warning("tls: serving the deployment certificate for %r: %s", name, type(err).__name__)
            return None

    def __call__(self, ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        """The ``sni_callback``: switch ``ssl_object`` to the tenant's context."""
        ctx = self.context_for(server_name)
        if ctx is not None:
            ssl_object.context = ctx
