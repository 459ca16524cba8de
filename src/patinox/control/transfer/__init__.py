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
* **Secrets**, unless the export is asked for them (``include_secrets``,
  ``patinox tenants export --include-secrets``): then they travel like run payloads, in
  plaintext inside the sealed body, and the source tenant's audit log records the export
  (``secrets.export``, naming the secrets). A move between storage models always carries
  them (they never leave the deployment's own encryption).
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
    {"type": "idempotency_key", "row": {...}} Idempotency-Key records (response in plaintext),
    {"type": "thread", "row": {...}}         conversation threads (metadata in plaintext),
    {"type": "thread_message", "row": {...}} their messages (content in plaintext),
    {"type": "webhook_endpoint", "row": {...}} webhook endpoints (signing secrets in plaintext),
    {"type": "secret", "row": {...}}         the tenant's secrets (value in plaintext), only
                                             from an export with include_secrets
    {"type": "api_key", "row": {...}}        key metadata (informational, not restored)
    {"type": "end", "records": N, "counts": {type: n}, "sha256": "<hex>"}

``sha256`` is the SHA-256 of every body byte before the ``end`` line; ``records`` and
``counts`` count the lines between the manifest and the end line. Datetimes are ISO 8601
strings with a UTC offset. ``attempt`` records came later than format 1 itself: a bundle
without them imports as before (its runs have no attempts), and a build older than them
refuses a bundle with them (``malformed_body``, unknown record type); the same holds for
``idempotency_key`` records (an import keeps each key's expiry: a replay after the import
answers as before it, until the key expires); ``thread`` and ``thread_message`` records likewise
(a message whose thread was made after the threads were read is left out); and
``webhook_endpoint`` records (an import keeps each endpoint's secrets, state and rotation
overlap, so receivers go on verifying; the delivery log and pending deliveries are not
carried: they stay with the deployment that made them).

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
memory, usage_records, audit_log, idempotency_keys, threads, thread_messages,
webhook_endpoints, secrets) and leaves the control-plane tables of the shared database where
they are (:data:`CONTROL_PLANE_TABLES`). It also reads the placement's catalog for every
other table with a ``tenant_id`` column: if one holds rows of the tenant, export and move
refuse (:class:`~patinox.errors.OperationFailed`, ``reason="unknown_table"``) rather than
leave those rows behind or move a control-plane table out of the shared database. A new
table is therefore taught to this package, not silently skipped.

Layout
------
``_bundle`` (the bundle format and its crypto: keys, writer, reader, checks), ``_tables``
(which tables a transfer carries), ``_export``, ``_import`` and ``_move``. Every row of the
tenant is read and written through its tenant-bound store
(:meth:`~patinox.storage.TenantStore.bulk`), which scopes each statement and seals and
opens the payloads; this package holds no SQL of its own.
"""

from patinox.control.transfer._bundle import FORMAT_VERSION as FORMAT_VERSION
from patinox.control.transfer._bundle import MAGIC as MAGIC
from patinox.control.transfer._bundle import SCRYPT_N as SCRYPT_N
from patinox.control.transfer._bundle import SCRYPT_P as SCRYPT_P
from patinox.control.transfer._bundle import SCRYPT_R as SCRYPT_R
from patinox.control.transfer._bundle import SEGMENT_BYTES as SEGMENT_BYTES
from patinox.control.transfer._bundle import BundleRejected, generate_recipient_keypair
from patinox.control.transfer._export import ExportSummary, export_tenant
from patinox.control.transfer._import import import_tenant
from patinox.control.transfer._move import MoveSummary, TenantMoveFailed, abort_move, move_tenant
from patinox.control.transfer._tables import CONTROL_PLANE_TABLES as CONTROL_PLANE_TABLES
from patinox.control.transfer._tables import Progress as Progress

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
