"""POST /upload with an Idempotency-Key, against the real broker and database."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.contracts.events import RequestReceived, utcnow
from imgpipe.contracts.settings import Settings

from .test_upload import HEADER, VALID, upload_form

OTHER = HEADER + "1,Hat,https://img.example.com/hat.jpg\n"
BAD = HEADER + "1,,https://img.example.com/a.jpg\n"


def keyed(key: str, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **headers}


async def received_ids(tap) -> list[str]:
    """Ids of every RequestReceived published so far (the tap reads up to now)."""
    return [e.data.request_id for e in await tap.flush() if isinstance(e.data, RequestReceived)]


async def test_the_same_upload_twice_is_one_request(
    settings: Settings, run_ingest, received_events, ingest_db: AsyncDatabase
) -> None:
    async with run_ingest(settings) as (_, client):
        first = await client.post("/upload", headers=keyed("order-1"), **upload_form(VALID))
        again = await client.post("/upload", headers=keyed("order-1"), **upload_form(VALID))
        other_key = await client.post("/upload", headers=keyed("order-2"), **upload_form(VALID))
        no_key = await client.post("/upload", **upload_form(VALID))
    assert (first.status_code, again.status_code) == (202, 202), again.text
    assert again.json() == first.json()
    request_id = first.json()["request_id"]
    distinct = {request_id, other_key.json()["request_id"], no_key.json()["request_id"]}
    assert len(distinct) == 3
    assert await ingest_db.requests.count_documents({}) == 3
    assert sorted(await received_ids(received_events)) == sorted(distinct)
    [key] = await ingest_db.idempotency_keys.find({"request_id": request_id}).to_list(None)
    assert key["_id"] == "open/order-1" and key["answer"] == first.json()


async def test_the_same_key_with_another_upload_is_a_409(
    settings: Settings, run_ingest, ingest_db: AsyncDatabase
) -> None:
    async with run_ingest(settings) as (_, client):
        first = await client.post("/upload", headers=keyed("k"), **upload_form(VALID))
        other_file = await client.post("/upload", headers=keyed("k"), **upload_form(OTHER))
        other_field = await client.post(
            "/upload", headers=keyed("k"), **upload_form(VALID, quality=80)
        )
    assert first.status_code == 202
    for answer in (other_file, other_field):
        assert answer.status_code == 409, answer.text
        assert "already used for a different upload" in answer.json()["detail"]
    assert await ingest_db.requests.count_documents({}) == 1


async def test_a_refused_upload_gives_the_key_back(
    settings: Settings, run_ingest, ingest_db: AsyncDatabase
) -> None:
    async with run_ingest(settings) as (_, client):
        refused = await client.post("/upload", headers=keyed("fix-me"), **upload_form(BAD))
        fixed = await client.post("/upload", headers=keyed("fix-me"), **upload_form(VALID))
    assert refused.status_code == 422
    assert fixed.status_code == 202, fixed.text
    assert await ingest_db.requests.count_documents({}) == 1


async def test_concurrent_uploads_with_one_key_make_one_request(
    settings: Settings, run_ingest, received_events, ingest_db: AsyncDatabase
) -> None:
    async with run_ingest(settings) as (_, client):
        answers = await asyncio.gather(
            *(client.post("/upload", headers=keyed("race"), **upload_form(VALID)) for _ in range(4))
        )
    assert [answer.status_code for answer in answers] == [202] * 4
    assert len({answer.json()["request_id"] for answer in answers}) == 1
    assert await ingest_db.requests.count_documents({}) == 1
    assert len(await received_ids(received_events)) == 1


async def test_keys_are_scoped_by_api_key(
    settings: Settings, run_ingest, ingest_db: AsyncDatabase
) -> None:
    two_clients = settings.model_copy(update={"api_keys": ["alice", "bob"]})
    async with run_ingest(two_clients) as (_, client):
        alice = await client.post(
            "/upload", headers=keyed("1", Authorization="Bearer alice"), **upload_form(VALID)
        )
        bob = await client.post(
            "/upload", headers=keyed("1", Authorization="Bearer bob"), **upload_form(OTHER)
        )
        nobody = await client.post("/upload", headers=keyed("1"), **upload_form(VALID))
    assert (alice.status_code, bob.status_code, nobody.status_code) == (202, 202, 401)
    assert alice.json()["request_id"] != bob.json()["request_id"]
    ids = [doc["_id"] for doc in await ingest_db.idempotency_keys.find().to_list(None)]
    assert not any("alice" in key_id or "bob" in key_id for key_id in ids)  # hashed


async def test_a_key_past_24_hours_is_new_again(
    settings: Settings, run_ingest, ingest_db: AsyncDatabase
) -> None:
    """The lookup checks the age itself: a TTL monitor may not have run yet."""
    async with run_ingest(settings) as (_, client):
        first = await client.post("/upload", headers=keyed("old"), **upload_form(VALID))
        yesterday = utcnow() - timedelta(hours=24, seconds=1)
        await ingest_db.idempotency_keys.update_one(
            {"_id": "open/old"}, {"$set": {"created_at": yesterday}}
        )
        later = await client.post("/upload", headers=keyed("old"), **upload_form(OTHER))
        indexes = await ingest_db.idempotency_keys.index_information()
    assert later.status_code == 202, later.text
    assert later.json()["request_id"] != first.json()["request_id"]
    [ttl] = [index for index in indexes.values() if "expireAfterSeconds" in index]
    assert (ttl["key"], ttl["expireAfterSeconds"]) == ([("created_at", 1)], 86400)


async def test_a_key_over_255_characters_is_a_400(
    settings: Settings, run_ingest, ingest_db: AsyncDatabase
) -> None:
    async with run_ingest(settings) as (_, client):
        too_long = await client.post("/upload", headers=keyed("k" * 256), **upload_form(VALID))
        longest = await client.post("/upload", headers=keyed("k" * 255), **upload_form(VALID))
    assert too_long.status_code == 400
    assert "1 to 255 characters" in too_long.json()["detail"]
    assert longest.status_code == 202
    assert await ingest_db.requests.count_documents({}) == 1
