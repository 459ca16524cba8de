"""A tenant's secrets on the control plane: :class:`SecretService`.

Write-only from outside: a tenant (key scope ``secrets:write``) or the operator sets,
rotates, lists (names and dates) and deletes secrets; nothing answers a value. The value
is read only on the host side, by code acting for one of the tenant's runs or requests
(:meth:`SecretService.value`, :meth:`SecretService.provider_key`), and every such read is
audited (``secret.use``). Execution processes never receive a secret: a provider call of a
run in an execution process is made by the host (:mod:`patinox.isolation.process`), with
the key read here.

Storage, sealing and the audit records of each write are
:class:`~patinox.storage.TenantSecrets`'s.
"""

from __future__ import annotations

from patinox.errors import InvalidRequest, NotFound
from patinox.storage import PROVIDER_KEY_PREFIX, SecretInfo, SqlBackend, TenantStore
from patinox.tenancy import TenantContext

__all__ = ["RESERVED_SECRET_PREFIX", "SecretService", "provider_key_name"]

#: Names written only by :class:`patinox.control.tls.TenantTls` (validated certificate and key).
RESERVED_SECRET_PREFIX = "tls:"


def provider_key_name(model_id: str) -> str | None:
    """The secret name of a tenant's own key for ``model_id``'s provider
    (``provider:openai`` for ``openai:gpt-4o``), or ``None`` for a model without a provider
    key (the simulated model)."""
    family, sep, _ = model_id.partition(":")
    if not sep or family == "simulated":
        return None
    return PROVIDER_KEY_PREFIX + family


class SecretService:
    """Set, rotate, list and delete a tenant's secrets; read one host-side, audited.

    Args:
        backend: the deployment's control-plane store (the tenant's own store is made per call).
    """

    def __init__(self, backend: SqlBackend) -> None:
        self._backend = backend

    def _store(self, tenant: TenantContext | str) -> TenantStore:
        if isinstance(tenant, TenantContext):
            return self._backend.tenant_store(tenant)
        return self._backend.acting_on(tenant)

    def put(
        self, tenant: TenantContext | str, name: str, value: str, *, actor: str
    ) -> tuple[SecretInfo, bool]:
        """Set or rotate ``name`` of the tenant (a context, or an id for the operator).

        Returns:
            The secret's description (never its value) and whether it was a rotation.

        Raises:
            InvalidRequest: malformed name, or a value that is empty, over 64 KiB or holds NUL
                (the error never quotes the value).
            TenantNotFound: no such tenant (an id).
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
        if name.startswith(RESERVED_SECRET_PREFIX):  # tls:*: validated pairs only (control.tls)
            raise InvalidRequest(
                f"secret names starting with {RESERVED_SECRET_PREFIX!r} are reserved; "
                "set a TLS certificate with PUT /v1/tls",
                field="name",
            )
        return self._store(tenant).secrets().put(name, value, actor=actor)

    def list(self, tenant: TenantContext | str) -> list[SecretInfo]:
        """The tenant's secrets by name: names, versions and dates, never values."""
        return self._store(tenant).secrets().list()

    def delete(self, tenant: TenantContext | str, name: str, *, actor: str) -> None:
        """Delete ``name`` of the tenant. Raises :class:`~patinox.errors.NotFound`."""
        self._store(tenant).secrets().delete(name, actor=actor)

    def value(self, store: TenantStore, name: str, *, actor: str, purpose: str) -> str:
        """The value of ``name`` for host-side use by ``store``'s tenant (a header the egress
        tool adds, a TLS key, a webhook signing key); audited ``secret.use`` with ``purpose``.

        Raises:
            NotFound: no such secret.
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
        return store.secrets().value(name, actor=actor, purpose=purpose)

    def provider_key(self, store: TenantStore, model_id: str, *, actor: str) -> str | None:
        """The tenant's own provider key for ``model_id`` (BYOK: the secret
        :func:`provider_key_name` names), or ``None`` when it has none (the deployment's
        shared key is then used). A key read is audited (``secret.use``, purpose
        ``model:<model id>``); a tenant without one costs one primary-key read.

        Raises:
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
        name = provider_key_name(model_id)
        if name is None:
            return None
        secrets = store.secrets()
        if not secrets.exists(name):
            return None
        try:
            return secrets.value(name, actor=actor, purpose=f"model:{model_id}")
        except NotFound:  # deleted between the two reads: the shared key, as if never set
            return None
