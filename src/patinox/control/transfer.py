"""Export, import and online move of a tenant's data.

Three operations, all driven by an operator (never by a tenant key):

* :func:`export_tenant` writes one encrypted **bundle** file holding everything the tenant
  owns, decrypted from its own keys and sealed as a whole with a key of the operator's
  choosing (a passphrase, or an X25519 recipient public key).
* :func:`import_tenant` checks a bundle end to end, then recreates its tenant under a new
  tenant id, with new data keys, in any storage model this deployment offers. A failed
  import deletes the half-made tenant (crypto-shredded, rows purged), so it leaves nothing
  behind but a tombstone row (ids are never reused) and the operator audit record of the
  deletion.
* :func:`move_tenant` moves a tenant between storage models of the same deployment
  (``pool`` <-> ``silo`` on SQLite; ``pool`` <-> ``bridge`` <-> ``silo`` on PostgreSQL) while
  it keeps serving reads. Moving between *deployments* (e.g. SQLite -> PostgreSQL) is an
  export followed by an import on the other deployment.

What a bundle carries and what it does not
-------------------------------------------
Carried: the tenant record (name, plan, limit overrides, isolation level, storage model,
state), its agents, runs (inputs and outputs in plaintext inside the sealed body), memory
(values in plaintext), usage records and audit records.

Not carried, by decision:

* **API key secrets and hashes.** An imported tenant gets no working keys; the importing
  operator issues new ones (``patinox keys create``). Keys are credentials of one
  deployment: carrying their hashes would let whoever held a key on the source keep
  access to the copy without the importing operator knowing. The bundle lists the source
  keys' ids, names, scopes and dates (``api_key`` records, never the hash or prefix) so the
  same set can be reissued; :func:`import_tenant` does not recreate them.
* **Data keys (DEKs).** Payloads travel decrypted inside the sealed body and are sealed
  again with the new tenant's own DEK (created on its first write) and the new AAD.
* **Audit sequence numbers.** Imported (and moved) audit records get new sequence numbers
  in their new placement, in the same order; their ids are new on import (audit ids are
  unique across the deployment) and kept on a move.
* **State.** An imported tenant starts ``active``, whatever its state at export. Runs
  that were ``queued`` or ``running`` at export are imported as ``failed`` (reason
  ``imported_unfinished``): nothing would ever resume them.

A bundle is not destroyed by crypto-shredding the source tenant: it is sealed with its
own passphrase or recipient key, so it is the documented exception to "after deletion
nothing of the tenant decrypts". Treat it like a backup.

Bundle format (version 1; integers big-endian)
-----------------------------------------------
::

    offset   size   field
    0        14     magic b"PATINOX-EXPORT"
    14       1      format version, 0x01
    15       4      H: header length in bytes (uint32, at most 65,536)
    19       H      header: UTF-8 JSON object (below)
    19+H     ...    body segments: AES-256-GCM ciphertext + 16-byte tag of each piece of
                    the compressed body; every piece is ``segment_bytes`` long except the
                    last (1 .. ``segment_bytes`` bytes)

Header (all binary values standard base64)::

    {"cipher": "AES-256-GCM", "compression": "zlib", "segment_bytes": 1048576,
     "nonce_prefix": <7 bytes>, "exported_at": "<ISO 8601 UTC>",
     "tenant": {"id": "<source tenant id>", "name": "<source tenant name>"},
     "protection": one of
        {"kind": "passphrase", "kdf": "scrypt", "salt": <16 bytes>, "n": 131072, "r": 8, "p": 1}
        {"kind": "x25519", "kdf": "hkdf-sha256", "ephemeral_public_key": <32 bytes>,
         "recipient_fingerprint": "<hex SHA-256 of the recipient's raw 32-byte public key>"}}

Bundle key (32 bytes, AES-256):

* passphrase: ``Scrypt(salt, n, r, p, length=32)`` of the UTF-8 passphrase (``cryptography``;
  defaults n = 2**17, r = 8, p = 1: 128 MiB and about 0.4 s per derivation, the OWASP
  recommendation; an importer accepts 2**14 <= n <= 2**20 and at most 1 GiB of memory).
* recipient key: an ephemeral X25519 key pair per bundle;
  ``HKDF-SHA256(ECDH(ephemeral, recipient), salt = ephemeral public || recipient public,
  info = b"patinox-export/1 x25519", length=32)``.

Segment ``i`` (from 0) is sealed with nonce ``nonce_prefix (7) || i (uint32) || last (1 byte:
1 for the final segment, else 0)`` and AAD = the 19 + H bytes before the body (magic,
version, header length, header). The header therefore authenticates too: the tenant id,
name and export time, KDF parameters and segment size cannot be changed without the
first segment failing. Dropping, reordering or truncating segments also fails (the
counter and the final flag are in the nonce). This is the STREAM construction of
Hoang, Reyhanitabar, Rogaway and Vizár (2015), as used by Tink and age.

The concatenated segment plaintexts are one zlib stream; decompressed, the body is UTF-8
JSON lines::

    {"type": "manifest", "format": 1, "tenant": {...}, "exported_at": ..., "source": {...}}
    {"type": "agent", "row": {...}}          one per agent, then
    {"type": "run", "row": {...}}            runs (input/output in plaintext),
    {"type": "attempt", "row": {...}}        each execution of a queued run (run_attempts),
    {"type": "memory", "row": {...}}         memory entries (value in plaintext),
    {"type": "usage", "row": {...}}          usage records,
    {"type": "audit", "row": {...}}          the tenant's audit records (oldest first),
    {"type": "api_key", "row": {...}}        key metadata (informational, not restored)
    {"type": "end", "records": N, "counts": {type: n}, "sha256": "<hex>"}

``sha256`` is the SHA-256 of every body byte before the ``end`` line; ``records`` and
``counts`` count the lines between the manifest and the end line. Datetimes are ISO 8601
strings with a UTC offset. ``attempt`` records came later than format 1 itself: a bundle
without them imports as before (its runs have no attempts), and a build older than them
refuses a bundle with them (``malformed_body``, unknown record type).

Errors
------
A bundle that cannot be used raises :class:`BundleRejected`, a subclass of
:class:`~patinox.errors.InvalidRequest` (HTTP 422 ``bundle_rejected``): the input is
wrong and retrying the same call fails the same way. Its ``reason`` field says why:
``not_a_bundle``, ``unsupported_version``, ``malformed_header``, ``wrong_key_kind``
(passphrase given for a recipient-key bundle or the reverse), ``wrong_recipient`` (the
private key does not match the bundle's recipient), ``authentication_failed`` (wrong
passphrase *or* changed bytes: AES-GCM cannot tell them apart, by design),
``integrity_check_failed`` (the body's SHA-256 or counts do not match) and
``malformed_body``. A move that cannot complete raises :class:`TenantMoveFailed` (an
:class:`~patinox.errors.OperationFailed`, 503 ``move_failed``). Both belong in
:mod:`patinox.errors`; they are defined here until that module takes them.

Tables: a transfer carries the known tenant data tables (agents, runs, run_attempts,
memory, usage_records, audit_log) and leaves the control-plane tables of the shared database
where they are (:data:`CONTROL_PLANE_TABLES`). It also reads the placement's catalog for
every other table with a ``tenant_id`` column: if one holds rows of the tenant, export
and move refuse (:class:`~patinox.errors.OperationFailed`, ``reason="unknown_table"``)
rather than leave those rows behind or move a control-plane table out of the shared
database. A new table is therefore taught to this module, not silently skipped.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import ValidationError
from sqlalchemy import MetaData, Table, delete, func, insert, select, update

from patinox.control.tenants import Tenant, TenantManager, TenantSpec
from patinox.errors import (
    InvalidRequest,
    InvalidTransition,
    OperationFailed,
    PatinoxError,
)
from patinox.storage import SqlBackend, TenantStore, translate_errors, utcnow
from patinox.storage import _schema as s
from patinox.tenancy import IsolationLevel, LimitOverrides, StorageModel, TenantState, new_id

__all__ = [
    "BundleRejected",
    "ExportSummary",
    "MoveSummary",
    "TenantMoveFailed",
    "abort_move",
    "export_tenant",
    "generate_recipient_keypair",
    "import_tenant",
    "move_tenant",
]

#: Called as ``progress(done, total)``; the unit is given by each operation.
Progress = Callable[[int, int], None]
Row = dict[str, Any]

MAGIC = b"PATINOX-EXPORT"
FORMAT_VERSION = 1
_PREFIX = struct.Struct(">14sBI")  # magic, format version, header length
_MAX_HEADER_BYTES = 64 * 1024
_TAG_BYTES = 16
_NONCE_PREFIX_BYTES = 7
_SEGMENT_NONCE = struct.Struct(">IB")  # segment counter, final flag
#: Plaintext bytes per sealed segment of a new bundle (1 MiB).
SEGMENT_BYTES = 1024 * 1024
_SEGMENT_RANGE = (1024, 16 * 1024 * 1024)
#: Scrypt cost of new bundles (n, r, p): 128 MiB of memory, ~0.4 s on one core.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MIN_N = 2**14
_SCRYPT_MAX_N = 2**20
_SCRYPT_MAX_MEMORY = 1024 * 1024 * 1024  # bytes, 128 * n * r
_SALT_BYTES = 16
_HKDF_INFO = b"patinox-export/1 x25519"
_MIN_PASSPHRASE = 8  # characters
_DECOMPRESS_CHUNK = 16 * 1024 * 1024  # bytes of decompressed output per step
_BATCH = 500  # rows per statement / transaction

#: Tables of the shared database that hold per-tenant rows but belong to the control
#: plane: they stay in the shared database whatever the tenant's storage model, so a move
#: never copies them and an export never reads them as data.
CONTROL_PLANE_TABLES = frozenset({"api_keys", "tenant_keys", "run_queue", "queue_tenants", "quota_ledger"})

#: Bundle record type -> table, in the order they are written (parents before children).
_KIND_TABLES: dict[str, Table] = {
    "agent": s.agents,
    "run": s.runs,
    "attempt": s.run_attempts,
    "memory": s.memory,
    "usage": s.usage_records,
    "audit": s.audit_log,
}
#: Columns the keyset pagination walks, per table (audit in sequence order).
_WALK_KEY = {
    "agents": "id",
    "runs": "id",
    "run_attempts": "id",
    "memory": "key",
    "usage_records": "id",
    "audit_log": "seq",
}
#: Payload columns sealed with the tenant's DEK: table -> {column: AAD table name}.
_SEALED = {"runs": {"input": "runs.input", "output": "runs.output"}, "memory": {"value": "memory.value"}}
_UNFINISHED = ("queued", "running")


# -- errors ------------------------------------------------------------------------------


class BundleRejected(InvalidRequest):
    """An export bundle that cannot be imported. Nothing was written.

    Fields: ``reason`` (see the module docstring) and, when known, ``path``.
    """

    code = "bundle_rejected"
    http_status = 422


class TenantMoveFailed(OperationFailed):
    """A storage move stopped before its switch; the tenant stays where it was.

    Fields: ``tenant_id``, ``reason`` (``runs_in_flight``, ``verification_failed``,
    ``state_changed``) and details.
    """

    code = "move_failed"
    http_status = 503


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ExportSummary:
    """What :func:`export_tenant` wrote.

    Attributes:
        path: the bundle file (mode 0600).
        tenant_id: the exported tenant's id.
        tenant_name: its name at export.
        exported_at: when the export started, UTC.
        counts: records per bundle record type (``agent``, ``run``, ``attempt``, ``memory``,
            ``usage``, ``audit``, ``api_key``).
        records: all records in the body (the sum of ``counts``).
        size_bytes: size of the bundle file, bytes.
        body_sha256: hex SHA-256 of the body (also inside the sealed body).
        protection: ``"passphrase"`` or ``"x25519"``.
    """

    path: Path
    tenant_id: str
    tenant_name: str
    exported_at: datetime
    counts: dict[str, int]
    records: int
    size_bytes: int
    body_sha256: str
    protection: str


@dataclass(frozen=True, kw_only=True)
class MoveSummary:
    """What :func:`move_tenant` did.

    Attributes:
        tenant_id: the moved tenant.
        from_model: its storage model before.
        to_model: its storage model now.
        rows: rows copied per table.
        verified_samples: payloads decrypted from the new placement after the copy.
        shredded: storage models whose copy of the tenant was removed afterwards.
        resumed: True when this call finished an interrupted move (before or after its switch).
        duration_s: wall time of the call, seconds.
    """

    tenant_id: str
    from_model: StorageModel
    to_model: StorageModel
    rows: dict[str, int] = field(default_factory=dict)
    verified_samples: int = 0
    shredded: tuple[StorageModel, ...] = ()
    resumed: bool = False
    duration_s: float = 0.0


# -- keys ------------------------------------------------------------------------------


def generate_recipient_keypair() -> tuple[bytes, bytes]:
    """A new X25519 key pair for recipient-key bundles.

    Returns:
        ``(private_key_pem, public_key_pem)``: PKCS#8 (unencrypted) and SubjectPublicKeyInfo
        PEM. Give the public key to whoever exports; keep the private key to import.
    """
    key = X25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def _public_key(data: bytes) -> X25519PublicKey:
    try:
        if len(data) == 32:
            return X25519PublicKey.from_public_bytes(data)
        key = (
            serialization.load_pem_public_key(data)
            if data.lstrip().startswith(b"-----")
            else serialization.load_der_public_key(data)
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise InvalidRequest(
            "recipient_public_key is not an X25519 public key", field="recipient_public_key"
        ) from err
    if not isinstance(key, X25519PublicKey):
        raise InvalidRequest("recipient_public_key is not an X25519 public key", field="recipient_public_key")
    return key


def _private_key(data: bytes) -> X25519PrivateKey:
    try:
        if len(data) == 32:
            return X25519PrivateKey.from_private_bytes(data)
        key = (
            serialization.load_pem_private_key(data, password=None)
            if data.lstrip().startswith(b"-----")
            else serialization.load_der_private_key(data, password=None)
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise InvalidRequest(
            "recipient_private_key is not an unencrypted X25519 private key", field="recipient_private_key"
        ) from err
    if not isinstance(key, X25519PrivateKey):
        raise InvalidRequest(
            "recipient_private_key is not an X25519 private key", field="recipient_private_key"
        )
    return key


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _hkdf(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_HKDF_INFO).derive(
        shared
    )


def _one_secret(first: object, second: object, names: tuple[str, str]) -> None:
    if (first is None) == (second is None):
        raise InvalidRequest(f"give exactly one of {names[0]} and {names[1]}", field=names[0])


def _seal_for_export(
    passphrase: str | None, recipient_public_key: bytes | None
) -> tuple[dict[str, Any], bytes]:
    """The header ``protection`` object and the bundle key for a new bundle."""
    _one_secret(passphrase, recipient_public_key, ("passphrase", "recipient_public_key"))
    if passphrase is not None:
        if len(passphrase) < _MIN_PASSPHRASE:
            raise InvalidRequest(
                f"the passphrase must be at least {_MIN_PASSPHRASE} characters", field="passphrase"
            )
        salt = os.urandom(_SALT_BYTES)
        key = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase.encode())
        params = {"kind": "passphrase", "kdf": "scrypt", "salt": _b64(salt), "n": SCRYPT_N}
        return {**params, "r": SCRYPT_R, "p": SCRYPT_P}, key
    assert recipient_public_key is not None
    recipient = _raw(_public_key(recipient_public_key))
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = _raw(ephemeral.public_key())
    key = _hkdf(ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient)), ephemeral_public, recipient)
    return {
        "kind": "x25519",
        "kdf": "hkdf-sha256",
        "ephemeral_public_key": _b64(ephemeral_public),
        "recipient_fingerprint": hashlib.sha256(recipient).hexdigest(),
    }, key


def _key_for_import(
    protection: Mapping[str, Any], passphrase: str | None, recipient_private_key: bytes | None
) -> bytes:
    """The bundle key from the header's ``protection`` and the caller's secret.

    Raises:
        BundleRejected: unknown protection, unacceptable KDF parameters, the wrong kind of
            secret, or a private key of another recipient.
    """
    kind = protection.get("kind")
    if kind == "passphrase":
        if passphrase is None:
            raise BundleRejected(
                "this bundle is sealed with a passphrase; give the passphrase", reason="wrong_key_kind"
            )
        n, r, p = protection.get("n"), protection.get("r"), protection.get("p")
        if not (
            protection.get("kdf") == "scrypt"
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p))
        ):
            raise BundleRejected(
                "the bundle header names an unknown key derivation", reason="malformed_header"
            )
        assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
        if not (
            _SCRYPT_MIN_N <= n <= _SCRYPT_MAX_N
            and n & (n - 1) == 0
            and 1 <= r <= 32
            and 1 <= p <= 16
            and 128 * n * r <= _SCRYPT_MAX_MEMORY
        ):
            raise BundleRejected(
                "the bundle's scrypt parameters are out of the accepted range", reason="malformed_header"
            )
        salt = _unb64(protection.get("salt"), _SALT_BYTES)
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())
    if kind == "x25519":
        if recipient_private_key is None:
            raise BundleRejected(
                "this bundle is sealed for a recipient key; give the recipient's private key",
                reason="wrong_key_kind",
            )
        private = _private_key(recipient_private_key)
        recipient = _raw(private.public_key())
        if hashlib.sha256(recipient).hexdigest() != protection.get("recipient_fingerprint"):
            raise BundleRejected("this bundle was sealed for another recipient key", reason="wrong_recipient")
        ephemeral = _unb64(protection.get("ephemeral_public_key"), 32)
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        except ValueError as err:
            raise BundleRejected("the bundle's ephemeral key is invalid", reason="malformed_header") from err
        return _hkdf(shared, ephemeral, recipient)
    raise BundleRejected("the bundle header names an unknown protection", reason="malformed_header")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, length: int) -> bytes:
    try:
        data = base64.b64decode(str(value), validate=True) if isinstance(value, str) else b""
    except ValueError:
        data = b""
    if len(data) != length:
        raise BundleRejected("the bundle header has a malformed binary field", reason="malformed_header")
    return data


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + _SEGMENT_NONCE.pack(index, 1 if last else 0)


# -- JSON of rows ----------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return _b64(value)
    raise TypeError(f"cannot put a {type(value).__name__} in a bundle")


def _line(obj: Mapping[str, Any]) -> bytes:
    text = json.dumps(obj, default=_json_default, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return text.encode("utf-8") + b"\n"


def _is_datetime(table: Table, column: str) -> bool:
    return isinstance(table.c[column].type, s.UTCDateTime)


# -- bundle writer ---------------------------------------------------------------------


class _BundleWriter:
    """Streams JSON lines -> zlib -> sealed segments into an open file."""

    def __init__(self, out: IO[bytes], *, key: bytes, nonce_prefix: bytes, aad: bytes, segment: int) -> None:
        self._out = out
        self._aead = AESGCM(key)
        self._prefix = nonce_prefix
        self._aad = aad
        self._segment = segment
        self._zip = zlib.compressobj(6)
        self._buf = bytearray()
        self._index = 0
        self.sha256 = hashlib.sha256()
        self.counts: dict[str, int] = {}

    def record(self, obj: Mapping[str, Any]) -> None:
        line = _line(obj)
        self.sha256.update(line)
        kind = str(obj["type"])
        if kind != "manifest":
            self.counts[kind] = self.counts.get(kind, 0) + 1
        self._feed(self._zip.compress(line))

    def _feed(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) > self._segment:
            self._emit(bytes(self._buf[: self._segment]), last=False)
            del self._buf[: self._segment]

    def _emit(self, plain: bytes, *, last: bool) -> None:
        self._out.write(self._aead.encrypt(_nonce(self._prefix, self._index, last), plain, self._aad))
        self._index += 1

    def close(self) -> str:
        """Write the end record and the final segment; returns the body's hex SHA-256."""
        digest = self.sha256.hexdigest()
        end = {"type": "end", "records": sum(self.counts.values()), "counts": self.counts, "sha256": digest}
        self._feed(self._zip.compress(_line(end)) + self._zip.flush())
        self._emit(bytes(self._buf), last=True)
        self._buf.clear()
        return digest


