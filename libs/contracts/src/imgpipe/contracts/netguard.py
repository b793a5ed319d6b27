"""The SSRF guard behind `outbound_client`: which URLs and addresses imgpipe may reach.

Three layers, all fed by one `Guard`:

- `Guard.check_url` (static, per request and per redirect hop): only http and https, no
  credentials in the URL, and a host that is written as an address (in any spelling:
  `2130706433`, `0177.0.0.1`, `0x7f.1`, `[::ffff:127.0.0.1]`, ...) or named `localhost`
  must be an allowed address.
- `GuardedResolver` (at connect time, for names): resolve the host once and refuse it if
  any resolved address is refused. The connector connects to exactly the addresses it
  returns, and caches them, so DNS rebinding cannot swap the address between the check
  and the connection.
- `checked_socket` (at dial time, for every connection): the address the socket is about
  to connect to, whether it came from a name or from an IP literal in the URL, which the
  connector dials without asking the resolver.

References: OWASP SSRF Prevention Cheat Sheet (resolve, check every answer, re-check on
redirect, allow only http(s)) and imgproxy's dial-time source address checks.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# A policy names why an address is refused, or returns None to allow it.
AddressPolicy = Callable[[IPAddress], str | None]
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

ALLOWED_SCHEMES = frozenset({"http", "https"})


class URLRefused(httpx.RequestError):
    """An outbound URL the SSRF guard will not fetch; callers report it as `url_refused`."""

    code = "url_refused"

    def __init__(self, reason: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(reason, request=request)
        self.reason = reason


# --- which addresses are refused -------------------------------------------------------

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Most specific first; anything not listed still has to be `is_global` (and, for IPv6,
# inside 2000::/3, the global unicast space).
_IPV4_REFUSED: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/8"), "unspecified"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("100.64.0.0/10"), "shared address space (carrier-grade NAT)"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link-local"),  # cloud metadata: 169.254.169.254
    (_V4("192.0.0.0/24"), "reserved (IETF protocol assignments)"),
    (_V4("192.0.2.0/24"), "reserved (documentation)"),
    (_V4("198.51.100.0/24"), "reserved (documentation)"),
    (_V4("203.0.113.0/24"), "reserved (documentation)"),
    (_V4("192.88.99.0/24"), "reserved (6to4 relay anycast)"),
    (_V4("198.18.0.0/15"), "reserved (benchmarking)"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("240.0.0.0/4"), "reserved"),
)

_IPV6_REFUSED: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("64:ff9b:1::/48"), "private (local-use NAT64)"),
    # Teredo hides the client address (XOR-obfuscated); no image host needs it.
    (_V6("2001::/32"), "reserved (Teredo)"),
    (_V6("2001:db8::/32"), "reserved (documentation)"),
    (_V6("3fff::/20"), "reserved (documentation)"),
    (_V6("100::/64"), "reserved (discard-only)"),
    (_V6("fc00::/7"), "private (unique local)"),
    (_V6("fec0::/10"), "private (site-local)"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("ff00::/8"), "multicast"),
)
_IPV6_GLOBAL_UNICAST = _V6("2000::/3")
_NAT64 = _V6("64:ff9b::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that traffic to `address` really reaches, for the embeddings that
    route to it: IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::a.b.c.d) and 6to4 (2002::)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def address_refusal(address: IPAddress) -> str | None:
    """Why `address` is refused by the default policy ("loopback", "private", ...), or None."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            reason = address_refusal(inner)
            return f"{reason} (embeds IPv4 {inner})" if reason else None
        for network, reason in _IPV6_REFUSED:
            if address in network:
                return reason
        if address not in _IPV6_GLOBAL_UNICAST or not address.is_global:
            return "reserved"
        return None
    for network4, reason in _IPV4_REFUSED:
        if address in network4:
            return reason
    return None if address.is_global else "reserved"


def allow_all(address: IPAddress) -> str | None:
    """The policy under IMGPIPE_ALLOW_PRIVATE_URLS=true: every address may be reached."""
    return None


def policy_for(allow_private: bool) -> AddressPolicy:
    return allow_all if allow_private else address_refusal


# --- how hosts are written ---------------------------------------------------------------

_HOSTNAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class _NotAnAddress(ValueError):
    pass


def parse_ipv4_legacy(host: str) -> ipaddress.IPv4Address | None:
    """An IPv4 host in any spelling that resolvers and browsers accept (the WHATWG URL IPv4
    parser, which matches inet_aton): 1 to 4 parts, each decimal, octal (leading 0) or hex
    (0x), the last part filling the remaining bytes, an optional trailing dot. None when
    the host is a name; _NotAnAddress when it looks numeric but is not a valid address."""
    parts = host.lower().removesuffix(".").split(".")
    if not _NUMERIC_LABEL.match(parts[-1]):
        return None  # a name such as images.example.com
    if len(parts) > 4 or any(not _NUMERIC_LABEL.match(part) for part in parts):
        raise _NotAnAddress(f"{host!r} is not a valid IPv4 address")
    numbers = [_parse_ipv4_number(part, host) for part in parts]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise _NotAnAddress(f"{host!r} is not a valid IPv4 address")
    value = last + sum(n << (8 * (3 - i)) for i, n in enumerate(head))
    return ipaddress.IPv4Address(value)


