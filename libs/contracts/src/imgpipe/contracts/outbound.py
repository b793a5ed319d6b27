"""The one way imgpipe makes outbound HTTP requests (image downloads, webhooks).

Every outbound request goes through `outbound_client` so the SSRF guard (netguard.py)
applies to all of them: only http(s), no credentials in URLs, and no connection to a
loopback, private, link-local, multicast, unspecified or reserved address, checked on the
address actually connected to and again on every redirect hop. IMGPIPE_ALLOW_PRIVATE_URLS
lifts the address rule (tests, demos); the scheme and credentials rules stay.

The client is httpx's, over aiohttp's connection pool (transport.py): one client API
everywhere, at about half of httpcore's CPU per download.

A refusal raises `URLRefused` (an `httpx.RequestError`), which callers report with the
error code `URLRefused.code` ("url_refused"). `check_url` runs the same static rules
without any network, for validating input before it is accepted.
"""

from __future__ import annotations

import ssl
from functools import cache
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urlsplit

import aiohttp
import httpx

from imgpipe.contracts.netguard import Guard, GuardedResolver, URLRefused, checked_socket
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.transport import AiohttpTransport, NameNotResolved

__all__ = ["Guard", "NameNotResolved", "URLRefused", "check_url", "outbound_client"]

# httpx's own defaults (httpx._config.DEFAULT_LIMITS), for aiohttp's pool.
MAX_CONNECTIONS = 100
KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is kept


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
    """One verifying context for every client: building one loads the CA bundle (~60 ms)."""
    return httpx.create_ssl_context(trust_env=False)


def _lenient_host(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


class _GuardedTransport(AiohttpTransport):
    """Every request (so every redirect hop, which httpx follows) passes
    `Guard.check_url` first; the aiohttp session resolves names through
    `GuardedResolver` and dials every address through `checked_socket`."""

    def __init__(self, guard: Guard, per_host: int) -> None:
        super().__init__(self._session_for_guard)
        self._guard = guard
        self._per_host = per_host

    def _session_for_guard(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=MAX_CONNECTIONS,
            limit_per_host=self._per_host,
            keepalive_timeout=KEEPALIVE_EXPIRY,
            ssl=_ssl_context(),
            resolver=GuardedResolver(self._guard),
            socket_factory=checked_socket(self._guard),
        )
        return aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._guard.check_url(request.url)
        return await super().handle_async_request(request)


class _NoCookies(DefaultCookiePolicy):
    """Keep no cookie (httpx's jar; aiohttp's is a DummyCookieJar): a stranger's server
    must not plant one that later requests, made for other users to the same host,
    would carry back."""

    def set_ok(self, cookie: object, request: object) -> bool:
        return False


def outbound_client(
    settings: Settings,
    *,
    timeout: float | None = None,
    guard: Guard | None = None,
    per_host: int = 0,
) -> httpx.AsyncClient:
    """An httpx client for URLs that strangers give us.

    It sends `User-Agent: imgpipe/<version>` (IMGPIPE_USER_AGENT), as polite crawlers do.
    `per_host` caps the connections open to one host at once (0: no cap beyond the
    pool's). `guard` defaults to the policy in settings (allow_private_urls); tests pass
    a Guard with their own resolver or address policy, production code never does.
    """
    guard = guard or Guard.for_settings(settings.allow_private_urls)
    client = httpx.AsyncClient(
        transport=_GuardedTransport(guard, per_host),
        headers={"User-Agent": settings.user_agent},
        timeout=httpx.Timeout(
            timeout or settings.download_timeout, connect=settings.connect_timeout
        ),
        follow_redirects=True,
        max_redirects=settings.max_redirects,
        trust_env=False,
    )
    client.cookies.jar.set_policy(_NoCookies())
    return client