# -- bundle reader ---------------------------------------------------------------------


@dataclass
class _Body:
    manifest: dict[str, Any]
    counts: dict[str, int]
    records: int
    sha256: str


class _BundleReader:
    """Parses a bundle's header, derives its key, and streams its authenticated records.

    Raises:
        BundleRejected: see the module docstring.
    """

    def __init__(self, path: Path, *, passphrase: str | None, recipient_private_key: bytes | None) -> None:
        self.path = path
        try:
            self.size = path.stat().st_size
            with path.open("rb") as f:
                raw = f.read(_PREFIX.size)
                if len(raw) < _PREFIX.size or raw[: len(MAGIC)] != MAGIC:
                    raise BundleRejected("not a Patinox export bundle", reason="not_a_bundle", path=str(path))
                _, version, header_len = _PREFIX.unpack(raw)
                if version != FORMAT_VERSION:
                    raise BundleRejected(
                        f"bundle format version {version} is not supported "
                        f"(this build reads {FORMAT_VERSION})",
                        reason="unsupported_version",
                        path=str(path),
                    )
                if header_len > _MAX_HEADER_BYTES:
                    raise BundleRejected("the bundle header is too large", reason="malformed_header")
                header_bytes = f.read(header_len)
        except OSError as err:
            raise InvalidRequest(f"cannot read {path}: {err.strerror}", field="path") from err
        if len(header_bytes) != header_len:
            raise BundleRejected("the bundle ends inside its header", reason="malformed_header")
        self.aad = raw + header_bytes
        self.body_offset = len(self.aad)
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BundleRejected("the bundle header is not JSON", reason="malformed_header") from err
        if not isinstance(header, dict):
            raise BundleRejected("the bundle header is not a JSON object", reason="malformed_header")
        self.header: dict[str, Any] = header
        segment = header.get("segment_bytes")
        if (
            header.get("cipher") != "AES-256-GCM"
            or header.get("compression") != "zlib"
            or not isinstance(segment, int)
            or not _SEGMENT_RANGE[0] <= segment <= _SEGMENT_RANGE[1]
            or not isinstance(header.get("tenant"), dict)
            or not isinstance(header.get("protection"), dict)
        ):
            raise BundleRejected(
                "the bundle header is incomplete or names an unknown cipher", reason="malformed_header"
            )
        self.segment = segment
        self.nonce_prefix = _unb64(header.get("nonce_prefix"), _NONCE_PREFIX_BYTES)
        self._aead = AESGCM(_key_for_import(header["protection"], passphrase, recipient_private_key))

    def _plaintext(self, progress: Callable[[int], None] | None) -> Iterator[bytes]:
        """Authenticated segment plaintexts in order; ``progress(bytes)`` after each."""
        size = self.segment + _TAG_BYTES
        with self.path.open("rb") as f:
            f.seek(self.body_offset)
            current = f.read(size)
            index = 0
            done = self.body_offset
            while True:
                following = f.read(size)
                last = not following
                try:
                    plain = self._aead.decrypt(_nonce(self.nonce_prefix, index, last), current, self.aad)
                except InvalidTag as err:
                    raise BundleRejected(
                        "the bundle failed authentication: wrong passphrase or key, or it was changed",
                        reason="authentication_failed",
                        path=str(self.path),
                    ) from err
                done += len(current)
                yield plain
                if progress is not None:
                    progress(done)
                if last:
                    return
                current, index = following, index + 1

    def _lines(self, progress: Callable[[int], None] | None) -> Iterator[bytes]:
        unzip = zlib.decompressobj()
        pending = bytearray()
        try:
            for plain in self._plaintext(progress):
                data = plain
                while data:
                    pending += unzip.decompress(data, _DECOMPRESS_CHUNK)
                    data = unzip.unconsumed_tail
                    *lines, rest = pending.split(b"\n")
                    for line in lines:
                        yield bytes(line) + b"\n"
                    pending = bytearray(rest)
        except zlib.error as err:
            raise BundleRejected(
                "the bundle body is not a valid zlib stream", reason="malformed_body"
            ) from err
        if pending or not unzip.eof or unzip.unused_data:
            raise BundleRejected("the bundle body does not end cleanly", reason="malformed_body")

    def records(self, progress: Callable[[int], None] | None = None) -> Iterator[dict[str, Any]]:
        """Every body record (manifest first, the end record last), each authenticated.

        The SHA-256 and the counts of the end record are checked when it is reached, so a
        consumer has seen a verified bundle only once this iterator is exhausted.
        """
        digest = hashlib.sha256()
        counts: dict[str, int] = {}
        end: dict[str, Any] | None = None
        for line in self._lines(progress):
            if end is not None:
                raise BundleRejected("records follow the end record", reason="malformed_body")
            try:
                obj = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise BundleRejected("a bundle record is not JSON", reason="malformed_body") from err
            if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
                raise BundleRejected("a bundle record has no type", reason="malformed_body")
            if obj["type"] == "end":
                end = obj
                continue
            digest.update(line)
            if obj["type"] != "manifest":
                counts[obj["type"]] = counts.get(obj["type"], 0) + 1
            yield obj
        if end is None:
            raise BundleRejected("the bundle has no end record", reason="malformed_body")
        if end.get("sha256") != digest.hexdigest() or end.get("counts") != counts:
            raise BundleRejected(
                "the bundle's SHA-256 or record counts do not match its content",
                reason="integrity_check_failed",
            )
        yield end

    def verify(self, progress: Callable[[int], None] | None = None) -> _Body:
        """Read the whole bundle once, checking every segment, record and the SHA-256.

        Raises:
            BundleRejected: anything wrong, including records this build cannot import.
        """
        manifest: dict[str, Any] | None = None
        end: dict[str, Any] = {}
        for i, obj in enumerate(self.records(progress)):
            kind = obj["type"]
            if i == 0:
                if kind != "manifest":
                    raise BundleRejected(
                        "the bundle body does not start with its manifest", reason="malformed_body"
                    )
                manifest = _check_manifest(obj, self.header)
            elif kind == "end":
                end = obj
            else:
                _check_record(obj)
        assert manifest is not None
        return _Body(
            manifest=manifest, counts=dict(end["counts"]), records=int(end["records"]), sha256=end["sha256"]
        )


