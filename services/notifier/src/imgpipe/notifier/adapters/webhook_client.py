"""Sending one webhook: a signed POST through the outbound client (its SSRF guard).

Signatures follow Standard Webhooks, through the reference `standardwebhooks` library.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime

import httpx
from standardwebhooks.webhooks import Webhook

from imgpipe.contracts.outbound import URLRefused

USER_AGENT = "imgpipe-notifier/0.1 (Standard Webhooks)"


@dataclass(frozen=True)
class PostResult:
    status_code: int | None = None
    error: str | None = None
    retry_after: str | None = None
    refused: bool = False  # the SSRF guard said no


class Signer:
    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(secret)  # raises on a secret that is not whsec_ + base64

    def headers(self, webhook_id: str, at: datetime, body: str) -> dict[str, str]:
        """`webhook-signature` is HMAC-SHA256 over `id.timestamp.body`, fresh for each attempt."""
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self._webhook.sign(webhook_id, at, body),
        }


class WebhookClient:
    def __init__(self, client: httpx.AsyncClient, signer: Signer, timeout: float) -> None:
        self._client = client
        self._signer = signer
        self._timeout = timeout  # the whole attempt: connect, send, wait for the answer

    async def post(
        self,
        endpoint: str,
        webhook_id: str,
        body: str,
        at: datetime,
        traceparent: str | None = None,
    ) -> PostResult:
        """POST `body`, signed as sent at `at`. The response body is never read.
        `traceparent` lets the receiver join the request's trace."""
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **self._signer.headers(webhook_id, at, body),
        }
        if traceparent:
            headers["traceparent"] = traceparent
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                request = self._client.build_request(
                    "POST", endpoint, content=body.encode(), headers=headers
                )
                # Redirects are not followed: a receiver's new address is a config change.
                response = await self._client.send(request, stream=True, follow_redirects=False)
                await response.aclose()
        except TimeoutError:
            return PostResult(error=f"timed out after {self._timeout:g}s")
        except URLRefused as exc:
            return PostResult(error=f"{URLRefused.code}: {exc}", refused=True)
        except httpx.TimeoutException as exc:
            elapsed = time.monotonic() - started
            return PostResult(error=f"{type(exc).__name__} after {elapsed:.1f}s")
        except httpx.HTTPError as exc:
            name = type(exc).__name__
            return PostResult(error=f"{name}: {exc}" if str(exc) else name)
        return PostResult(response.status_code, retry_after=response.headers.get("retry-after"))

    async def aclose(self) -> None:
        await self._client.aclose()
