"""API keys: creation (secret shown once), verification, revocation.

Key format: ``ptx_<prefix>_<secret>`` where ``prefix`` is 12 random base32 characters
(stored in clear, indexed, used to find the key) and ``secret`` is 32 random bytes
(urlsafe base64). Only the SHA-256 of the whole key is stored; verification compares
digests with :func:`hmac.compare_digest` (constant time). A fast hash is right here
because keys carry 256 bits of entropy (no dictionary to attack); password hashing
(argon2/bcrypt) would only add latency to every request.

The tenant of a request comes from its key, never from a header, path or body.

A key may expire (``expires_at``); rotation issues a new key with the old one's name and
scopes and lets the old one live on for an overlap. The time a key was last used is
recorded at most once a minute per key and process, by a write that empties no cache.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from patinox.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    TenantSuspended,
)
from patinox.storage import ApiKeyRecord, SqlBackend, utcnow
from patinox.tenancy import (
    TenantContext,
    TenantState,
    new_id,
)

#: Scopes a tenant key may hold: ``keys:write`` manages the tenant's own keys (never with
#: more scopes than the key doing it); ``secrets:write`` and ``config:write`` are for the
#: tenant's secrets and configuration; ``webhooks:write`` registers, rotates and deletes
#: its webhook endpoints (reading them takes ``read``).
TENANT_SCOPES = frozenset(
    {"agents:write", "runs:write", "read", "keys:write", "secrets:write", "config:write", "webhooks:write"}
)
#: Scopes a tenant key gets when none are asked for.
DEFAULT_TENANT_SCOPES = frozenset({"agents:write", "runs:write", "read"})
#: Seconds between two records of one key's last use (per process).
LAST_USED_EVERY_S = 60.0
#: Longest overlap a rotation may give the old key, seconds (30 days).
MAX_OVERLAP_S = 30 * 86_400
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
        self._last_touch: dict[str, float] = {}  # key id -> monotonic time of its last record

    def create(
        self,
        *,
        tenant_id: str | None,
        name: str,
        scopes: list[str] | None,
        actor: str,
        expires_at: datetime | None = None,
        within: frozenset[str] | None = None,
        by_key: str | None = None,
    ) -> IssuedKey:
        """Issue a key for ``tenant_id`` (or an operator key when ``None``).

        Args:
            scopes: tenant keys: a subset of :data:`TENANT_SCOPES` (default:
                :data:`DEFAULT_TENANT_SCOPES`); operator keys: ``["admin"]`` (the default).
            expires_at: when it stops working (UTC, in the future); ``None``: never.
            within: the scopes of the tenant key creating it (``None``: the operator); the
                new key may hold no scope outside them.
            by_key: the id of the tenant key creating it (``None``: the operator); when
                that key expires, the new key expires no later (without ``expires_at`` it
                gets the same expiry), so a short-lived key cannot mint a lasting one.

        Raises:
            InvalidRequest: empty name, scopes not allowed for this kind of key, or an
                expiry not in the future.
            PermissionDenied: a scope the creating key does not hold itself, or an expiry
                later than the creating key's.
            TenantNotFound: the tenant does not exist (or is deleted).
        """
        if not name or len(name) > 100:
            raise InvalidRequest("key name must be 1-100 characters", field="name")
        allowed = TENANT_SCOPES if tenant_id is not None else frozenset({ADMIN_SCOPE})
        default = DEFAULT_TENANT_SCOPES if tenant_id is not None else allowed
        if within is not None:
            default = default & within
        chosen = sorted(set(scopes)) if scopes is not None else sorted(default)
        bad = [sc for sc in chosen if sc not in allowed]
        if bad or not chosen:
            raise InvalidRequest(
                f"scopes {bad or chosen} not allowed here; allowed: {sorted(allowed)}",
                field="scopes",
            )
        beyond = sorted(set(chosen) - within) if within is not None else []
        if beyond:
            raise PermissionDenied(
                f"a key cannot create a key with scopes it does not hold: {beyond}", scopes=beyond
            )
        now = utcnow()
        if expires_at is not None and expires_at <= now:
            raise InvalidRequest("expires_at must be in the future", field="expires_at")
        if by_key is not None and tenant_id is not None:
            ends = self._backend.get_api_key(by_key, tenant_id)["expires_at"]
            if ends is not None and expires_at is not None and expires_at > ends:
                raise PermissionDenied(
                    f"a key cannot create a key that outlives it (expires_at after {ends.isoformat()})",
                    expires_at=ends.isoformat(),
                )
            expires_at = expires_at if ends is None or expires_at is not None else ends
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
            "created_at": now,
            "revoked_at": None,
            "expires_at": expires_at,
            "last_used_at": None,
        }
        self._backend.insert_api_key({**public, "secret_hash": _digest(secret)})
        detail: dict[str, Any] = {"name": name, "scopes": chosen}
        if expires_at is not None:
            detail["expires_at"] = expires_at.isoformat()
        self._audit(tenant_id, actor, "key.create", public["id"], detail)
        return IssuedKey(record=public, secret=secret)

    def rotate(
        self,
        key_id: str,
        *,
        tenant_id: str | None,
        actor: str,
        overlap_s: float = 3600.0,
        expires_at: datetime | None = None,
        within: frozenset[str] | None = None,
        by_key: str | None = None,
    ) -> IssuedKey:
        """Replace a live key: a new key with its name and scopes (and ``expires_at``), and
        the old one working ``overlap_s`` seconds more (0: it stops now; never later than
        it would have).

        Raises:
            NotFound: not a live key of ``tenant_id``.
            InvalidRequest: ``overlap_s`` outside 0-30 days, or a past ``expires_at``.
            PermissionDenied: the rotating key holds fewer scopes than the rotated one.
        """
        if not 0 <= overlap_s <= MAX_OVERLAP_S:
            raise InvalidRequest(f"overlap_s must be 0-{MAX_OVERLAP_S} seconds", field="overlap_s")
        old = self._backend.get_api_key(key_id, tenant_id)
        if old["revoked_at"] is not None:
            raise NotFound(f"api key {key_id!r} not found", key_id=key_id)
        issued = self.create(
            tenant_id=tenant_id,
            name=old["name"],
            scopes=old["scopes"],
            actor=actor,
            expires_at=expires_at,
            within=within,
            by_key=by_key,
        )
        ends = utcnow() + timedelta(seconds=overlap_s)
        self._backend.expire_api_key(key_id, tenant_id, ends)
        self._audit(
            tenant_id,
            actor,
            "key.rotate",
            key_id,
            {"new_key_id": issued.record["id"], "old_key_expires_at": ends.isoformat()},
        )
        return issued

    def keys_of(self, tenant_id: str | None) -> list[ApiKeyRecord]:
        """The keys of ``tenant_id`` (operator keys when ``None``), oldest first, without
        secrets or hashes, revoked and expired ones included."""
        return self._backend.list_api_keys(tenant_id)

    def revoke(
        self, key_id: str, *, tenant_id: str | None, actor: str, within: frozenset[str] | None = None
    ) -> ApiKeyRecord:
        """Revoke a key of ``tenant_id`` (operator key when ``None``).

        Args:
            within: the scopes of the tenant key revoking it (``None``: the operator); a
                key holding a scope outside them is not its to revoke.

        Raises:
            NotFound: no such key for that tenant.
            PermissionDenied: the key holds a scope the revoking key does not.
        """
        if within is not None:
            target = self._backend.get_api_key(key_id, tenant_id)
            beyond = sorted(set(target["scopes"]) - within)
            if beyond:
                raise PermissionDenied(
                    f"a key cannot revoke a key with scopes it does not hold: {beyond}", scopes=beyond
                )
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
            secret_hash, principal, expires_at = hit
            if not hmac.compare_digest(_digest(token), secret_hash):
                raise AuthenticationFailed("invalid API key")
        else:
            principal, expires_at = self._resolve(token, parts[1])
            owner = principal.tenant_id if isinstance(principal, TenantContext) else None
            cache.put(owner, slot, (_digest(token), principal, expires_at), seen)
        if expires_at is not None and utcnow() >= expires_at:
            raise AuthenticationFailed("invalid API key")
        self._touch(principal.principal if isinstance(principal, TenantContext) else principal.key_id)
        return principal  # type: ignore[no-any-return]

    def _touch(self, key_id: str) -> None:
        """Record the key's use, at most once every :data:`LAST_USED_EVERY_S` seconds."""
        now = time.monotonic()
        last = self._last_touch.get(key_id)
        if last is not None and now - last < LAST_USED_EVERY_S:
            return
        self._last_touch[key_id] = now
        self._backend.touch_api_key(key_id, utcnow())

    def _resolve(self, token: str, prefix: str) -> tuple[TenantContext | OperatorPrincipal, datetime | None]:
        """``authenticate`` from the key and tenant rows (read through the cache): the
        principal and the key's expiry."""
        found = self._backend.find_api_key(prefix)
        if found is None:
            # Spend the same work as a real comparison.
            hmac.compare_digest(_digest(token), _digest(""))
            raise AuthenticationFailed("invalid API key")
        key, tenant = found
        if not hmac.compare_digest(_digest(token), key["secret_hash"]) or key["revoked_at"] is not None:
            raise AuthenticationFailed("invalid API key")
        expires_at = key.get("expires_at")
        if tenant is None:
            return OperatorPrincipal(key_id=key["id"], scopes=frozenset(key["scopes"])), expires_at
        if tenant["state"] == TenantState.SUSPENDED.value:
            raise TenantSuspended("this tenant is suspended", tenant_id=tenant["id"])
        if tenant["state"] != TenantState.ACTIVE.value:
            raise AuthenticationFailed("invalid API key")
        return TenantContext.for_tenant(tenant, principal=key["id"], scopes=key["scopes"]), expires_at