def _check_manifest(obj: dict[str, Any], header: Mapping[str, Any]) -> dict[str, Any]:
    tenant = obj.get("tenant")
    if obj.get("format") != FORMAT_VERSION or not isinstance(tenant, dict):
        raise BundleRejected("the bundle manifest is malformed", reason="malformed_body")
    if {"id": tenant.get("id"), "name": tenant.get("name")} != header["tenant"]:
        raise BundleRejected("the manifest does not match the bundle header", reason="integrity_check_failed")
    for name in ("name", "plan", "isolation_level", "storage_model"):
        if not isinstance(tenant.get(name), str):
            raise BundleRejected(f"the bundle manifest lacks the tenant's {name}", reason="malformed_body")
    if not isinstance(tenant.get("limit_overrides", {}), dict):
        raise BundleRejected("the bundle manifest's limit overrides are malformed", reason="malformed_body")
    return obj


def _required(table: Table) -> set[str]:
    return {
        c.name
        for c in table.columns
        if not c.nullable and c.name not in ("tenant_id", "seq") and c.default is None
    }


def _check_record(obj: Mapping[str, Any]) -> None:
    kind, row = obj["type"], obj.get("row")
    if kind == "api_key":
        return
    table = _KIND_TABLES.get(kind)
    if table is None:
        raise BundleRejected(f"unknown bundle record type {kind!r}", reason="malformed_body")
    if not isinstance(row, dict) or not _required(table) <= row.keys():
        raise BundleRejected(f"a {kind} record lacks required fields", reason="malformed_body")


