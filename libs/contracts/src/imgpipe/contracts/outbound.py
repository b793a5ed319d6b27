"""The one way imgpipe makes outbound HTTP requests (image downloads, webhooks).

Every outbound request goes through `outbound_client` so the SSRF guard applies to
all of them (issue 5 hardens this module; callers do not change).
"""

from __future__ import annotations

import httpx

from imgpipe.contracts.settings import Settings


def outbound_client(settings: Settings, *, timeout: float | None = None) -> httpx.AsyncClient:
    """An httpx client for URLs that strangers give us."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            timeout or settings.download_timeout, connect=settings.connect_timeout
        ),
        follow_redirects=True,
        max_redirects=settings.max_redirects,
        trust_env=False,
    )