def _parse_ipv4_number(part: str, host: str) -> int:
    try:
        if part.startswith("0x"):
            return int(part[2:] or "0", 16)
        if len(part) > 1 and part.startswith("0"):
            return int(part[1:], 8)
        return int(part)
    except ValueError:
        raise _NotAnAddress(f"{host!r} is not a valid IPv4 address") from None


def host_address(host: str) -> IPAddress | None:
    """The address a URL host is written as (IPv6 literal or any IPv4 spelling), or None
    for a name. Raises _NotAnAddress for a host that is neither a valid address nor a name."""
    if ":" in host:
        try:  # httpx keeps the zone id percent-encoded: fe80::1%25eth0
            return ipaddress.IPv6Address(host.strip("[]").replace("%25", "%", 1))
        except ValueError:
            raise _NotAnAddress(f"{host!r} is not a valid IPv6 address") from None
    address = parse_ipv4_legacy(host)
    if address is None and not _HOSTNAME.match(host.lower()):
        raise _NotAnAddress(f"{host!r} is not a valid host name")
    return address


def _is_localhost_name(host: str) -> bool:
    name = host.lower().removesuffix(".")
    return name == "localhost" or name.endswith(".localhost")  # RFC 6761: always loopback


def _describe(address: IPAddress, written: str) -> str:
    spelled = "" if written.strip("[]").lower() == str(address) else f" (written {written})"
    return f"address {address}{spelled}"


# --- the guard -------------------------------------------------------------------------


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for `host`, in its order (off the loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True)
class Guard:
    """What outbound requests may reach: an address policy and the resolver to ask."""

    policy: AddressPolicy = address_refusal
    resolver: Resolver = system_resolver

    @classmethod
    def for_settings(cls, allow_private: bool) -> Guard:
        return cls(policy=policy_for(allow_private))

    def check_url(self, url: httpx.URL) -> None:
        """The static rules, for every request and every redirect hop."""
        if not url.scheme:  # e.g. httpx reads file:///etc/passwd as a relative URL
            raise URLRefused("a URL without a scheme is not allowed: only http, https")
        if url.scheme not in ALLOWED_SCHEMES:
            raise URLRefused(f"scheme {url.scheme!r} is not allowed: only http, https")
        if url.userinfo:
            raise URLRefused("credentials in the URL are not allowed")
        self.check_host(url.raw_host.decode("ascii"))

    def check_host(self, host: str) -> None:
        """Refuse a host written as a refused address, or named localhost."""
        if not host:
            raise URLRefused("the URL has no host")
        try:
            address = host_address(host)
        except _NotAnAddress as exc:
            raise URLRefused(str(exc)) from None
        if address is None and _is_localhost_name(host):
            if reason := self.policy(ipaddress.IPv4Address("127.0.0.1")):
                raise URLRefused(f"host {host} is {reason}")
        elif address is not None and (reason := self.policy(address)):
            raise URLRefused(f"{_describe(address, host)} is {reason}")

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Resolve `host` once and return its addresses, all of them checked. A host that
        cannot be resolved raises OSError, as the system resolver does."""
        try:
            address = host_address(host)
        except _NotAnAddress as exc:
            raise URLRefused(str(exc)) from None
        if address is not None:
            addresses = [address]
        else:
            try:
                addresses = await self.resolver(host, port)
            except OSError as exc:
                # errno and strerror both set: aiohttp's error shows strerror alone.
                why = exc.strerror or str(exc)
                raise OSError(exc.errno, f"cannot resolve {host}: {why}") from None
        if not addresses:
            raise OSError(0, f"{host} has no addresses")
        for resolved in addresses:
            # One refused answer refuses the host: an image host has no business
            # publishing a private address next to its public ones.
            if reason := self.policy(resolved):
                if address is not None:
                    raise URLRefused(f"{_describe(resolved, host)} is {reason}")
                # The message reaches clients (image errors): name the kind of address,
                # never the internal address a stranger's host name resolved to.
                kind = reason.split(" (", 1)[0]  # "private (embeds IPv4 ...)" -> "private"
                raise URLRefused(f"{host} resolves to a {kind} address")
        return addresses


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver interface over `Guard.resolve`: the connector connects to the
    checked addresses themselves (TLS SNI and the Host header keep the host name)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in await self.guard.resolve(host, port)
        ]

    async def close(self) -> None:
        pass


AddrInfo = tuple[int, int, int, str, tuple[str, int] | tuple[str, int, int, int]]


def checked_socket(guard: Guard) -> Callable[[AddrInfo], socket.socket]:
    """A socket factory for aiohttp's connector that refuses to dial a refused address.

    The static check and the resolver already refuse every case this one sees; it is the
    last line, on the address actually dialled. A refusal is a PermissionError, because
    the connector treats OSError as "this address failed" and tries the next one."""

    def open_socket(addr_info: AddrInfo) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        address = ipaddress.ip_address(sockaddr[0])
        if reason := guard.policy(address):
            raise PermissionError(errno.EACCES, f"address {address} is {reason}")
        return socket.socket(family, type_, proto)

    return open_socket