# -- export ----------------------------------------------------------------------------


def _tenant_predicate(table: Table, tenant_id: str) -> Any:
    return table.c.tenant_id == tenant_id


def _pages(
    store: TenantStore, table: Table, *, walk: str | None = None, query: Any = None
) -> Iterator[list[Row]]:
    """The tenant's rows of ``table`` in pages of ``_BATCH``, each page its own transaction,
    walked by a keyset on ``walk`` (default :data:`_WALK_KEY` of the table); ``query``
    instead of ``select(table)`` to read more (a join)."""
    key = table.c[walk or _WALK_KEY[table.name]]
    chosen: Any = select(table) if query is None else query
    base = chosen.where(_tenant_predicate(table, store.tenant_id)).order_by(key).limit(_BATCH)
    last: Any = None
    while True:
        q = base if last is None else base.where(key > last)
        with store._tx() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        if rows:
            yield rows
        if len(rows) < _BATCH:
            return
        last = rows[-1][key.name]


def _count(store: TenantStore, table: Table) -> int:
    q = select(func.count()).select_from(table).where(_tenant_predicate(table, store.tenant_id))
    with store._tx() as conn:
        return int(conn.execute(q).scalar_one())


def _data_tables(backend: SqlBackend, tenant_id: str, model: StorageModel) -> list[Table]:
    """The tenant data tables of the ``model`` placement, parents first.

    The placement's catalog is read for every table with a ``tenant_id`` column. Control
    plane tables are left out; the known data tables (agents, runs, memory, usage, audit)
    are returned. A table that is neither known nor control plane is checked instead: if it
    holds rows of the tenant, the transfer is refused rather than silently leaving them
    behind (or, worse, moving a control-plane table a later build added out of the shared
    database). Teach this module the table (here or in :data:`CONTROL_PLANE_TABLES`).

    Raises:
        OperationFailed: an unknown table holds rows of the tenant (``reason="unknown_table"``).
    """
    placement = backend.placements.for_tenant(tenant_id, model)
    found = set(backend.tenant_owned_tables(placement.engine, placement.schema)) - CONTROL_PLANE_TABLES
    known = [t for t in _KIND_TABLES.values() if t.name in found]
    store = _store_at(backend, tenant_id, model)
    for name in sorted(found - {t.name for t in known}):
        with translate_errors():
            reflected = Table(name, MetaData(), schema=placement.schema, autoload_with=placement.engine)
        # schema=None (typed as str only) makes a schema-less copy; the store's schema
        # translation then addresses the placement's schema.
        if _count(store, reflected.to_metadata(MetaData(), schema=None)):  # type: ignore[arg-type]
            raise OperationFailed(
                f"table {name!r} holds rows of this tenant, and this build does not know whether it is "
                "tenant data or control plane; refusing to export or move the tenant",
                reason="unknown_table",
                table=name,
                tenant_id=tenant_id,
            )
    return known


