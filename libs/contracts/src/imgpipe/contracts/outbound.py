"""The one way imgpipe makes outbound HTTP requests (image downloads, webhooks).

Every outbound request goes through `outbound_client` so the SSRF guard (netguard.py)
applies to all of them: only http(s), no credentials in URLs, and no connection to a
loopback, private, link-local, multicast, unspecified or reserved address, checked on the
address actually connected to and again on every redirect hop. IMGPIPE_ALLOW_PRIVATE_URLS
lifts the address rule (tests, demos); the scheme and credentials rules stay.

The client is httpx's, over aiohttp's connection pool (httpx-aiohttp's transport): the
same API everywhere, at well under half of httpcore's CPU per download (bench/README.md).

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
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

from imgpipe.contracts.netguard import Guard, GuardedResolver, URLRefused, checked_socket
from imgpipe.contracts.settings import Settings

__all__ = ["Guard", "URLRefused", "check_url", "outbound_client"]

# A body read returns what aiohttp has buffered (it pauses the socket past ~128 KB), up
# to this many bytes. The library's 16 KB cut a 500 KB image into 31 chunks, each passing
# through httpx's stream layers: ~0.1 ms more CPU per image than a few large chunks.
AiohttpResponseStream.CHUNK_SIZE = 1024 * 1024

# httpx's own defaults (httpx._config.DEFAULT_LIMITS); aiohttp's pool takes the total.
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


class _GuardedTransport(AiohttpTransport):
    """httpx-aiohttp's transport with the guard: every request (so every redirect hop,
    which httpx follows) passes `Guard.check_url` first, and the aiohttp session resolves
    through `GuardedResolver` and dials through `checked_socket`."""

    def __init__(self, guard: Guard) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False, client=self._session)
        self._guard = guard

    def _session(self) -> aiohttp.ClientSession:
        """Built on the first request: a session belongs to the running event loop."""
        connector = aiohttp.TCPConnector(
            limit=_LIMITS.max_connections or 0,
            keepalive_timeout=_LIMITS.keepalive_expiry,
            ssl=_ssl_context(),
            resolver=GuardedResolver(self._guard),
            socket_factory=checked_socket(self._guard),
        )
        return aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._guard.check_url(request.url)
        # httpx rebuilds each redirect hop around the first request's body stream, which
        # the transport would send chunked even when empty, as a GET's stray body: read
        # it, so an empty body is sent as none (our bodies are small webhook payloads).
        await request.aread()
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectTimeout as exc:
            # httpx-aiohttp maps every aiohttp connection error to ConnectTimeout: name
            # what happened, a refused connection or a server that hung up.
            cause = exc.__cause__
            if isinstance(cause, aiohttp.ServerTimeoutError | TimeoutError):
                raise
            if isinstance(cause, aiohttp.ClientConnectorError):
                raise httpx.ConnectError(str(exc), request=request) from exc
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc


class _NoCookies(DefaultCookiePolicy):
    """Keep no cookie (httpx's jar; aiohttp's is a DummyCookieJar): a stranger's server
    must not plant one that later requests, made for other users to the same host,
    would carry back."""

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
