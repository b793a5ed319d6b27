"""The request repository on the real database: big requests split their rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.contracts.events import Options, Row
from imgpipe.ingest.adapters.repository import IngestRepository
from imgpipe.ingest.domain import IngestRequest, new_request_id

LEASE = timedelta(seconds=30)


def request_with(rows: int) -> IngestRequest:
    return IngestRequest(
        request_id=new_request_id(),
        rows=[
            Row(
                serial_number=str(number),
                product_name=f"Product {number} ✓",
                input_urls=[f"https://img.example.com/{number}/{i}.jpg" for i in range(3)],
            )
            for number in range(rows)
        ],
        options=Options(quality=42),
        webhook_url="https://hooks.example.com/x",
        received_at=datetime.now(UTC).replace(microsecond=0),
    )


async def test_big_request_rows_are_chunked_and_read_back(ingest_db: AsyncDatabase) -> None:
    repository = IngestRepository(ingest_db, chunk_bytes=2_000)
    await repository.ensure_indexes()
    request = request_with(100)
    await repository.add(request, relay_after=request.received_at)

    stored = await ingest_db.requests.find_one({"_id": request.request_id})
    assert stored["row_chunks"] > 1 and stored["rows"] == []
    assert await ingest_db.request_rows.count_documents({"request_id": request.request_id}) > 1
    assert await repository.claim_unpublished(request.received_at, LEASE) == request


async def test_relay_claims_each_due_request_once(ingest_db: AsyncDatabase) -> None:
    repository = IngestRepository(ingest_db, chunk_bytes=2_000)
    request = request_with(50)
    now = request.received_at
    await repository.add(request, relay_after=now + timedelta(seconds=5))

    assert await repository.claim_unpublished(now, timedelta(seconds=30)) is None  # not due
    later = now + timedelta(seconds=6)
    assert await repository.claim_unpublished(later, timedelta(seconds=30)) == request
    assert await repository.claim_unpublished(later, timedelta(seconds=30)) is None  # leased
    await repository.mark_published(request.request_id, later)
    assert await repository.claim_unpublished(later + timedelta(minutes=5), timedelta(1)) is None


async def test_ten_thousand_rows_round_trip(ingest_db: AsyncDatabase) -> None:
    repository = IngestRepository(ingest_db)
    request = request_with(10_000)
    await repository.add(request, relay_after=request.received_at)
    assert await repository.claim_unpublished(request.received_at, LEASE) == request