@dataclass
class _Exported:
    """What an export wrote so far that later record types refer to."""

    agents: set[str] = field(default_factory=set)
    #: The greatest run id written (ids grow with time: a run made after the runs were
    #: read has a greater one).
    last_run: str = ""


#: An attempt with its run's agent (every attempt has its run: the key cascades).
_ATTEMPTS_WITH_AGENT = select(s.run_attempts, s.runs.c.agent_id.label("run_agent_id")).join(
    s.runs, (s.runs.c.tenant_id == s.run_attempts.c.tenant_id) & (s.runs.c.id == s.run_attempts.c.run_id)
)


def _export_rows(store: TenantStore, kind: str, exported: _Exported) -> Iterator[Row]:
    """The rows of one record type, payloads decrypted, ready for JSON."""
    table = _KIND_TABLES[kind]
    sealed = _SEALED.get(table.name, {})
    query = _ATTEMPTS_WITH_AGENT if kind == "attempt" else None
    for page in _pages(store, table, query=query):
        for row in page:
            row.pop("tenant_id", None)
            if kind == "agent":
                exported.agents.add(row["id"])
            if kind == "run":
                if row["agent_id"] not in exported.agents:
                    continue  # its agent was created after the agents were read: not in this bundle
                exported.last_run = max(exported.last_run, row["id"])
            if kind == "attempt":
                agent_id = row.pop("run_agent_id")
                if agent_id not in exported.agents or row["run_id"] > exported.last_run:
                    continue  # its run is not in this bundle
            record_id = row["key"] if kind == "memory" else row["id"]
            for column, aad_table in sealed.items():
                row[column] = store._sealer.open(aad_table, record_id, row[column])
            yield row


