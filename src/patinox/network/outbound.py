"""The outbound-request guard: every request Patinox sends on a tenant's behalf (webhook
deliveries, the ``http_fetch`` tool) goes through :class:`OutboundGuard`.

A tenant controls the URL, so the URL is an attack on the deployment's own network until
checked (server-side request forgery). The guard:

- accepts only the policy's schemes (``https`` by default), no user-info, a host name or
  an address literal, and a host on the tenant's allow-list when the policy has one
  (``api.example.com`` exactly, ``*.example.com`` for any name below it);
- resolves the name **once** and refuses it when **any** of its addresses is not a public
  unicast address (loopback, private, link-local such as the cloud metadata service
  169.254.169.254, shared, reserved, multicast, unspecified, and IPv4-mapped IPv6 forms of
  those), unless the address lies in a range the operator allowed; ranges the operator
  denied (the deployment's own services) are refused even when public;
- connects to the address it checked, sending the host name as ``Host`` and as the TLS
  server name (SNI), and verifies the certificate against that name: a second, different
  DNS answer (DNS rebinding) never reaches the connection;
- follows redirects itself, checking each hop like the first, at most ``max_redirects``;
- caps the response body (``max_response_bytes``) and the whole exchange
  (``timeout_s``, redirects included); ignores proxy settings of the environment.

Refusals raise :class:`~patinox.errors.EgressRefused` (403 ``egress_refused``, with the
``reason``); a request that was allowed but failed (connection, TLS, timeout, too large)
raises :class:`~patinox.errors.OutboundFailed` (502 ``outbound_failed``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import httpx

from patinox.errors import EgressRefused, InvalidRequest, OutboundFailed

__all__ = [
    "Address",
    "OutboundGuard",
    "OutboundPolicy",
    "OutboundResponse",
    "Resolver",
    "Target",
    "host_allowed",
    "normal_host",
    "system_resolver",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``(host, port) -> addresses``: how names are resolved (the system's resolver by default).
Resolver = Callable[[str, int], Awaitable[list[Address]]]

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """What a tenant's outbound requests may reach.

    Args:
        allowed_hosts: host names the tenant may reach (``api.example.com`` or
            ``*.example.com``); ``None`` for any public host (webhooks: the tenant names
            its own receivers), an empty tuple for none.
        allowed_ranges: address ranges the operator allows although they are not public
            (e.g. a receiver on the deployment's private network).
        denied_ranges: address ranges refused even when public (the deployment's own
            services); they win over ``allowed_ranges``.
        schemes: URL schemes allowed (``https`` only by default).
        max_response_bytes: the largest response body read, bytes.
        timeout_s: the whole exchange's time limit, redirects included, seconds.
        max_redirects: redirects followed before the request fails.
        ca_bundle: a PEM file of the CAs to trust instead of the system's (a deployment
            with its own CA; tests with a local receiver).
    """

    allowed_hosts: tuple[str, ...] | None = None
    allowed_ranges: tuple[Network, ...] = ()
    denied_ranges: tuple[Network, ...] = ()
    schemes: frozenset[str] = frozenset({"https"})
    max_response_bytes: int = 1 << 20
    timeout_s: float = 10.0
    max_redirects: int = 5
    ca_bundle: str | None = None

    def __post_init__(self) -> None:
        if not self.schemes or not self.schemes <= {"http", "https"}:
            raise InvalidRequest(
                "outbound schemes must be among 'http' and 'https'", schemes=sorted(self.schemes)
            )
        if self.max_response_bytes < 1 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise InvalidRequest(
                "outbound limits must be positive (max_response_bytes >= 1, timeout_s > 0, "
                "max_redirects >= 0)"
            )
        for pattern in self.allowed_hosts or ():
            _check_pattern(pattern)

    @staticmethod
    def ranges(values: Iterable[str]) -> tuple[Network, ...]:
        """Parse CIDR ranges (``10.0.0.0/8``, ``fd00::/8``, or one address).

        Raises:
            InvalidRequest: a value is not an address or a range (named in ``range``).
        """
        out: list[Network] = []
        for value in values:
            try:
                out.append(ipaddress.ip_network(value.strip(), strict=False))
            except ValueError as err:
                raise InvalidRequest(f"not an address range: {value!r} ({err})", range=value) from None
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Target:
    """A checked request target: the URL as given, its host and port, and the one address
    the connection goes to."""

    url: httpx.URL
    host: str
    port: int
    address: Address


@dataclass(frozen=True, slots=True)
class OutboundResponse:
    """The final response (after redirects): ``status``, ``headers``, ``body`` (at most the
    policy's ``max_response_bytes``), the ``url`` that answered and the ``address`` it was
    reached at."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str
    address: str
    redirects: list[str] = field(default_factory=list)


async def system_resolver(host: str, port: int) -> list[Address]:
    """The host's resolver (``getaddrinfo`` in a thread): every address of ``host``.

    Raises:
        OSError: the name does not resolve.
    """
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, Address] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        text = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 zone
        seen.setdefault(text, ipaddress.ip_address(text))
    return list(seen.values())


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` (normalised: IDNA-encoded, lower case, no final dot) matches one
    of ``patterns`` (normalised the same way): ``name`` exactly, or ``*.name`` for any
    name strictly below ``name``."""
    for pattern in patterns:
        pattern = normal_host(pattern)
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


class OutboundGuard:
    """Sends requests on a tenant's behalf under an :class:`OutboundPolicy` (module
    docstring).

    Args:
        policy: what may be reached.
        resolver: resolves names (the system's by default); one call per hop.
    """

    def __init__(self, policy: OutboundPolicy, resolver: Resolver | None = None) -> None:
        self.policy = policy
        self._resolve = resolver or system_resolver
        self._ssl = _ssl_context(policy.ca_bundle)

    async def check(self, url: str | httpx.URL) -> Target:
        """Check ``url`` and resolve its host once.

        Raises:
            EgressRefused: the scheme, host or an address is not allowed (``reason``:
                ``invalid_url``, ``scheme``, ``userinfo``, ``host_not_allowed``,
                ``unresolvable``, ``address_not_allowed``).
        """
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as err:
            raise EgressRefused(f"not a valid URL: {err}", url=str(url), reason="invalid_url") from None
        shown = _shown(parsed)
        if parsed.scheme not in self.policy.schemes:
            allowed = ", ".join(sorted(self.policy.schemes))
            raise EgressRefused(
                f"scheme {parsed.scheme!r} is not allowed (allowed: {allowed})",
                url=shown,
                reason="scheme",
            )
        if parsed.userinfo:
            raise EgressRefused("URLs with user-info are not allowed", url=shown, reason="userinfo")
        host = parsed.raw_host.decode("ascii").lower().rstrip(".")  # IDNA-encoded
        if not host:
            raise EgressRefused("the URL has no host", url=shown, reason="invalid_url")
        port = parsed.port or _DEFAULT_PORTS[parsed.scheme]
        literal = _literal(host)
        if self.policy.allowed_hosts is not None and not host_allowed(host, self.policy.allowed_hosts):
            raise EgressRefused(
                f"host {host!r} is not on the tenant's allow-list",
                url=shown,
                reason="host_not_allowed",
                host=host,
            )
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = await self._resolve(host, port)
            except OSError as err:
                raise EgressRefused(
                    f"host {host!r} does not resolve: {err}", url=shown, reason="unresolvable", host=host
                ) from None
            if not addresses:
                raise EgressRefused(
                    f"host {host!r} has no address", url=shown, reason="unresolvable", host=host
                )
        for address in addresses:
            why = self.refusal(address)
            if why is not None:
                raise EgressRefused(
                    f"host {host!r} resolves to {address}, {why}",
                    url=shown,
                    reason="address_not_allowed",
                    host=host,
                    address=str(address),
                )
        return Target(url=parsed, host=host, port=port, address=addresses[0])

    def refusal(self, address: Address) -> str | None:
        """Why ``address`` may not be reached (``None``: it may). An IPv6 address that
        carries an IPv4 address a translator delivers to (IPv4-mapped, -compatible or
        -translated, NAT64, 6to4) is judged by that IPv4 address as well."""
        plain = (
            address.ipv4_mapped
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped
            else address
        )
        if isinstance(plain, ipaddress.IPv6Address):
            if any(plain in net for net in _OBSOLETE_V6):
                return "which is not a public address (an obsolete IPv6 form or site-local)"
            embedded = _embedded_ipv4(plain)
            if embedded is not None and self.refusal(embedded) is not None:
                return f"which carries {embedded}, not a public address"
        if any(plain in net for net in self.policy.denied_ranges):
            return "a range the operator denied"
        if any(plain in net for net in self.policy.allowed_ranges):
            return None
        if not plain.is_global or plain.is_multicast:
            return "which is not a public address (loopback, private, link-local or reserved)"
        return None

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> OutboundResponse:
        """Send one request, following redirects through the same checks.

        Raises:
            EgressRefused: the URL or a redirect's target is not allowed.
            OutboundFailed: it was allowed but failed (``reason``: ``connect``, ``tls``,
                ``timeout``, ``too_large``, ``too_many_redirects``, ``protocol``).
        """
        policy = self.policy
        redirects: list[str] = []
        try:
            async with asyncio.timeout(policy.timeout_s):
                async with httpx.AsyncClient(
                    verify=self._ssl, trust_env=False, follow_redirects=False, timeout=policy.timeout_s
                ) as client:
                    while True:
                        target = await self.check(url)
                        status, got, body = await self._send(client, target, method, headers, content)
                        location = got.get("location")
                        if status not in _REDIRECTS or location is None:
                            return OutboundResponse(
                                status=status,
                                headers=got,
                                body=body,
                                url=_shown(target.url),
                                address=str(target.address),
                                redirects=redirects,
                            )
                        if len(redirects) >= policy.max_redirects:
                            raise OutboundFailed(
                                f"more than {policy.max_redirects} redirects",
                                url=_shown(target.url),
                                reason="too_many_redirects",
                            )
                        url = str(target.url.join(location))
                        redirects.append(_shown(httpx.URL(url)))
                        if status == 303 or (status in (301, 302) and method.upper() == "POST"):
                            method, content = "GET", None
        except TimeoutError:
            raise OutboundFailed(
                f"no complete answer within {policy.timeout_s} s", url=_shown_text(url), reason="timeout"
            ) from None

    async def _send(
        self,
        client: httpx.AsyncClient,
        target: Target,
        method: str,
        headers: Mapping[str, str] | None,
        content: bytes | None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One hop to the checked address: ``(status, headers, body)``."""
        url = target.url.copy_with(host=str(target.address))
        sent = httpx.Headers(headers or {})
        # The body is read raw (a compressed one could not be capped by its expanded size),
        # so ask for it uncompressed: httpx's default Accept-Encoding would get gzip bytes.
        sent["accept-encoding"] = "identity"
        default = _DEFAULT_PORTS[target.url.scheme]
        sent["host"] = target.host if target.port == default else f"{target.host}:{target.port}"
        extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
        request = client.build_request(method, url, headers=sent, content=content, extensions=extensions)
        shown = _shown(target.url)
        cap = self.policy.max_response_bytes
        try:
            response = await client.send(request, stream=True)
            try:
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > cap:
                        raise OutboundFailed(
                            f"the response is larger than {cap} bytes",
                            url=shown,
                            reason="too_large",
                            limit=cap,
                        )
            finally:
                await response.aclose()
        except httpx.ConnectError as err:
            tls = isinstance(err.__context__, ssl.SSLError) or "SSL" in str(err) or "certificate" in str(err)
            raise OutboundFailed(
                f"could not {'establish TLS with' if tls else 'connect to'} {shown}: {err}",
                url=shown,
                reason="tls" if tls else "connect",
            ) from None
        except httpx.TimeoutException:
            raise OutboundFailed(
                f"no complete answer within {self.policy.timeout_s} s", url=shown, reason="timeout"
            ) from None
        except httpx.HTTPError as err:
            raise OutboundFailed(
                f"the exchange with {shown} failed: {err}", url=shown, reason="protocol"
            ) from None
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}, bytes(body)


def normal_host(name: str) -> str:
    """``name`` as hosts are compared: IDNA-encoded (``bücher.example`` ->
    ``xn--bcher-kva.example``), lower case, without a final dot; a ``*.`` prefix is kept.

    Raises:
        InvalidRequest: ``name`` is not a host name.
    """
    wild = name.startswith("*.")
    bare = name[2:] if wild else name
    try:
        encoded = httpx.URL(f"https://{bare}/").raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, ValueError) as err:
        raise InvalidRequest(f"not a host name: {name!r} ({err})", host=name) from None
    return ("*." if wild else "") + encoded.lower().rstrip(".")


@functools.lru_cache(maxsize=16)
def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The client TLS context trusting ``ca_bundle`` (the system's CAs when ``None``), made
    once per bundle and process: loading the system's CAs takes tens of milliseconds, and
    a context serves any number of connections (a changed bundle file is read at restart)."""
    context = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


#: IPv6 ranges refused outright: IPv4-compatible (``::a.b.c.d``, RFC 4291),
#: IPv4-translated (``::ffff:0:a.b.c.d``, RFC 2765) and site-local (RFC 3879) addresses.
_OBSOLETE_V6: Final = (
    ipaddress.IPv6Network("::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("fec0::/10"),
)
#: Translation prefixes whose last 32 bits are the IPv4 address reached (NAT64, RFC 6052
#: and RFC 8215).
_NAT64: Final = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a NAT64 or 6to4 (RFC 3056) relay would deliver ``address`` to."""
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _shown(url: httpx.URL) -> str:
    """The URL without user-info or query (neither belongs in an error or a log)."""
    return str(url.copy_with(userinfo=b"", query=None, fragment=None))


def _shown_text(url: str) -> str:
    """:func:`_shown` of a URL given as text (``""`` when it does not parse)."""
    try:
        return _shown(httpx.URL(url))
    except (httpx.InvalidURL, TypeError, ValueError):
        return ""


def _check_pattern(pattern: str) -> None:
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if not name or any(c in name for c in "*/:@ ?#[]\\"):
        raise InvalidRequest(f"not a host name or '*.name' pattern: {pattern!r}", allowed_host=pattern)
    normal_host(pattern)
