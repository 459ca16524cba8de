"""Tenant endpoints: the host names each tenant is reached at.

With a base domain configured (``Settings.base_domain``, ``PATINOX_BASE_DOMAIN``), a tenant
is reached at ``<slug>.<base domain>`` and at the custom domains the operator gave it; the
deployment's **base host** (the base domain itself and ``Settings.base_hosts``) answers
every tenant and is the only one that answers the operator's ``/admin`` routes. Without a
base domain there are no tenant host names and every host answers as the base does.

- A tenant's **slug** is its name when it is created (its name with a few characters of its
  id when that slug is held or quarantined), a DNS label of lower-case letters, digits and
  ``-`` (no ``xn--`` or other ``??--`` prefix, which IDNA reserves: a punycode slug could
  spell a look-alike of another tenant's). The operator may change it.
- **Custom domains** are set by the operator only (``PUT /admin/tenants/{id}/endpoint``),
  IDNA-encoded (UTS 46) and lower case; never the base domain or a name below it.
- A name a tenant no longer holds (changed, or the tenant deleted) is **quarantined** for
  ``Settings.host_quarantine_s`` (30 days by default) before another tenant may claim it,
  so a new tenant cannot inherit a deleted one's host name and its clients' traffic.
- Request host names are compared after the same normalisation (port and final dot
  stripped, IDNA, lower case); one that does not normalise, or names nobody, matches no
  tenant (:meth:`TenantEndpoints.locate`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import idna
from pydantic import BaseModel, ConfigDict, Field

from patinox.control.tenants import TenantEvent
from patinox.errors import AlreadyExists, ConfigurationError, InvalidRequest
from patinox.storage import SqlBackend, TenantHosts, utcnow

__all__ = [
    "DEFAULT_HOST_QUARANTINE_S",
    "EndpointUpdate",
    "HostMatch",
    "TenantEndpoint",
    "TenantEndpoints",
    "check_slug",
    "normal_domain",
    "normal_request_host",
]

#: How long a released host name is held back from other tenants, seconds (30 days).
DEFAULT_HOST_QUARANTINE_S = 30 * 86_400.0

_SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def check_slug(value: str) -> str:
    """``value`` if it is a valid slug (module docstring).

    Raises:
        InvalidRequest: it is not (field ``slug``).
    """
    if _SLUG.fullmatch(value) is None or value[2:4] == "--":
        raise InvalidRequest(
            f"not a slug: {value!r}; use 1-63 lower-case letters, digits and '-', starting and ending "
            "with a letter or digit, without '--' in the third and fourth places",
            field="slug",
        )
    return value


def _idna(name: str) -> str:
    """``name`` IDNA-encoded (UTS 46 mapping), lower case, without a final dot.

    Raises:
        ValueError: not a host name.
    """
    bare = name.strip().rstrip(".")
    if not bare or len(bare) > 253:
        raise ValueError(f"not a host name: {name!r}")
    try:
        return idna.encode(bare, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as err:
        raise ValueError(f"not a host name: {name!r} ({err})") from None


def normal_domain(value: str, base_domain: str | None) -> str:
    """A custom domain as stored: IDNA-encoded, lower case, at least two labels, neither the
    base domain nor below it (those are slugs).

    Raises:
        InvalidRequest: not such a name (field ``domains``).
    """
    try:
        name = _idna(value)
    except ValueError as err:
        raise InvalidRequest(str(err), field="domains") from None
    if "." not in name:
        raise InvalidRequest(f"a custom domain needs at least two labels: {value!r}", field="domains")
    if base_domain is not None and (name == base_domain or name.endswith("." + base_domain)):
        raise InvalidRequest(
            f"{value!r} is the base domain or below it; set the tenant's slug instead", field="domains"
        )
    return name


def normal_request_host(value: str) -> str | None:
    """A request's ``Host`` as compared: port and final dot stripped, IDNA-encoded, lower
    case; ``None`` when it does not normalise (never a match)."""
    host = value.strip()
    if host.startswith("["):  # an IPv6 literal
        end = host.find("]")
        return host[: end + 1].lower() if end > 0 else None
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        return _idna(host)
    except ValueError:
        return None


class EndpointUpdate(BaseModel):
    """The operator's change of a tenant's endpoint; an omitted field stays."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str | None = Field(default=None, max_length=63, description="the tenant's DNS label")
    domains: list[str] | None = Field(
        default=None, max_length=50, description="custom domains (the whole list; [] removes them all)"
    )


class TenantEndpoint(BaseModel):
    """Where a tenant is reached.

    Attributes:
        tenant_id: the tenant.
        slug: its slug (``None``: none yet, a tenant made before endpoints existed).
        domains: its custom domains (IDNA-encoded).
        hosts: every host name it answers on (``<slug>.<base domain>`` and the domains);
            empty without a base domain.
        base_domain: the deployment's base domain (``None``: tenant endpoints are off).
    """

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    slug: str | None
    domains: list[str]
    hosts: list[str]
    base_domain: str | None


@dataclass(frozen=True, slots=True)
class HostMatch:
    """What a request's host name is: the base host (``base``), a tenant's (``tenant_id``),
    or neither (both false/``None``)."""

    base: bool
    tenant_id: str | None = None