def export_tenant(
    backend: SqlBackend,
    tenant_id: str,
    path: str | os.PathLike[str],
    *,
    passphrase: str | None = None,
    recipient_public_key: bytes | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> ExportSummary:
    """Write everything ``tenant_id`` owns to one encrypted bundle file (format above).

    The file is written under a temporary name in the same directory (mode 0600 from
    creation) and renamed into place only when complete, so ``path`` never holds a
    partial bundle. The export reads live data table by table; for a point-in-time copy
    of a busy tenant, suspend it (or export during a move) first.

    Args:
        backend: the deployment's control-plane store.
        tenant_id: the tenant to export (active or suspended).
        path: the bundle file to write.
        passphrase: seal with a key derived from this passphrase (at least 8 characters) ...
        recipient_public_key: ... or for this X25519 public key (32 raw bytes, or PEM/DER
            SubjectPublicKeyInfo, e.g. from :func:`generate_recipient_keypair`). Exactly one.
        progress: called as ``progress(rows_done, rows_total)`` (rows of the tenant's tables).
        overwrite: replace an existing file at ``path``.

    Returns:
        What was written.

    Raises:
        InvalidRequest: not exactly one of passphrase/recipient key, a short passphrase, a
            malformed key, ``path`` exists (without ``overwrite``) or cannot be written.
        TenantNotFound: no such tenant.
        InvalidTransition: the tenant is being deleted.
        OperationFailed: the tenant has rows in a table this build cannot carry
            (``reason="unknown_table"``).
        DecryptionFailed: a stored payload failed authentication.
        StorageError: the database failed.
    """
    protection, key = _seal_for_export(passphrase, recipient_public_key)
    target = Path(path)
    tenant = backend.get_tenant(tenant_id)
    if tenant["state"] not in (TenantState.ACTIVE.value, TenantState.SUSPENDED.value):
        raise InvalidTransition(
            f"cannot export a tenant that is {tenant['state']}", tenant_id=tenant_id, state=tenant["state"]
        )
    if target.exists() and not overwrite:
        raise InvalidRequest(f"{target} exists; choose another path or overwrite it", field="path")
    model = StorageModel(tenant["storage_model"])
    store = backend.acting_on(tenant_id)
    _data_tables(backend, tenant_id, model)  # refuses rows in tables it cannot carry
    keys = backend.list_api_keys(tenant_id)
    total = sum(_count(store, t) for t in _KIND_TABLES.values()) + len(keys)
    exported_at = utcnow()
    nonce_prefix = os.urandom(_NONCE_PREFIX_BYTES)
    header = {
        "cipher": "AES-256-GCM",
        "compression": "zlib",
        "segment_bytes": SEGMENT_BYTES,
        "nonce_prefix": _b64(nonce_prefix),
        "exported_at": exported_at.isoformat(),
        "tenant": {"id": tenant_id, "name": tenant["name"]},
        "protection": protection,
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes
    manifest = {
        "type": "manifest",
        "format": FORMAT_VERSION,
        "exported_at": exported_at,
        "tenant": {
            k: tenant[k]
            for k in (
                "id",
                "name",
                "plan",
                "state",
                "isolation_level",
                "storage_model",
                "limit_overrides",
                "created_at",
            )
        },
        "source": {"database": backend.engine.dialect.name, "storage_model": model.value},
    }
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as err:
        raise InvalidRequest(f"cannot write in {target.parent}: {err.strerror}", field="path") from err
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(prefix)
            writer = _BundleWriter(
                out,
                key=key,
                nonce_prefix=nonce_prefix,
                aad=prefix,
                segment=SEGMENT_BYTES,
            )
            writer.record(manifest)
            done = 0
            exported = _Exported()
            for kind in _KIND_TABLES:
                for row in _export_rows(store, kind, exported):
                    writer.record({"type": kind, "row": row})
                    done += 1
                    if progress is not None and done % 100 == 0:
                        progress(done, max(total, done))
            for k in keys:
                info = {f: k[f] for f in ("id", "name", "scopes", "created_at", "revoked_at")}
                writer.record({"type": "api_key", "row": info})
                done += 1
            digest = writer.close()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if progress is not None:
        progress(done, done)
    return ExportSummary(
        path=target,
        tenant_id=tenant_id,
        tenant_name=tenant["name"],
        exported_at=exported_at,
        counts=dict(writer.counts),
        records=done,
        size_bytes=target.stat().st_size,
        body_sha256=digest,
        protection=str(protection["kind"]),
    )


# -- import ----------------------------------------------------------------------------


def _spec_from_manifest(
    manifest: Mapping[str, Any], name: str | None, storage_model: StorageModel | None
) -> TenantSpec:
    tenant = manifest["tenant"]
    try:
        return TenantSpec(
            name=name or tenant["name"],
            plan=tenant["plan"],
            isolation_level=IsolationLevel(tenant["isolation_level"]),
            storage_model=storage_model or StorageModel(tenant["storage_model"]),
            limits=LimitOverrides.from_stored(tenant.get("limit_overrides")),
        )
    except (ValidationError, ValueError) as err:
        raise InvalidRequest(f"the bundle's tenant cannot be created here: {err}", field="name") from err


def _import_row(store: TenantStore, kind: str, row: Mapping[str, Any]) -> Row:
    """A bundle row as a row of the new tenant: known columns only, payloads re-sealed."""
    table = _KIND_TABLES[kind]
    out: Row = {}
    for column in table.columns:
        if column.name in ("tenant_id", "seq") or column.name not in row:
            continue
        value = row[column.name]
        if value is not None and _is_datetime(table, column.name):
            value = datetime.fromisoformat(value)
        out[column.name] = value
    out["tenant_id"] = store.tenant_id
    if kind == "audit":
        out["id"] = new_id("au")  # audit ids are unique across the deployment
    if kind == "attempt" and out.get("outcome") is None:
        out["outcome"] = "interrupted"  # its run was exported unfinished (see below)
        out["ended_at"] = out.get("ended_at") or utcnow()
    if kind == "run" and out.get("status") in _UNFINISHED:
        out["status"] = "failed"
        out["finished_at"] = out.get("finished_at") or utcnow()
        out["error"] = {
            "code": "run_failed",
            "reason": "imported_unfinished",
            "message": "the run had not finished when its tenant was exported",
        }
    record_id = out["key"] if kind == "memory" else out["id"]
    for name, aad_table in _SEALED.get(table.name, {}).items():
        if out.get(name) is not None:
            out[name] = store._sealer.seal(aad_table, record_id, out[name])
    return out


def _write_bundle(
    reader: _BundleReader, store: TenantStore, progress: Callable[[int], None] | None
) -> dict[str, int]:
    """Second pass: write every record of the (already verified) bundle; returns rows per type."""
    written: dict[str, int] = {}
    batch: list[Row] = []
    batch_kind = ""

    def flush() -> None:
        if batch:
            with store._tx() as conn:
                conn.execute(insert(_KIND_TABLES[batch_kind]), batch)
            written[batch_kind] = written.get(batch_kind, 0) + len(batch)
            batch.clear()

    for obj in reader.records(progress):
        kind = obj["type"]
        if kind not in _KIND_TABLES:
            continue  # manifest, api_key (informational), end
        if kind != batch_kind or len(batch) >= _BATCH:
            flush()
            batch_kind = kind
        batch.append(_import_row(store, kind, obj["row"]))
    flush()
    return written


def import_tenant(
    backend: SqlBackend,
    path: str | os.PathLike[str],
    *,
    passphrase: str | None = None,
    recipient_private_key: bytes | None = None,
    name: str | None = None,
    storage_model: StorageModel | None = None,
    actor: str,
    progress: Progress | None = None,
    manager: TenantManager | None = None,
) -> Tenant:
    """Recreate a bundle's tenant on this deployment, under a new id and new data keys.

    The whole bundle is read and verified first (every segment authenticated, the body's
    SHA-256 and record counts checked, every record's shape checked); only then is the
    tenant created, through :meth:`TenantManager.create`, and its rows written through
    its own placement, payloads sealed again with its own DEK. Agent, run and usage ids
    are kept (keys are per tenant, so they cannot collide), so runs keep pointing at their
    agents and usage at their runs; audit records get new ids. On any failure after
    creation the tenant is deleted again (:meth:`TenantManager.delete`: keys shredded,
    rows purged, placement dropped; a tombstone row remains) before the error is re-raised.
    No API key is carried: issue new keys for the imported tenant.

    Args:
        backend: the importing deployment's control-plane store.
        path: the bundle file.
        passphrase: for a passphrase bundle ...
        recipient_private_key: ... or the recipient's X25519 private key (32 raw bytes, or
            unencrypted PKCS#8 PEM/DER) for a recipient-key bundle. Exactly one.
        name: the new tenant's name; default the exported one (give another to import next
            to the original on the same deployment).
        storage_model: where to store it; default the exported tenant's model.
        actor: who imports, for the audit records.
        progress: called as ``progress(bytes_done, bytes_total)`` in bundle bytes; the
            bundle is read twice (verify, then write), so the total is twice its size.
        manager: the tenant manager to create (and on failure delete) the tenant with,
            so its listeners and supported isolation levels apply; default a plain one.

    Returns:
        The new tenant, ``active``.

    Raises:
        InvalidRequest: not exactly one secret, an unreadable file, a malformed key, or a
            tenant spec (plan, name, storage model) this deployment refuses.
        BundleRejected: wrong passphrase or key, a changed or truncated bundle, an
            unsupported format (nothing is created).
        AlreadyExists: a live tenant has that name (nothing is created).
        IsolationUnavailable: the bundle's isolation level is not enforceable here.
        StorageError: the database failed (the half-made tenant is deleted).
    """
    _one_secret(passphrase, recipient_private_key, ("passphrase", "recipient_private_key"))
    bundle = Path(path)
    reader = _BundleReader(bundle, passphrase=passphrase, recipient_private_key=recipient_private_key)
    total = 2 * reader.size
    body = reader.verify((lambda n: progress(n, total)) if progress is not None else None)
    spec = _spec_from_manifest(body.manifest, name, storage_model)
    backend.placements.require(spec.storage_model)
    manager = manager or TenantManager(backend)
    tenant = manager.create(spec, actor=actor)
    try:
        store = backend.acting_on(tenant.id)
        written = _write_bundle(
            reader, store, (lambda n: progress(reader.size + n, total)) if progress is not None else None
        )
        source = body.manifest["tenant"]
        store.append_audit(
            actor=actor,
            action="tenant.import",
            target=tenant.id,
            outcome="ok",
            detail={
                "source_tenant_id": source["id"],
                "source_name": source["name"],
                "exported_at": body.manifest.get("exported_at"),
                "body_sha256": body.sha256,
                "rows": written,
                "api_keys_not_carried": body.counts.get("api_key", 0),
            },
        )
    except BaseException as err:
        try:
            manager.delete(tenant.id, actor=actor)
        except Exception as cleanup:  # keep the original error; say the cleanup failed too
            err.add_note(f"deleting the half-imported tenant {tenant.id} failed too: {cleanup!r}")
        raise
    return manager.get(tenant.id)


# -- move ------------------------------------------------------------------------------


def _store_at(backend: SqlBackend, tenant_id: str, model: StorageModel) -> TenantStore:
    """A store of ``tenant_id`` bound to the placement of ``model`` (not necessarily its current one)."""
    return TenantStore(
        backend.placements.for_tenant(tenant_id, model),
        backend.acting_on(tenant_id)._sealer,
        cache=backend.cache,
    )


def _compare_and_set(backend: SqlBackend, tenant_id: str, expect: Mapping[str, Any], values: Row) -> bool:
    """One UPDATE of the tenant row, only if every column in ``expect`` still holds its value.

    :meth:`SqlBackend.update_tenant` compares only ``state``; a move must also compare
    ``storage_model`` and ``moving_to`` so two moves, or a move and a deletion, cannot
    both win. A tuple in ``expect`` means "any of these".
    """
    t = s.tenants
    q = update(t).where(t.c.id == tenant_id)
    for column, value in expect.items():
        if value is None:
            q = q.where(t.c[column].is_(None))
        elif isinstance(value, tuple):
            q = q.where(t.c[column].in_(value))
        else:
            q = q.where(t.c[column] == value)
    with backend.transaction() as conn:
        won = int(conn.execute(q.values(**values, updated_at=utcnow())).rowcount) == 1
    if won:
        backend.cache.changed(tenant_id)
    return won


def _delete_rows(backend: SqlBackend, tenant_id: str, model: StorageModel) -> dict[str, int]:
    """Delete the tenant's rows from every data table of the ``model`` placement (one transaction)."""
    store = _store_at(backend, tenant_id, model)
    tables = list(reversed(_data_tables(backend, tenant_id, model)))  # children first
    counts: dict[str, int] = {}
    with store._tx() as conn:
        for table in tables:
            counts[table.name] = int(
                conn.execute(delete(table).where(_tenant_predicate(table, tenant_id))).rowcount
            )
    if backend.engine.dialect.name == "sqlite" and model is StorageModel.POOL:
        # secure_delete zeroes freed pages; truncating the WAL drops older page images.
        backend.truncate_wal(tenant_id)
    return counts


def _remove_copy(backend: SqlBackend, tenant_id: str, model: StorageModel) -> None:
    """Remove the tenant's copy in ``model``: its rows (pool) or its schema/database/file."""
    if model is StorageModel.POOL:
        _delete_rows(backend, tenant_id, model)
    else:
        backend.placements.destroy(tenant_id, model)


def _runs_in_flight(backend: SqlBackend, store: TenantStore) -> int:
    """Runs of the tenant that a process may still write to the old placement.

    Those are ``running`` runs and ``queued`` ones that are not waiting, unclaimed, in the
    durable run queue (an asynchronous run executed in the API process is ``queued`` with
    a store already bound to the old placement). An unclaimed queue entry is safe: the
    queue does not hand out runs of a moving tenant, and the worker that later claims it
    resolves the placement from the tenant row, by then the new one.
    """
    runs = select(s.runs.c.id).where(
        _tenant_predicate(s.runs, store.tenant_id), s.runs.c.status.in_(_UNFINISHED)
    )
    with store._tx() as conn:
        pending = {str(r) for r in conn.execute(runs).scalars()}
    if not pending:
        return 0
    waiting = select(s.run_queue.c.run_id).where(
        _tenant_predicate(s.run_queue, store.tenant_id), s.run_queue.c.claimed_by.is_(None)
    )
    with backend.transaction() as conn:
        pending -= {str(r) for r in conn.execute(waiting).scalars()}
    return len(pending)


def _wait_for_runs(backend: SqlBackend, store: TenantStore, timeout_s: float) -> None:
    """Wait until no run of the tenant is in flight in another process (see :func:`_runs_in_flight`).

    Raises:
        TenantMoveFailed: some still are after ``timeout_s`` seconds (``reason="runs_in_flight"``).
    """
    deadline = time.monotonic() + timeout_s
    while n := _runs_in_flight(backend, store):
        if time.monotonic() >= deadline:
            raise TenantMoveFailed(
                f"{n} run(s) of the tenant are still in flight after {timeout_s:g} s; try again later",
                tenant_id=store.tenant_id,
                reason="runs_in_flight",
                runs=n,
            )
        time.sleep(0.1)


def _copy_tables(
    backend: SqlBackend, tenant_id: str, src: StorageModel, dst: StorageModel, progress: Progress | None
) -> dict[str, int]:
    """Copy every data row of the tenant from ``src`` to ``dst`` as stored (ciphertext as is)."""
    old, new = _store_at(backend, tenant_id, src), _store_at(backend, tenant_id, dst)
    tables = _data_tables(backend, tenant_id, src)
    total = sum(_count(old, t) for t in tables)
    done = 0
    rows: dict[str, int] = {}
    for table in tables:
        rows[table.name] = 0
        for page in _pages(old, table):
            if table.name == "audit_log":
                for r in page:
                    r.pop("seq")  # new sequence numbers in the new placement, same order
            with new._tx() as conn:
                conn.execute(insert(table), page)
            rows[table.name] += len(page)
            done += len(page)
            if progress is not None:
                progress(done, max(total, done))
    return rows


def _fingerprint(store: TenantStore, table: Table) -> tuple[int, str]:
    """(rows, SHA-256 of the rows in key order) of the tenant in ``table``; ``seq`` left out."""
    digest = hashlib.sha256()
    n = 0
    walk = "id" if table.name == "audit_log" else None
    for page in _pages(store, table, walk=walk):
        for row in page:
            row.pop("seq", None)
            digest.update(_line(row))
            n += 1
    return n, digest.hexdigest()


def _verify_copy(backend: SqlBackend, tenant_id: str, src: StorageModel, dst: StorageModel) -> int:
    """Check the new placement holds exactly the old rows and that its payloads decrypt.

    Returns:
        How many payloads were decrypted from the new placement.

    Raises:
        TenantMoveFailed: counts or contents differ (``reason="verification_failed"``).
        DecryptionFailed: a copied payload does not decrypt.
    """
    old, new = _store_at(backend, tenant_id, src), _store_at(backend, tenant_id, dst)
    for table in _data_tables(backend, tenant_id, src):
        name = table.name
        before, after = _fingerprint(old, table), _fingerprint(new, table)
        if before != after:
            raise TenantMoveFailed(
                f"the copy of {name!r} differs from the original ({before[0]} rows before, "
                f"{after[0]} after); a write reached the old placement during the move",
                tenant_id=tenant_id,
                reason="verification_failed",
                table=name,
                rows_before=before[0],
                rows_after=after[0],
            )
    samples = 0
    for run in new.list_runs(limit=5):  # decrypts input and output
        samples += 1 + (run["output"] is not None)
    for key in new.memory_list(limit=5):
        new.memory_get(key)
        samples += 1
    return samples


def _shred_stale(backend: SqlBackend, tenant_id: str, current: StorageModel) -> tuple[StorageModel, ...]:
    """Remove the tenant's copies in every other storage model this deployment offers."""
    removed = []
    for model in sorted(backend.placements.supported() - {current}):
        _remove_copy(backend, tenant_id, model)
        removed.append(model)
    return tuple(removed)


def move_tenant(
    backend: SqlBackend,
    tenant_id: str,
    to: StorageModel,
    *,
    actor: str,
    progress: Progress | None = None,
    drain_timeout_s: float = 30.0,
    grace_s: float = 0.2,
) -> MoveSummary:
    """Move a tenant to another storage model of this deployment while it keeps serving reads.

    Steps: mark the tenant ``moving_to=<to>`` (compare-and-set; the API then holds its
    writes with 503 ``tenant_moving`` and serves reads from the old placement); wait
    ``grace_s`` for writes already admitted, and for the tenant's runs in flight to finish
    (running ones, and queued ones not waiting unclaimed in the durable run queue: their
    stores are bound to the old placement); provision the new placement
    (after clearing any leftover of an interrupted attempt); copy every row of the tenant's
    data tables (agents, runs, memory, usage, audit; the old placement's catalog is read
    too, and rows in a table this build does not know stop the move) as stored, ciphertext
    as is (tenant id, table and record ids do not change, so the AAD still matches); verify that row counts
    and contents match table by table and that a sample of payloads decrypts from the new
    placement; switch ``storage_model=<to>, moving_to=NULL`` in one compare-and-set update;
    record ``tenant.move`` in the tenant's audit (``from``, ``to``, ``rows``); wait
    ``grace_s`` for reads that resolved the old placement just before the switch; then
    shred the old copy (pool: delete the tenant's rows; bridge/silo: drop the schema /
    database / file). Requests resolve the placement from the tenant row, so requests
    after the switch use the new one.

    Abort and resume: any failure before the switch drops the new placement (or the
    copied pool rows), clears ``moving_to``, records a failed ``tenant.move`` and re-raises;
    the tenant stays where it was. After a crash of the process mid-move, call again with
    the same ``to`` (it resumes: ``moving_to`` is already that model) or call
    :func:`abort_move`. After a crash between the switch and the shredding, call again
    with ``to`` = the tenant's (new) model: it removes the stale copies and returns
    ``resumed=True``. Do not run two moves of one tenant at once; the compare-and-set
    refuses a second one only while the first is between its claim and its switch.

    Between deployments (e.g. SQLite -> PostgreSQL) use :func:`export_tenant` on the
    source and :func:`import_tenant` on the target instead.

    Args:
        backend: the deployment's control-plane store.
        tenant_id: the tenant to move (active or suspended).
        to: the storage model to move it to; must be offered by this deployment.
        actor: who moves it, for the audit record.
        progress: called as ``progress(rows_copied, rows_total)``.
        drain_timeout_s: how long to wait for in-flight runs, seconds.
        grace_s: the wait for requests admitted before the hold / before the switch, seconds.

    Returns:
        What was moved.

    Raises:
        InvalidRequest: ``to`` is not offered here.
        TenantNotFound: no such tenant.
        InvalidTransition: the tenant is being deleted, or is moving to another model.
        TenantMoveFailed: runs still in flight, a write reached the old placement during
            the copy, or the tenant changed under the move (nothing switched).
        OperationFailed: a table this build does not know holds rows of the tenant
            (``reason="unknown_table"``; nothing switched).
        DecryptionFailed: a copied payload does not decrypt (nothing switched).
        StorageError: the database failed (nothing switched, if before the switch).
    """
    started = time.monotonic()
    to = StorageModel(to)
    backend.placements.require(to)
    row = backend.get_tenant(tenant_id)
    live = (TenantState.ACTIVE.value, TenantState.SUSPENDED.value)
    if row["state"] not in live:
        raise InvalidTransition(
            f"cannot move a tenant that is {row['state']}",
            tenant_id=tenant_id,
            state=row["state"],
            action="move",
        )
    src = StorageModel(row["storage_model"])
    moving = row["moving_to"]
    if moving is not None and moving != to.value:
        raise InvalidTransition(
            f"the tenant is already moving to {moving}; abort that move first (abort_move)",
            tenant_id=tenant_id,
            moving_to=moving,
            action="move",
        )
    if src is to:
        # Nothing to copy; finish a move interrupted after its switch (stale copies elsewhere).
        if moving is not None:
            _compare_and_set(backend, tenant_id, {"moving_to": moving}, {"moving_to": None})
        shredded = _shred_stale(backend, tenant_id, src)
        return MoveSummary(
            tenant_id=tenant_id,
            from_model=src,
            to_model=to,
            shredded=shredded,
            resumed=True,
            duration_s=time.monotonic() - started,
        )
    claim = {"state": live, "storage_model": src.value, "moving_to": moving}
    if not _compare_and_set(backend, tenant_id, claim, {"moving_to": to.value}):
        raise InvalidTransition("the tenant changed while the move started; try again", tenant_id=tenant_id)
    try:
        old = _store_at(backend, tenant_id, src)
        time.sleep(grace_s)
        _wait_for_runs(backend, old, drain_timeout_s)
        _remove_copy(backend, tenant_id, to)  # leftovers of an interrupted attempt
        backend.placements.provision(tenant_id, to)
        rows = _copy_tables(backend, tenant_id, src, to, progress)
        samples = _verify_copy(backend, tenant_id, src, to)
        switch = {"state": live, "storage_model": src.value, "moving_to": to.value}
        if not _compare_and_set(backend, tenant_id, switch, {"storage_model": to.value, "moving_to": None}):
            raise TenantMoveFailed(
                "the tenant changed during the move (deleted, or its move aborted)",
                tenant_id=tenant_id,
                reason="state_changed",
            )
    except BaseException as err:
        _abort(backend, tenant_id, src, to, actor, err)
        raise
    backend.acting_on(tenant_id).append_audit(
        actor=actor,
        action="tenant.move",
        target=tenant_id,
        outcome="ok",
        detail={"from": src.value, "to": to.value, "rows": rows, "resumed": moving is not None},
    )
    time.sleep(grace_s)
    _remove_copy(backend, tenant_id, src)
    return MoveSummary(
        tenant_id=tenant_id,
        from_model=src,
        to_model=to,
        rows=rows,
        verified_samples=samples,
        shredded=(src,),
        resumed=moving is not None,
        duration_s=time.monotonic() - started,
    )


def _abort(
    backend: SqlBackend, tenant_id: str, src: StorageModel, to: StorageModel, actor: str, err: BaseException
) -> None:
    """Undo a move that did not switch: drop the new copy, lift the hold, audit. Never masks ``err``."""
    steps: list[tuple[str, Callable[[], object]]] = [
        ("dropping the new copy", lambda: _remove_copy(backend, tenant_id, to)),
        (
            "clearing moving_to",
            lambda: _compare_and_set(
                backend, tenant_id, {"storage_model": src.value, "moving_to": to.value}, {"moving_to": None}
            ),
        ),
        (
            "recording the failed move",
            lambda: _store_at(backend, tenant_id, src).append_audit(
                actor=actor,
                action="tenant.move",
                target=tenant_id,
                outcome="failed",
                detail={
                    "from": src.value,
                    "to": to.value,
                    "error": err.code if isinstance(err, PatinoxError) else type(err).__name__,
                },
            ),
        ),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as cleanup:
            err.add_note(f"aborting the move of {tenant_id}: {what} failed too: {cleanup!r}")


def abort_move(backend: SqlBackend, tenant_id: str, *, actor: str) -> bool:
    """Abandon a move left unfinished by a crashed process: drop its partial copy, lift the hold.

    Only for a move whose process is gone (a running move aborts itself on failure).

    Returns:
        True if a move was aborted; False if the tenant was not moving.

    Raises:
        TenantNotFound: no such tenant.
        StorageError: the database failed.
    """
    row = backend.get_tenant(tenant_id, include_deleted=True)
    if row["moving_to"] is None:
        return False
    src, to = StorageModel(row["storage_model"]), StorageModel(row["moving_to"])
    if to is not src:
        _remove_copy(backend, tenant_id, to)
    _compare_and_set(backend, tenant_id, {"moving_to": to.value}, {"moving_to": None})
    with contextlib.suppress(Exception):
        _store_at(backend, tenant_id, src).append_audit(
            actor=actor,
            action="tenant.move",
            target=tenant_id,
            outcome="aborted",
            detail={"from": src.value, "to": to.value},
        )
    return True
