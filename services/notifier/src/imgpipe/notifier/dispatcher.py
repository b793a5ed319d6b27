"""The dispatcher: finds due deliveries in MongoDB, leases them, sends them.

State lives in MongoDB (`status`, `next_attempt_at`, the lease), so a retry
survives a restart and several notifier instances share the work without
double-sending. Each attempt runs in its own task with its own timeout; the
number in flight is bounded overall and per endpoint, so a slow or dead
endpoint cannot hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from datetime import datetime, timedelta

from opentelemetry.trace import Span, SpanKind

from imgpipe.contracts.bus import is_unavailable
from imgpipe.contracts.events import utcnow
from imgpipe.contracts.logs import request_context
from imgpipe.contracts.retry_after import parse_retry_after
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.tracing import current_traceparent, origin, span
from imgpipe.notifier import metrics
from imgpipe.notifier.adapters.deliveries import AttemptDoc, Deliveries, DeliveryDoc
from imgpipe.notifier.adapters.webhook_client import WebhookClient
from imgpipe.notifier.config import NotifierConfig
from imgpipe.notifier.retry import decide
from imgpipe.notifier.webhooks import DELIVERED, DONE_STATES, PENDING

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        deliveries: Deliveries,
        settings: Settings,
        config: NotifierConfig,
        webhooks: WebhookClient,
    ) -> None:
        self.deliveries = deliveries
        self.settings = settings
        self.config = config
        self.webhooks = webhooks
        self.owner = f"notifier-{uuid.uuid4().hex[:12]}"  # this instance, for leases
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._per_endpoint: Counter[str] = Counter()
        self._loop_task: asyncio.Task[None] | None = None

    # Lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self.run(), name="webhook-dispatcher")

    async def stop(self) -> None:
        """Stop polling and cancel attempts in flight; their leases are handed back."""
        tasks = [t for t in (self._loop_task, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                more = await self.dispatch_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # MongoDB away for a moment: try again next round
                _log_round_failure("dispatcher round", exc)
                more = False
            if more:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)

    # One round --------------------------------------------------------------------

    async def dispatch_due(self) -> bool:
        """Start an attempt for each due delivery there is room for; True if there may be more."""
        free = self.config.concurrency - len(self._inflight)
        if free <= 0:
            return False  # a finishing attempt wakes the loop
        now = utcnow()
        busy = [
            endpoint
            for endpoint, count in self._per_endpoint.items()
            if count >= self.config.per_endpoint_concurrency
        ]
        candidates = await self.deliveries.due(now, free, busy)
        for doc in candidates:
            if self._per_endpoint[doc["endpoint"]] >= self.config.per_endpoint_concurrency:
                continue
            if await self._waits_for_earlier(doc, now):
                continue
            until = now + timedelta(seconds=self.config.lease)
            claimed = await self.deliveries.claim(doc["_id"], self.owner, now, until)
            if claimed is not None:
                self._start(claimed)
        return len(candidates) == free

    async def _waits_for_earlier(self, doc: DeliveryDoc, now: datetime) -> bool:
        """Per (request, endpoint), a webhook waits until the earlier ones are done or failed.

        A waiting delivery is put off until its predecessor's next chance, so it does
        not fill every round; the predecessor brings it forward when it finishes.
        """
        if doc["seq"] == 0:
            return False
        earlier = await self.deliveries.pending_predecessor(doc)
        if earlier is None:
            return False
        chances = (earlier["next_attempt_at"], earlier["lease_until"])
        until = max(
            [at for at in chances if at is not None]
            + [now + timedelta(seconds=self.config.poll_interval)]
        )
        await self.deliveries.defer(doc["_id"], until)
        # The predecessor may have finished between the check and the deferral.
        if await self.deliveries.pending_predecessor(doc) is None:
            await self.deliveries.make_due({"_id": doc["_id"]}, now)
        return True

    def _start(self, doc: DeliveryDoc) -> None:
        task = asyncio.create_task(self._run_attempt(doc), name=f"webhook-{doc['_id']}")
        self._inflight[doc["_id"]] = task
        self._per_endpoint[doc["endpoint"]] += 1

        def done(finished: asyncio.Task[None]) -> None:
            # The same delivery may already be claimed again (an immediate retry).
            if self._inflight.get(doc["_id"]) is finished:
                del self._inflight[doc["_id"]]
            self._per_endpoint[doc["endpoint"]] -= 1
            if self._per_endpoint[doc["endpoint"]] <= 0:
                del self._per_endpoint[doc["endpoint"]]
            self._wake.set()

        task.add_done_callback(done)

    async def _run_attempt(self, doc: DeliveryDoc) -> None:
        try:
            await self.attempt(doc)
        except asyncio.CancelledError:
            # Shutting down: hand the lease back so a restart retries at once.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.deliveries.release(doc["_id"], self.owner, utcnow()), 2)
            raise
        except Exception:  # the lease expires and the delivery is tried again
            log.exception("webhook attempt for %s failed unexpectedly", doc["_id"])

    # One attempt ------------------------------------------------------------------

    async def attempt(self, doc: DeliveryDoc) -> None:
        attributes = {
            "request_id": doc["request_id"],
            "webhook.type": doc["event_type"],
            "url.origin": origin(doc["endpoint"]),
        }
        # A child of the request's trace, whenever (and wherever) the attempt is made; its
        # log lines carry the request id.
        parent = doc.get("traceparent")
        with (
            request_context(doc["request_id"]),
            span(
                "webhook POST", parent=parent, kind=SpanKind.CLIENT, attributes=attributes
            ) as post,
        ):
            await self._attempt(doc, post)

    async def _attempt(self, doc: DeliveryDoc, post: Span) -> None:
        started_at = utcnow()
        result = await self.webhooks.post(
            doc["endpoint"], doc["webhook_id"], doc["body"], started_at, current_traceparent()
        )
        status_code, error = result.status_code, result.error
        if status_code is not None:
            post.set_attribute("http.response.status_code", status_code)
        finished_at = utcnow()
        seconds = (finished_at - started_at).total_seconds()
        latency_ms = round(seconds * 1000, 1)
        metrics.WEBHOOK_SECONDS.observe(seconds)
        tries = doc.get("tries", 0) + 1
        decision = decide(
            status_code,
            tries,
            self.settings.webhook_retry_schedule,
            parse_retry_after(result.retry_after, finished_at),
            refused=result.refused,
        )
        next_at = (
            finished_at + timedelta(seconds=decision.delay) if decision.delay is not None else None
        )
        if error is None and decision.status != DELIVERED:
            error = f"HTTP {status_code}"
        attempt: AttemptDoc = {
            "at": started_at,
            "endpoint": doc["endpoint"],
            "status_code": status_code,
            "latency_ms": latency_ms,
            "error": error,
            "outcome": "retry" if decision.status == PENDING else decision.status,
            "next_retry_at": next_at,
        }
        fields: dict[str, object] = {"status": decision.status, "next_attempt_at": next_at}
        if decision.status == DELIVERED:
            fields["delivered_at"] = finished_at
        recorded = await self.deliveries.finish_attempt(
            doc["_id"], self.owner, attempt, fields, finished_at
        )
        post.set_attribute("outcome", attempt["outcome"])
        if not recorded:
            log.warning("lease on %s was lost; attempt not recorded", doc["_id"])
            return
        metrics.WEBHOOK_ATTEMPTS.labels(outcome=attempt["outcome"]).inc()
        # The endpoint's origin only: a webhook URL's path or query may hold a token.
        log.info(
            "webhook %s to %s -> %s (%s) %s",
            doc["event_type"],
            origin(doc["endpoint"]),
            status_code or error,
            decision.status,
            f"retry at {next_at.isoformat()}" if next_at else "",
        )
        if decision.status in DONE_STATES:
            await self.deliveries.release_successors(doc, finished_at)


def _log_round_failure(what: str, exc: Exception) -> None:
    """A database outage is one line a round (it may last); anything else, a traceback."""
    if is_unavailable(exc):
        log.warning("%s failed: database unavailable (%s)", what, type(exc).__name__)
    else:
        log.error("%s failed", what, exc_info=exc)