class TenantEndpoints:
    """Tenants' slugs and custom domains, and which tenant a host name belongs to.

    Args:
        backend: the control-plane store.
        base_domain: the deployment's base domain (``None``: endpoints off).
        base_hosts: other names of the base host (``localhost``, an address...).
        quarantine_s: how long a released name is held back, seconds.

    Raises:
        ConfigurationError: ``base_domain`` or a base host is not a host name.
    """

    def __init__(
        self,
        backend: SqlBackend,
        *,
        base_domain: str | None = None,
        base_hosts: tuple[str, ...] = (),
        quarantine_s: float = DEFAULT_HOST_QUARANTINE_S,
    ) -> None:
        self._backend = backend
        self._hosts = TenantHosts(backend)
        self.quarantine = timedelta(seconds=quarantine_s)
        try:
            self.base_domain = _idna(base_domain) if base_domain else None
            names = {normal_request_host(h) or _idna(h) for h in base_hosts}
        except ValueError as err:
            raise ConfigurationError(f"PATINOX_BASE_DOMAIN / PATINOX_BASE_HOSTS: {err}") from None
        self.base_hosts = frozenset(names | ({self.base_domain} if self.base_domain else set()))

    @property
    def enabled(self) -> bool:
        """Whether tenant host names exist (a base domain is configured)."""
        return self.base_domain is not None

    def on_tenant_event(self, tenant_id: str, event: TenantEvent) -> None:
        """A tenant listener: a new tenant gets its slug (:meth:`assign_default_slug`)."""
        if event is TenantEvent.CREATED:
            self.assign_default_slug(tenant_id)

    def assign_default_slug(self, tenant_id: str) -> str:
        """Give the tenant its name as slug, or, when that is held or quarantined, its name
        with the last 8 characters of its id. Returns the slug.

        Raises:
            TenantNotFound: no such tenant.
            AlreadyExists: both are taken (not expected: ids are unique).
        """
        name = str(self._backend.get_tenant(tenant_id)["name"])
        suffix = tenant_id.rsplit("_", 1)[-1][-8:].lower()
        candidates = [name, f"{name[: 62 - len(suffix)].rstrip('-')}-{suffix}"]
        for slug in candidates:
            if _SLUG.fullmatch(slug) is None or slug[2:4] == "--":
                continue
            try:
                self._hosts.replace(tenant_id, {"slug": [slug]}, now=utcnow(), quarantine=self.quarantine)
            except AlreadyExists:
                continue
            return slug
        raise AlreadyExists(f"no free slug for tenant {tenant_id!r}", tenant_id=tenant_id)

    def get(self, tenant_id: str) -> TenantEndpoint:
        """The tenant's endpoint.

        Raises:
            TenantNotFound: no such tenant (also once deleted).
        """
        self._backend.get_tenant(tenant_id)
        held = self._hosts.held_by(tenant_id)
        slug = next((h.name for h in held if h.kind == "slug"), None)
        domains = [h.name for h in held if h.kind == "domain"]
        hosts: list[str] = []
        if self.base_domain is not None:
            hosts = ([f"{slug}.{self.base_domain}"] if slug else []) + domains
        return TenantEndpoint(
            tenant_id=tenant_id, slug=slug, domains=domains, hosts=hosts, base_domain=self.base_domain
        )

    def update(self, tenant_id: str, change: EndpointUpdate, *, actor: str) -> TenantEndpoint:
        """Change the tenant's slug and/or custom domains (the operator only); each name
        given up is quarantined. Audited (``tenant.endpoint``).

        Raises:
            TenantNotFound: no such tenant.
            InvalidRequest: a slug or domain that is not valid (field ``slug``/``domains``).
            AlreadyExists: a name another tenant holds or released less than the quarantine
                ago (fields ``host``, ``held_until``); nothing was changed.
        """
        self._backend.get_tenant(tenant_id)
        slug = check_slug(change.slug) if change.slug is not None else None
        domains = (
            [normal_domain(d, self.base_domain) for d in change.domains]
            if change.domains is not None
            else None
        )
        names: dict[str, list[str]] = {}
        if slug is not None:
            names["slug"] = [slug]
        if domains is not None:
            names["domain"] = domains
        if not names:
            raise InvalidRequest("nothing to update: give slug and/or domains")
        self._hosts.replace(tenant_id, names, now=utcnow(), quarantine=self.quarantine)
        self._backend.append_operator_audit(
            actor=actor,
            action="tenant.endpoint",
            target=tenant_id,
            outcome="ok",
            detail={"slug": slug, "domains": domains},
        )
        return self.get(tenant_id)

    def locate(self, host: str | None) -> HostMatch:
        """What the request host ``host`` (a ``Host`` header, maybe with a port) is. With
        endpoints off every host is the base host."""
        if self.base_domain is None:
            return HostMatch(base=True)
        name = normal_request_host(host) if host else None
        if name is None:
            return HostMatch(base=False)
        if name in self.base_hosts:
            return HostMatch(base=True)
        suffix = "." + self.base_domain
        if name.endswith(suffix):
            label = name[: -len(suffix)]
            if "." in label or _SLUG.fullmatch(label) is None or label[2:4] == "--":
                return HostMatch(base=False)
            return HostMatch(base=False, tenant_id=self._hosts.owner_of(label, "slug"))
        return HostMatch(base=False, tenant_id=self._hosts.owner_of(name, "domain"))
