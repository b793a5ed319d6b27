"""HTTP API: subscriptions and the delivery log (health routes come from contracts)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status

from imgpipe.contracts.outbound import URLRefused, check_url
from imgpipe.notifier.handlers import Deps
from imgpipe.notifier.schemas import Delivery, Subscription, SubscriptionIn


def deps(request: Request) -> Deps:
    return request.app.state.deps


def _now_ms() -> datetime:
    """Now at MongoDB's precision, so what POST answers is what GET answers later."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


DepsDep = Annotated[Deps, Depends(deps)]
router = APIRouter()


@router.post(
    "/subscriptions",
    status_code=status.HTTP_201_CREATED,
    response_model=Subscription,
    tags=["subscriptions"],
)
async def create_subscription(body: SubscriptionIn, deps: DepsDep) -> Subscription:
    """Register an endpoint for some or all webhook types (of every request from now on)."""
    try:  # the same rules every delivery will meet, so a bad URL fails here, not later
        check_url(body.url, deps.settings.allow_private_urls)
    except URLRefused as exc:
        raise HTTPException(
            422,
            detail=[{"loc": ["body", "url"], "msg": str(exc), "type": URLRefused.code}],
        ) from None
    doc = {
        "_id": f"sub_{uuid.uuid4().hex}",
        "url": body.url,
        "event_types": body.event_types,
        "created_at": _now_ms(),
    }
    await deps.repo.add_subscription(doc)
    return Subscription.from_doc(doc)


@router.get("/subscriptions", response_model=list[Subscription], tags=["subscriptions"])
async def list_subscriptions(deps: DepsDep) -> list[Subscription]:
    return [Subscription.from_doc(doc) for doc in await deps.repo.list_subscriptions()]


@router.get("/subscriptions/{subscription_id}", response_model=Subscription, tags=["subscriptions"])
async def get_subscription(subscription_id: str, deps: DepsDep) -> Subscription:
    doc = await deps.repo.get_subscription(subscription_id)
    if doc is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such subscription")
    return Subscription.from_doc(doc)


@router.delete(
    "/subscriptions/{subscription_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    tags=["subscriptions"],
)
async def delete_subscription(subscription_id: str, deps: DepsDep) -> Response:
    if not await deps.repo.delete_subscription(subscription_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such subscription")
    await deps.repo.cancel_for_subscription(subscription_id, datetime.now(UTC))
    deps.wake()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/deliveries", response_model=list[Delivery], tags=["deliveries"])
async def list_deliveries(
    deps: DepsDep,
    request_id: str | None = None,
    status_: Annotated[str | None, Query(alias="status")] = None,
    endpoint: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[Delivery]:
    """Every delivery with its full attempt log (time, status code, latency, error, next retry)."""
    docs = await deps.repo.list_deliveries(request_id, status_, endpoint, limit)
    return [Delivery.from_doc(doc) for doc in docs]


@router.get("/deliveries/{delivery_id}", response_model=Delivery, tags=["deliveries"])
async def get_delivery(delivery_id: str, deps: DepsDep) -> Delivery:
    doc = await deps.repo.get_delivery(delivery_id)
    if doc is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such delivery")
    return Delivery.from_doc(doc)


@router.post(
    "/deliveries/{delivery_id}/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Delivery,
    tags=["deliveries"],
)
async def retry_delivery(delivery_id: str, deps: DepsDep) -> Delivery:
    """Send this delivery again now, with a fresh retry schedule; earlier attempts stay logged."""
    doc = await deps.repo.replay(delivery_id, datetime.now(UTC))
    if doc is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such delivery")
    deps.wake()
    return Delivery.from_doc(doc)
