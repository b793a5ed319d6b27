"""The one way imgpipe makes outbound HTTP requests (image downloads, webhooks).

Every outbound request goes through `outbound_client` so the SSRF guard (netguard.py)
applies to all of them: only http(s), no credentials in URLs, and no connection to a
loopback, private, link-local, multicast, unspecified or reserved address, checked on the
address actually connected to and again on every redirect hop. IMGPIPE_ALLOW_PRIVATE_URLS
lifts the address rule (tests, demos); the scheme and credentials rules stay.

A refusal raises `URLRefused` (an `httpx.RequestError`), which callers report with the
error code `URLRefused.code` ("url_refused"). `check_url` runs the same static rules
without any network, for validating input before it is accepted.
"""

from __future__ import annotations

import ssl
from functools import cache
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urlsplit

import httpcore
import httpx

from imgpipe.contracts.netguard import Guard, GuardedBackend, URLRefused
from imgpipe.contracts.settings import Settings

__all__ = ["Guard", "URLRefused", "check_url", "outbound_client"]

# httpx's own defaults (httpx._config.DEFAULT_LIMITS), restated for the pool built below.
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


def check_url(url: str, allow_private: bool) -> None:
    """Raise URLRefused when `url` breaks a rule that needs no DNS: scheme, credentials,
    a host written as a refused address (any spelling) or named localhost."""
    guard = Guard.for_settings(allow_private)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        # httpx rejects some spellings that browsers and inet_aton take (0177.0.0.1);
        # name the address they mean when it is refused anyway, it is the clearer reason.
        if host := _lenient_host(url):
            guard.check_host(host)
        raise URLRefused(f"invalid URL: {exc}") from None
    guard.check_url(parsed)


@cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying context for every client: building one loads the CA bundle (~60 ms).
    httpcore only ever sets the same ALPN list on it (no HTTP/2 here)."""
    return httpx.create_ssl_context(trust_env=False)


def _lenient_host(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with two changes: every request (so every redirect hop) passes
    `Guard.check_url` first, and the connection pool connects through `GuardedBackend`."""

    def __init__(self, guard: Guard) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False, limits=_LIMITS)
        self._guard = guard
        # AsyncHTTPTransport has no network_backend parameter, so replace the pool it just
        # built with the same pool plus our backend. `_pool` is the one attribute the
        # transport's methods use (httpx 0.27, 0.28); test_outbound fails if it stops being.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=_LIMITS.max_connections,
            max_keepalive_connections=_LIMITS.max_keepalive_connections,
            keepalive_expiry=_LIMITS.keepalive_expiry,
            network_backend=GuardedBackend(guard),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._guard.check_url(request.url)
        return await super().handle_async_request(request)


class _NoCookies(DefaultCookiePolicy):
    """Keep no cookie: a stranger's server must not plant one that later requests, made
    for other users to the same host, would carry back."""

    def set_ok(self, cookie: object, request: object) -> bool:
        return False


def outbound_client(
    settings: Settings, *, timeout: float | None = None, guard: Guard | None = None
) -> httpx.AsyncClient:
    """An httpx client for URLs that strangers give us.

    `guard` defaults to the policy in settings (allow_private_urls); tests pass a Guard
    with their own resolver or address policy, production code never does.
    """
    client = httpx.AsyncClient(
        transport=_GuardedTransport(guard or Guard.for_settings(settings.allow_private_urls)),
        timeout=httpx.Timeout(
            timeout or settings.download_timeout, connect=settings.connect_timeout
        ),
        follow_redirects=True,
        max_redirects=settings.max_redirects,
        trust_env=False,
    )
    client.cookies.jar.set_policy(_NoCookies())
    return client
