"""Network isolation: what a tenant's requests may reach outside the deployment.

- :mod:`patinox.network.outbound`: the outbound-request guard (:class:`OutboundGuard`)
  every request sent on a tenant's behalf goes through (webhooks, the ``http_fetch`` tool).
- :mod:`patinox.network.egress`: the operator's egress settings (:class:`EgressSettings`)
  the ``http_fetch`` tool's policy of each tenant is made from.
"""

from patinox.network.egress import EgressSettings
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
    "EgressSettings",
    "OutboundGuard",
    "OutboundPolicy",
    "OutboundResponse",
    "Target",
    "host_allowed",
    "normal_host",
    "system_resolver",
]
