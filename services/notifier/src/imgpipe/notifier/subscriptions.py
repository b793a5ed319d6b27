"""Subscription rules the API enforces.

An endpoint is its normalised URL, so `HTTPS://Example.com:443/x` and
`https://example.com/x` are one endpoint. A delivery made for a subscription is
linked to one of the subscriptions that wanted it (the first found); it stays alive
as long as some subscription covers its endpoint and webhook type, whichever one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from imgpipe.notifier.adapters.deliveries import DeliveryDoc
from imgpipe.notifier.adapters.repository import NotifierRepository
from imgpipe.notifier.adapters.subscriptions import SubscriptionDoc

DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_url(url: str) -> str:
    """Scheme and host lower-cased, the scheme's default port dropped; the rest as given."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}" if userinfo else host
    if parts.port is not None and parts.port != DEFAULT_PORTS.get(scheme):
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))


def same_subscription(doc: SubscriptionDoc, url: str, event_types: Sequence[str]) -> bool:
    return normalise_url(doc["url"]) == url and set(doc["event_types"]) == set(event_types)


async def find_equal(
    repo: NotifierRepository, url: str, event_types: Sequence[str]
) -> SubscriptionDoc | None:
    """An existing subscription of this normalised URL for exactly these types."""
    for doc in await repo.subscriptions.wanting(event_types[0]):
        if same_subscription(doc, url, event_types):
            return doc
    return None


async def covering(
    repo: NotifierRepository, endpoint: str, event_type: str
) -> SubscriptionDoc | None:
    """The oldest subscription that wants `event_type` sent to `endpoint`."""
    wanted = normalise_url(endpoint)
    for doc in await repo.subscriptions.wanting(event_type):
        if normalise_url(doc["url"]) == wanted:
            return doc
    return None


async def owner_for_retry(repo: NotifierRepository, delivery: DeliveryDoc) -> str | None:
    """The subscription a retried subscription delivery belongs to now, None if nobody
    wants it any more (its own subscription may be gone while another covers it)."""
    own_id = delivery["subscription_id"]
    own = await repo.subscriptions.get(own_id) if own_id is not None else None
    if own is not None:
        return own["_id"]
    heir = await covering(repo, delivery["endpoint"], delivery["event_type"])
    return heir["_id"] if heir is not None else None


async def settle_orphans(
    repo: NotifierRepository, endpoint: str, orphans: list[tuple[str, list[str]]], now: datetime
) -> None:
    """For each (subscription id, webhook types) whose subscription no longer exists, hand
    its pending deliveries of those types to another subscription covering the endpoint,
    and cancel the ones nobody covers.

    An heir deleted while it inherits may have missed what it got (its own deletion
    looked before), so each heir is checked again in turn."""
    orphans = list(orphans)
    while orphans:
        subscription_id, event_types = orphans.pop()
        if await repo.subscriptions.get(subscription_id) is not None:
            continue
        heirs = await _hand_over(repo, subscription_id, endpoint, event_types, now)
        orphans.extend(heirs.items())


async def _hand_over(
    repo: NotifierRepository,
    subscription_id: str,
    endpoint: str,
    event_types: list[str],
    now: datetime,
) -> dict[str, list[str]]:
    heirs: dict[str, list[str]] = {}
    for event_type in event_types:
        heir = await covering(repo, endpoint, event_type)
        if heir is not None:
            await repo.deliveries.reassign_pending(subscription_id, event_type, heir["_id"], now)
            heirs.setdefault(heir["_id"], []).append(event_type)
    await repo.deliveries.cancel_for_subscription(
        subscription_id, event_types, now
    )  # nobody covers
    return heirs
