"""The bundle format and its crypto: keys, the sealed segment stream, the writer and the
reader with every check an import makes before it writes anything.

The format itself is described in the package docstring (:mod:`patinox.control.transfer`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from sqlalchemy import Table

from patinox.errors import InvalidRequest
from patinox.storage import schema as s

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

#: Bundle record type -> table, in the order they are written (parents before children).
_KIND_TABLES: dict[str, Table] = {
    "agent": s.agents,
    "run": s.runs,
    "attempt": s.run_attempts,
    "memory": s.memory,
    "usage": s.usage_records,
    "audit": s.audit_log,
    "idempotency_key": s.idempotency_keys,
    "thread": s.threads,
    "thread_message": s.thread_messages,
    "webhook_endpoint": s.webhook_endpoints,
    # Written only by an export with include_secrets (audited); a move always carries them.
    "secret": s.secrets,
}


# -- errors ------------------------------------------------------------------------------


class BundleRejected(InvalidRequest):
    """An export bundle that cannot be imported. Nothing was written.

    Fields: ``reason`` (see the package docstring) and, when known, ``path``.
    """

    code = "bundle_rejected"
    http_status = 422


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


def _start_bundle(
    out: IO[bytes],
    *,
    key: bytes,
    tenant_id: str,
    tenant_name: str,
    exported_at: datetime,
    protection: Mapping[str, Any],
) -> _BundleWriter:
    """Write a new bundle's prefix (magic, version, header length, header) to ``out``.

    Returns:
        The writer of its body: segments of :data:`SEGMENT_BYTES` under a fresh nonce
        prefix, each authenticating the prefix as its AAD.
    """
    nonce_prefix = os.urandom(_NONCE_PREFIX_BYTES)
    header = {
        "cipher": "AES-256-GCM",
        "compression": "zlib",
        "segment_bytes": SEGMENT_BYTES,
        "nonce_prefix": _b64(nonce_prefix),
        "exported_at": exported_at.isoformat(),
        "tenant": {"id": tenant_id, "name": tenant_name},
        "protection": protection,
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes
    out.write(prefix)
    return _BundleWriter(out, key=key, nonce_prefix=nonce_prefix, aad=prefix, segment=SEGMENT_BYTES)


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
        BundleRejected: see the package docstring.
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
