"""The host side of the ``http_fetch`` tool: :class:`GuardedFetcher` makes one tenant's
fetches through the outbound-request guard (:class:`~patinox.network.OutboundGuard`),
under the tenant's egress allow-list (``egress_hosts``) and the operator's
:class:`~patinox.network.EgressSettings`.

It runs in the process that holds the run's tenant context and no tenant code: the server
or queue worker for ``namespace`` runs, the host of an execution process for the other
levels (the process asks over its channel; :mod:`patinox.isolation.process`). Nothing a
run sends chooses the policy: it is made from the run's context, which the host built.
"""

from __future__ import annotations

from patinox.agents import FetchedPage
from patinox.network import EgressSettings, OutboundGuard
from patinox.network.outbound import Resolver
from patinox.tenancy import TenantContext

__all__ = ["GuardedFetcher"]


class GuardedFetcher:
    """One tenant's ``http_fetch`` requests (a :class:`~patinox.agents.HttpFetcher`).

    Args:
        ctx: the run's tenant context (its ``limits.egress_hosts`` is the allow-list).
        settings: the operator's egress settings.
        resolver: how names are resolved (the system's by default; one answer per hop).
    """

    def __init__(
        self, ctx: TenantContext, settings: EgressSettings, resolver: Resolver | None = None
    ) -> None:
        self.tenant_id = ctx.tenant_id
        self._guard = OutboundGuard(settings.policy_for(ctx.limits.egress_hosts), resolver)

    async def fetch(self, url: str) -> FetchedPage:
        """``GET url`` through the guard.

        Raises:
            EgressRefused: the URL, its host, one of its addresses or a redirect's target is
                not allowed (``reason``: ``host_not_allowed``, ``address_not_allowed``...).
            OutboundFailed: it was allowed but failed (connection, TLS, timeout, too large).
        """
        response = await self._guard.request("GET", url)
        return FetchedPage(
            status=response.status,
            content_type=response.headers.get("content-type", ""),
            body=response.body.decode("utf-8", "replace"),
            url=response.url,
        )
