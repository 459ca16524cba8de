"""Per-tenant envelope encryption: a DEK per tenant, wrapped by a KEK, AAD on every blob.

How the pieces fit::

    KeyProvider (KEK, versioned)  --wrap/unwrap-->  DEK per tenant and version
        FileKeyProvider  file:///path (mode 0600)        stored only wrapped, in a DekStore
        EnvKeyProvider   env://PATINOX_KEK               cached decrypted by TenantKeyring
        your KMS         (see below)                     (per tenant, per version, ttl_s)

    encrypt(plaintext, key=DataKey, table, record_id) -> blob
    decrypt(blob, key_lookup, tenant_id, table, record_id) -> plaintext

Usage::

    keyring = TenantKeyring(store, key_provider_from_url("file:///var/lib/patinox/kek.json"))
    blob = encrypt_str(text, key=keyring.current_key(tid), table="runs", record_id=run_id)
    text = decrypt_str(blob, key_lookup=keyring.key_lookup(tid), tenant_id=tid,
                       table="runs", record_id=run_id)

Blob format (integers big-endian)::

    offset  size  field
    0       1     format version, 0x01
    1       4     DEK version (uint32, >= 1)
    5       12    random nonce
    17      n+16  AES-256-GCM ciphertext + 16-byte tag        (a blob is plaintext + 33 bytes)

    AAD = b"patinox-data" || format version || DEK version (uint32)
          || len+UTF-8 of tenant_id || len+UTF-8 of table || len+UTF-8 of record_id
          (each length a uint32, so ("ab", "c") and ("a", "bc") differ)

The tenant id, table and record id are not stored in the blob: the reader supplies them
from where it read the blob, so a blob copied to another tenant, table, row or version
fails authentication (:class:`DecryptionFailed`).

Wrapped-key format (:class:`WrappedKey`, integers big-endian)::

    offset  size  field
    0       1     format version, 0x01
    1       4     KEK version (uint32, >= 1)
    5       1     nonce length N (12 here; 0 allowed for a KMS ciphertext)
    6       N     nonce
    6+N     rest  wrapped DEK + tag                              (66 bytes for AES-GCM)

    wrapping AAD = b"patinox-dek|" + tenant_id + b"|" + str(kek_version)

Rotation and shredding:

* KEK rotation: :meth:`FileKeyProvider.rotate`, then :meth:`TenantKeyring.rewrap_all`
  re-wraps every DEK under the new KEK version; no blob changes.
* DEK rotation: :meth:`TenantKeyring.rotate_dek` makes a new version current; old
  blobs keep decrypting with the version recorded in them, until a background job
  re-encrypts them.
* Crypto-shredding: :meth:`TenantKeyring.shred` destroys the tenant's wrapped DEKs in
  the store; from then on nothing of the tenant decrypts from the live database, and
  no new DEK is ever made for it. Limit: a database backup taken *before* the shred
  still holds the wrapped DEKs, and the KEK (shared by all tenants) still unwraps them.
  Making earlier backups undecryptable too needs a per-tenant secret that lives outside
  the database (a per-tenant KEK or KMS key, deleted on shred); that is not built here.

Plugging in a cloud KMS (AWS KMS, GCP Cloud KMS, Azure Key Vault, Vault Transit): write
a class with the three :class:`KeyProvider` methods; no change elsewhere.

* ``kek_version()`` returns a small integer you map to a KMS key version (or key id)
  in your configuration; raising it is KEK rotation, followed by
  :meth:`TenantKeyring.rewrap_all`.
* ``wrap(dek, tenant_id=...)`` calls KMS ``Encrypt`` with the DEK as plaintext and the
  encryption context ``{"patinox_tenant": tenant_id}`` (GCP/Azure: the AAD
  ``dek_wrap_aad(tenant_id, version)``), and returns
  ``WrappedKey(kek_version=..., nonce=b"", ciphertext=<KMS ciphertext blob>)``.
* ``unwrap(wrapped, tenant_id=...)`` calls KMS ``Decrypt`` with the same context, maps
  the KMS "invalid ciphertext"/"access denied" errors to :class:`DecryptionFailed`, and
  returns the 32 bytes. The KMS then enforces the tenant binding and logs every unwrap.
* Because :class:`TenantKeyring` caches decrypted DEKs for ``ttl_s``, KMS calls happen
  once per tenant and version per ``ttl_s`` per process, not per payload. Network
  errors should surface as :class:`~patinox.errors.StorageError`-like runtime failures,
  never as :class:`DecryptionFailed`, so they are retried rather than reported as tampering.
* BYOK: a provider per tenant (the tenant's own KMS key) plugs in the same way.

Errors: :class:`DecryptionFailed` and :class:`TenantKeysDestroyed` (both
:class:`~patinox.errors.OperationFailed`) are defined here for now; they belong in
:mod:`patinox.errors`.
"""

from __future__ import annotations

from patinox.storage._crypto.aead import (
    BLOB_FORMAT_VERSION,
    BLOB_OVERHEAD,
    DEK_BYTES,
    DataKey,
    blob_key_version,
    decrypt,
    decrypt_str,
    encrypt,
    encrypt_str,
)
from patinox.storage._crypto.errors import DecryptionFailed, TenantKeysDestroyed
from patinox.storage._crypto.keyring import DekStore, InMemoryDekStore, TenantKeyring
from patinox.storage._crypto.providers import (
    EnvKeyProvider,
    FileKeyProvider,
    KeyProvider,
    WrappedKey,
    dek_wrap_aad,
    key_provider_from_url,
)

__all__ = [
    "BLOB_FORMAT_VERSION",
    "BLOB_OVERHEAD",
    "DEK_BYTES",
    "DataKey",
    "DecryptionFailed",
    "DekStore",
    "EnvKeyProvider",
    "FileKeyProvider",
    "InMemoryDekStore",
    "KeyProvider",
    "TenantKeyring",
    "TenantKeysDestroyed",
    "WrappedKey",
    "blob_key_version",
    "decrypt",
    "decrypt_str",
    "dek_wrap_aad",
    "encrypt",
    "encrypt_str",
    "key_provider_from_url",
]
