"""Per-tenant envelope encryption: a DEK per tenant, wrapped by a KEK and the tenant's key
share, AAD on every blob.

How the pieces fit::

    KeyProvider (KEK, versioned)  --wrap/unwrap-->  DEK per tenant and version
      FileKeyProvider  file:///path (mode 0600)        stored only wrapped, in a DekStore
        + key share per tenant, outside the DB        cached decrypted by TenantKeyring
          (<key file>.tenants/<tenant>, mode 0600)     (per tenant, per version, ttl_s)
      EnvKeyProvider   env://PATINOX_KEK  (no shares: see "Crypto-shredding" below)
      your KMS         (see below)

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
    0       1     format version: 0x01 KEK only, 0x02 KEK + tenant key share
    1       4     KEK version (uint32, >= 1)
    5       1     nonce length N (12 here; 0 allowed for a KMS ciphertext)
    6       N     nonce
    6+N     rest  wrapped DEK + tag                              (66 bytes for AES-GCM)

    wrapping AAD = b"patinox-dek|" + tenant_id + b"|" + str(kek_version)
    wrapping key, format 1 = KEK_v
    wrapping key, format 2 = HKDF-SHA256(ikm=KEK_v, salt=share,
                               info=b"patinox-tenant-kek|" + tenant_id + b"|" + str(v))

:class:`FileKeyProvider` writes format 2 and reads both; format 1 is what DEKs wrapped
before key shares (and every :class:`EnvKeyProvider` wrap) look like, and keeps unwrapping.

Tenant key shares: the first wrap for a tenant creates a 32-byte random share, a file
of mode 0600 in ``<key file>.tenants/`` (mode 0700; ``?shares=/dir`` in the URL or
``shares_dir=`` puts it elsewhere). It is created atomically (written aside, then
hard-linked into place: of concurrent first writers in any processes one wins and the
others read its share). It never enters the database. Every process of a deployment
must see the same share directory, as it must see the same key file (one host or a
shared file system; otherwise use a KMS provider). Shares are cached in memory per
tenant for at most ``share_ttl_s`` seconds. Back the directory up with the key file:
losing a share loses the tenant's data, exactly like losing the KEK.

Rotation and shredding:

* KEK rotation: :meth:`FileKeyProvider.rotate`, then :meth:`TenantKeyring.rewrap_all`
  re-wraps every DEK under the new KEK version, with the same tenant share; no blob
  changes. ``rewrap_all`` also upgrades format-1 DEKs to format 2 when the provider has
  shares, so a deployment from before shares becomes shreddable against backups.
* DEK rotation: :meth:`TenantKeyring.rotate_dek` makes a new version current; old
  blobs keep decrypting with the version recorded in them, until a background job
  re-encrypts them.
* Crypto-shredding: :meth:`TenantKeyring.shred` first calls the provider's
  :meth:`TenantShredding.destroy_tenant` (file provider: write a tombstone
  ``<tenant>.destroyed``, then overwrite and unlink the share, syncing the directory),
  then deletes the tenant's wrapped DEKs in the store. From then on nothing of the
  tenant decrypts, and no new DEK is ever made for it. Guarantee: this holds for
  database backups taken *earlier* too. A backup holds only format-2 wrapped DEKs; the
  KEK alone cannot open them, and the share they need is gone. (The tombstone also makes
  the provider refuse any format-1 DEK of the tenant still found in an old backup, but
  only the KEK-plus-share derivation is a cryptographic guarantee: run ``rewrap_all``
  once after upgrading so no format-1 DEK is left.) The provider goes first, so a crash
  between the two steps leaves the tenant undecryptable, never decryptable.

  Limit, stated plainly: the guarantee is only as good as your backups of the *share
  directory*. Any copy of a tenant's share (a file-system snapshot, a volume backup,
  a copy of ``kek.json.tenants/``) together with a database backup and the KEK decrypts
  that tenant again. Keep backups of the share directory no longer than the deletion
  retention you promise your tenants (e.g. "deleted data is unrecoverable after 30
  days" means share-directory backups are kept at most 30 days), or do not back it up
  separately at all. The in-place overwrite is best effort (copy-on-write and flash
  storage may keep the old blocks); unlinking and not keeping copies is what counts.
  An export bundle the operator made is the other documented exception (it is sealed
  with its own passphrase or recipient key).

  :class:`EnvKeyProvider` cannot do this: an environment variable offers no writable
  place for per-tenant material, so it has no ``destroy_tenant``, its
  ``tenant_destroyed`` is always False, it wraps in format 1, and ``shred`` falls back
  to deleting the live rows only (and logs a warning saying so). A database backup
  taken before the deletion, with that KEK, still decrypts the tenant. Use it only where
  that weaker guarantee is acceptable.

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
* Shredding against backups with a KMS: use one KMS key per tenant (created on the
  tenant's first wrap, its id kept in your configuration or derived from the tenant id;
  return wraps with ``tenant_share=True``) and implement :class:`TenantShredding`:
  ``destroy_tenant`` schedules that key for deletion (AWS ``ScheduleKeyDeletion``, GCP
  ``DestroyCryptoKeyVersion``, Azure delete + purge, Vault ``DELETE /transit/keys``)
  and records the tenant as destroyed; ``tenant_destroyed`` answers from that record.
  The per-tenant KMS key plays the role of the share, and the KMS deletion waiting
  period is the retention limit above.
* Because :class:`TenantKeyring` caches decrypted DEKs for ``ttl_s``, KMS calls happen
  once per tenant and version per ``ttl_s`` per process, not per payload. Network
  errors should surface as :class:`~patinox.errors.StorageError`-like runtime failures,
  never as :class:`DecryptionFailed`, so they are retried rather than reported as tampering.
* BYOK: a provider per tenant (the tenant's own KMS key) plugs in the same way.

Errors: :class:`DecryptionFailed` and :class:`TenantKeysDestroyed` (both
:class:`~patinox.errors.OperationFailed`, defined in :mod:`patinox.errors`).
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
    WRAPPED_FORMAT_KEK_ONLY,
    WRAPPED_FORMAT_TENANT_SHARE,
    EnvKeyProvider,
    FileKeyProvider,
    KeyProvider,
    TenantShredding,
    WrappedKey,
    dek_wrap_aad,
    key_provider_from_url,
)

__all__ = [
    "BLOB_FORMAT_VERSION",
    "BLOB_OVERHEAD",
    "DEK_BYTES",
    "WRAPPED_FORMAT_KEK_ONLY",
    "WRAPPED_FORMAT_TENANT_SHARE",
    "DataKey",
    "DecryptionFailed",
    "DekStore",
    "EnvKeyProvider",
    "FileKeyProvider",
    "InMemoryDekStore",
    "KeyProvider",
    "TenantKeyring",
    "TenantKeysDestroyed",
    "TenantShredding",
    "WrappedKey",
    "blob_key_version",
    "decrypt",
    "decrypt_str",
    "dek_wrap_aad",
    "encrypt",
    "encrypt_str",
    "key_provider_from_url",
]
