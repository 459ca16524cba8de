"""API keys: creation (secret shown once), verification, revocation.

Key format: ``ptx_<prefix>_<secret>`` where ``prefix`` is 12 random base32 characters
(stored in clear, indexed, used to find the key) and ``secret`` is 32 random bytes
(urlsafe base64). Only the SHA-256 of the whole key is stored; verification compares
digests with :func:`hmac.compare_digest` (constant time). A fast hash is right here
because keys carry 256 bits of entropy (no dictionary to attack); password hashing
(argon2/bcrypt) would only add latency to every request.

The tenant of a request comes from its key, never from a header, path or body.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Any

from patinox.errors import AuthenticationFailed, InvalidRequest, TenantSuspended
from patinox.storage import ApiKeyRecord, SqlBackend, utcnow
from patinox.tenancy import (
    TenantContext,
    TenantState,
    new_id,
)

#: Scopes a tenant key may hold.
TENANT_SCOPES = frozenset({"agents:write", "runs:write", "read"})
#: The operator scope; only operator keys (no tenant) hold it.
ADMIN_SCOPE = "admin"


@dataclass(frozen=True, kw_only=True)
class OperatorPrincipal:
    """An authenticated operator (admin) key."""

    key_id: str
    scopes: frozenset[str]


@dataclass(frozen=True, kw_only=True)
class IssuedKey:
    """A newly created key: the row (no hash) and the secret, shown this once."""

    record: ApiKeyRecord
    secret: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiKeys:
    """Create, verify and revoke API keys over the control-plane store."""

    def __init__(self, backend: SqlBackend) -> None:
        self._backend = backend

    def create(self, *, tenant_id: str | None, name: str, scopes: list[str] | None, actor: str) -> IssuedKey:
        """Issue a key for ``tenant_id`` (or an operator key when ``None``).

        Args:
            scopes: tenant keys: a subset of :data:`TENANT_SCOPES` (default: all of them);
                operator keys: ``["admin"]`` (the default).

        Raises:
            InvalidRequest: empty name or scopes not allowed for this kind of key.
            TenantNotFound: the tenant does not exist (or is deleted).
        """
        if not name or len(name) > 100:
            raise InvalidRequest("key name must be 1-100 characters", field="name")
        allowed = TENANT_SCOPES if tenant_id is not None else frozenset({ADMIN_SCOPE})
        chosen = sorted(set(scopes)) if scopes is not None else sorted(allowed)
        bad = [sc for sc in chosen if sc not in allowed]
        if bad or not chosen:
            raise InvalidRequest(
                f"scopes {bad or chosen} not allowed here; allowed: {sorted(allowed)}",
                field="scopes",
            )
        if tenant_id is not None:
            tenant = self._backend.get_tenant(tenant_id)
            if tenant["state"] not in (TenantState.ACTIVE.value, TenantState.SUSPENDED.value):
                raise InvalidRequest(f"tenant is {tenant['state']}", field="tenant_id")
        prefix = base64.b32encode(os.urandom(8)).decode().lower().rstrip("=")[:12]
        secret = f"ptx_{prefix}_{secrets.token_urlsafe(32)}"
        public: ApiKeyRecord = {
            "id": new_id("key"),
            "tenant_id": tenant_id,
            "name": name,
            "prefix": prefix,
            "scopes": chosen,
            "created_at": utcnow(),
            "revoked_at": None,
        }
        self._backend.insert_api_key({**public, "secret_hash": _digest(secret)})
        self._audit(tenant_id, actor, "key.create", public["id"], {"name": name, "scopes": chosen})
        return IssuedKey(record=public, secret=secret)

    def revoke(self, key_id: str, *, tenant_id: str | None, actor: str) -> ApiKeyRecord:
        """Revoke a key of ``tenant_id`` (operator key when ``None``).

        Raises:
            NotFound: no such key for that tenant.
        """
        row = self._backend.revoke_api_key(key_id, tenant_id)
        self._audit(tenant_id, actor, "key.revoke", key_id, {})
        return row

    def _audit(
        self, tenant_id: str | None, actor: str, action: str, target: str, detail: dict[str, Any]
    ) -> None:
        if tenant_id is None:
            self._backend.append_operator_audit(
                actor=actor, action=action, target=target, outcome="ok", detail=detail
            )
            return
        self._backend.acting_on(tenant_id).append_audit(
            actor=actor, action=action, target=target, outcome="ok", detail=detail
        )

    def authenticate(self, token: str) -> TenantContext | OperatorPrincipal:
        """Resolve a presented key to a tenant context or an operator principal.

        Raises:
            AuthenticationFailed: malformed, unknown, wrong or revoked key, or a key of a
                deleted tenant (one answer for all, so keys cannot be probed).
            TenantSuspended: a valid key of a suspended tenant.
        """
        parts = token.split("_")
        if len(parts) < 3 or parts[0] != "ptx" or len(parts[1]) != 12:
            raise AuthenticationFailed("invalid API key")
        # The principal a key resolved to is kept in the backend's cache beside the rows it
        # was built from, and emptied with them by any change (see patinox.storage._cache);
        # the secret is still compared on every request.
        cache, slot = self._backend.cache, ("principal", parts[1])
        seen = cache.epoch()
        hit = cache.get(slot, None)
        if hit is not None:
            secret_hash, principal = hit
            if not hmac.compare_digest(_digest(token), secret_hash):
                raise AuthenticationFailed("invalid API key")
            return principal  # type: ignore[no-any-return]
        resolved = self._resolve(token, parts[1])
        owner = resolved.tenant_id if isinstance(resolved, TenantContext) else None
        cache.put(owner, slot, (_digest(token), resolved), seen)
        return resolved

    def _resolve(self, token: str, prefix: str) -> TenantContext | OperatorPrincipal:
        """``authenticate`` from the key and tenant rows (read through the cache)."""
        found = self._backend.find_api_key(prefix)
        if found is None:
            # Spend the same work as a real comparison.
            hmac.compare_digest(_digest(token), _digest(""))
            raise AuthenticationFailed("invalid API key")
        key, tenant = found
        if not hmac.compare_digest(_digest(token), key["secret_hash"]) or key["revoked_at"] is not None:
            raise AuthenticationFailed("invalid API key")
        if tenant is None:
            return OperatorPrincipal(key_id=key["id"], scopes=frozenset(key["scopes"]))
        if tenant["state"] == TenantState.SUSPENDED.value:
            raise TenantSuspended("this tenant is suspended", tenant_id=tenant["id"])
        if tenant["state"] != TenantState.ACTIVE.value:
            raise AuthenticationFailed("invalid API key")
        return TenantContext.for_tenant(tenant, principal=key["id"], scopes=key["scopes"])
