"""HTTP API: subscriptions and the delivery log (the health routes come with service_app)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status

from imgpipe.contracts.outbound import URLRefused
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.urls import url_problem
from imgpipe.contracts.web import require_api_key
from imgpipe.notifier.adapters.deliveries import DeliveryDoc
from imgpipe.notifier.adapters.subscriptions import SubscriptionDoc
from imgpipe.notifier.bootstrap import Runtime
from imgpipe.notifier.schemas import Delivery, Subscription, SubscriptionIn
from imgpipe.notifier.subscriptions import (
    find_equal,
    normalise_url,
    owner_for_retry,
    settle_orphans,
)
from imgpipe.notifier.webhooks import DeliveryStatus


def runtime(request: Request) -> Runtime:
    """The running notifier (service_app keeps it in the app's state)."""
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(runtime)]
router = APIRouter()


def notifier_router(settings: Settings) -> APIRouter:
    """The API, behind `Authorization: Bearer KEY` when IMGPIPE_API_KEYS is set."""
    secured = APIRouter(dependencies=[Depends(require_api_key(settings))])
    secured.include_router(router)
    return secured


@router.post(
    "/subscriptions",
    status_code=status.HTTP_201_CREATED,
    response_model=Subscription,
    responses={200: {"description": "An equal subscription exists; this is it."}},
    tags=["subscriptions"],
)
async def create_subscription(
    body: SubscriptionIn, runtime: RuntimeDep, response: Response
) -> Subscription:
    """Register an endpoint for some or all webhook types (of every request from now on).

    Idempotent: the same URL (scheme and host in any case, default port or not) with the
    same webhook types answers 200 with the subscription that exists."""
    _refuse_unsafe_url(body.url, runtime.settings)
    url = normalise_url(body.url)
    existing = await find_equal(runtime.repo, url, body.event_types)
    if existing is not None:
        response.status_code = status.HTTP_200_OK
        return Subscription.from_doc(existing)
    doc: SubscriptionDoc = {
        "_id": f"sub_{uuid.uuid4().hex}",
        "url": url,
        "event_types": [str(kind) for kind in body.event_types],
        "created_at": _now_ms(),
    }
    await runtime.repo.subscriptions.add(doc)
    return Subscription.from_doc(doc)


def _now_ms() -> datetime:
    """Now at MongoDB's precision, so what POST answers is what GET answers later."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _refuse_unsafe_url(url: str, settings: Settings) -> None:
    """The rules a webhook URL given at upload meets too (contracts.urls), the outbound
    guard's among them, so a bad URL fails here, not at its first delivery."""
    if reason := url_problem(url, settings.allow_private_urls):
        raise HTTPException(
            422, detail=[{"loc": ["body", "url"], "msg": reason, "type": URLRefused.code}]
        )


@router.get("/subscriptions", response_model=list[Subscription], tags=["subscriptions"])
async def list_subscriptions(runtime: RuntimeDep) -> list[Subscription]:
    return [Subscription.from_doc(doc) for doc in await runtime.repo.subscriptions.list_all()]


@router.get("/subscriptions/{subscription_id}", response_model=Subscription, tags=["subscriptions"])
async def get_subscription(subscription_id: str, runtime: RuntimeDep) -> Subscription:
    doc = await runtime.repo.subscriptions.get(subscription_id)
    if doc is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such subscription")
    return Subscription.from_doc(doc)


@router.delete(
    "/subscriptions/{subscription_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    tags=["subscriptions"],
)
async def delete_subscription(subscription_id: str, runtime: RuntimeDep) -> Response:
    """Its pending deliveries go on under another subscription of the same endpoint and
    type if there is one, and are cancelled otherwise."""
    doc = await runtime.repo.subscriptions.delete(subscription_id)
    if doc is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such subscription")
    orphans = [(subscription_id, list(doc["event_types"]))]
    await settle_orphans(runtime.repo, doc["url"], orphans, datetime.now(UTC))
    runtime.dispatcher.wake()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/deliveries", response_model=list[Delivery], tags=["deliveries"])
async def list_deliveries(
    runtime: RuntimeDep,
    request_id: str | None = None,
    status_: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    endpoint: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        str | None,
        Query(
            description="the id of the last delivery seen, for the page after it (or an "
            "ISO 8601 time: deliveries created before it)"
        ),
    ] = None,
) -> list[Delivery]:
    """Deliveries, newest first, each with its full attempt log (time, status code,
    latency, error, next retry)."""
    cursor = await _cursor(before, runtime)
    docs = await runtime.repo.deliveries.list_page(request_id, status_, endpoint, limit, cursor)
    return [Delivery.from_doc(doc) for doc in docs]


async def _cursor(before: str | None, runtime: Runtime) -> DeliveryDoc | None:
    """Where the page starts: after a delivery (exact), or before a time."""
    if before is None:
        return None
    if (delivery := await runtime.repo.deliveries.get(before)) is not None:
        return delivery
    try:
        at = datetime.fromisoformat(before)
    except ValueError:
        raise HTTPException(
            422,
            detail=[
                {
                    "loc": ["query", "before"],
                    "msg": "must be the id of a delivery or an ISO 8601 time",
                    "type": "value_error",
                }
            ],
        ) from None
    return {"created_at": at if at.tzinfo else at.replace(tzinfo=UTC)}


@router.get("/deliveries/{delivery_id}", response_model=Delivery, tags=["deliveries"])
async def get_delivery(delivery_id: str, runtime: RuntimeDep) -> Delivery:
    doc = await runtime.repo.deliveries.get(delivery_id)
    if doc is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such delivery")
    return Delivery.from_doc(doc)


@router.post(
    "/deliveries/{delivery_id}/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Delivery,
    tags=["deliveries"],
)
async def retry_delivery(delivery_id: str, runtime: RuntimeDep) -> Delivery:
    """Send this delivery again now, with a fresh retry schedule; earlier attempts stay logged.

    A delivery made for a subscription is sent only while a subscription (its own, or
    another of the same endpoint and type) still wants it: 409 otherwise."""
    doc = await runtime.repo.deliveries.get(delivery_id)
    if doc is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such delivery")
    owner = await _owner_or_conflict(doc, runtime)
    now = datetime.now(UTC)
    replayed = await runtime.repo.deliveries.replay(delivery_id, now, owner)
    if replayed is None:  # its request was deleted meanwhile (RequestDeleted)
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such delivery")
    if owner is not None:  # the owner may have been deleted since we looked
        await settle_orphans(runtime.repo, doc["endpoint"], [(owner, [doc["event_type"]])], now)
    runtime.dispatcher.wake()
    return Delivery.from_doc(replayed)


async def _owner_or_conflict(doc: DeliveryDoc, runtime: Runtime) -> str | None:
    """The subscription a retry belongs to (None for a request's own webhook URL)."""
    if doc["subscription_id"] is None:
        return None
    owner = await owner_for_retry(runtime.repo, doc)
    if owner is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"subscription {doc['subscription_id']} was deleted and no subscription "
            f"wants {doc['event_type']} webhooks at {doc['endpoint']} any more; "
            "subscribe the endpoint again to retry this delivery",
        )
    return owner
