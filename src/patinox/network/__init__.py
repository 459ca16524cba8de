"""Network isolation: what a tenant's requests may reach outside the deployment.

- :mod:`patinox.network.outbound`: the outbound-request guard (:class:`OutboundGuard`)
  every request sent on a tenant's behalf goes through (webhooks, the ``http_fetch`` tool).
"""

from patinox.network.outbound import (
    OutboundGuard,
    OutboundPolicy,
    OutboundResponse,
    Target,
    host_allowed,
    normal_host,
    system_resolver,
)

__all__ = [
    "OutboundGuard",
    "OutboundPolicy",
    "OutboundResponse",
    "Target",
    "host_allowed",
    "normal_host",
    "system_resolver",
]
