"""The deployment's egress settings: what the operator allows or denies every tenant's
``http_fetch`` requests on top of each tenant's own allow-list (``egress_hosts`` in its
layered configuration).

A tenant names the hosts it may reach; only the operator can open an address range the
guard refuses by default (loopback, private, link-local such as 169.254.169.254, ...) or
close a public one (the deployment's own services). :meth:`EgressSettings.policy_for`
makes the :class:`~patinox.network.outbound.OutboundPolicy` of one tenant.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from patinox.errors import ConfigurationError, InvalidRequest
from patinox.network.outbound import Network, OutboundPolicy

__all__ = ["EgressSettings"]


@dataclass(frozen=True, kw_only=True)
class EgressSettings:
    """The operator's egress settings (``PATINOX_EGRESS_*``, :meth:`from_env`).

    Attributes:
        allowed_ranges: address ranges the guard lets through although they are not
            public (``PATINOX_EGRESS_ALLOWED_RANGES``, comma-separated CIDR ranges).
        denied_ranges: ranges refused even when public (``PATINOX_EGRESS_DENIED_RANGES``).
        schemes: URL schemes allowed (``PATINOX_EGRESS_SCHEMES``, default ``https``).
        max_response_bytes: the largest response body a fetch reads, bytes
            (``PATINOX_EGRESS_MAX_BYTES``, default 1 MiB).
        timeout_s: one fetch's time limit, redirects included, seconds
            (``PATINOX_EGRESS_TIMEOUT_S``, default 10).
        max_redirects: redirects a fetch follows, each checked like the first.
        ca_bundle: a PEM file of the CAs to trust instead of the system's
            (``PATINOX_EGRESS_CA_BUNDLE``).
    """

    allowed_ranges: tuple[Network, ...] = ()
    denied_ranges: tuple[Network, ...] = ()
    schemes: frozenset[str] = frozenset({"https"})
    max_response_bytes: int = 1 << 20
    timeout_s: float = 10.0
    max_redirects: int = 5
    ca_bundle: str | None = None

    def policy_for(self, egress_hosts: Iterable[str]) -> OutboundPolicy:
        """The outbound policy of a tenant whose allow-list is ``egress_hosts`` (an empty
        list reaches nothing).

        Raises:
            InvalidRequest: a setting the guard refuses (a scheme, a limit).
        """
        return OutboundPolicy(
            allowed_hosts=tuple(egress_hosts),
            allowed_ranges=self.allowed_ranges,
            denied_ranges=self.denied_ranges,
            schemes=self.schemes,
            max_response_bytes=self.max_response_bytes,
            timeout_s=self.timeout_s,
            max_redirects=self.max_redirects,
            ca_bundle=self.ca_bundle,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EgressSettings:
        """The settings from ``PATINOX_EGRESS_*`` variables (see the attributes).

        Raises:
            ConfigurationError: a variable that is not a range, scheme or number.
        """
        env = os.environ if env is None else env

        def listed(name: str) -> list[str]:
            return [v.strip() for v in (env.get(name) or "").split(",") if v.strip()]

        try:
            settings = cls(
                allowed_ranges=OutboundPolicy.ranges(listed("PATINOX_EGRESS_ALLOWED_RANGES")),
                denied_ranges=OutboundPolicy.ranges(listed("PATINOX_EGRESS_DENIED_RANGES")),
                schemes=frozenset(s.lower() for s in listed("PATINOX_EGRESS_SCHEMES"))
                or frozenset({"https"}),
                max_response_bytes=int(env.get("PATINOX_EGRESS_MAX_BYTES") or 1 << 20),
                timeout_s=float(env.get("PATINOX_EGRESS_TIMEOUT_S") or 10.0),
                ca_bundle=env.get("PATINOX_EGRESS_CA_BUNDLE") or None,
            )
            settings.policy_for(())  # the guard's own checks of schemes and limits
        except (InvalidRequest, ValueError) as err:
            raise ConfigurationError(f"egress settings (PATINOX_EGRESS_*): {err}") from None
        return settings
