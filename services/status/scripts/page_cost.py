"""What reading a large request costs, per read, on an embedded SecantusDB: the figures
in ../README.md ("Large requests").

Stores one request of N rows of three images, every image ok, in the current layout
(rows in the image pages) and in the previous one (rows in the request document), then
times, best of 3: the whole document (`get`: what the read cache loads for the first
page and the summary), one page of 1,000 products (`rows_page`), and every page of the
output CSV in turn.

    .venv/bin/python services/status/scripts/page_cost.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from imgpipe.launcher.embedded import embedded_mongo
from imgpipe.status.adapters.repository import REQUESTS, StatusRepository
from imgpipe.status.handlers import change_for

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.support import events  # noqa: E402

PAGE = 1000


async def best_of(read: Callable[[], Awaitable[Any]], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        await read()
        best = min(best, time.perf_counter() - started)
    return best * 1000


async def store(repository: StatusRepository, request_id: str, rows: int, previous: bool) -> None:
    urls = [
        [f"https://cdn.example.com/catalogue/{r}-{p}.jpg?v=1" for p in range(3)]
        for r in range(rows)
    ]
    catalogue = events.rows_of(urls)
    received = change_for(events.received(request_id, catalogue))
    if previous:  # as the version before row pages stored it
        fields = {k: v for k, v in received.fields.items() if k != "rows_in_pages"}
        fields["rows"] = [row.model_dump() for row in catalogue]
        await repository.requests.database[REQUESTS].update_one(
            {"_id": request_id}, {"$set": fields}, upsert=True
        )
    else:
        await repository.write([received])
    outcomes = [
        change_for(events.processed(request_id, r, p, input_url=urls[r][p]))
        for r in range(rows)
        for p in range(3)
    ]
    for start in range(0, len(outcomes), 2000):
        await repository.write(outcomes[start : start + 2000])


async def measure(url: str, rows: int) -> None:
    client: AsyncMongoClient = AsyncMongoClient(url)
    try:
        for name, previous in (("rows in pages", False), ("rows in the request", True)):
            repository = StatusRepository(client[f"cost_{int(previous)}"])
            await repository.ensure_indexes()
            await store(repository, "req-large", rows, previous)
            await measure_layout(repository, rows, name)
    finally:
        await client.close()


async def measure_layout(repository: StatusRepository, rows: int, name: str) -> None:
    middle = (rows // 2 // PAGE) * PAGE

    async def whole_csv() -> None:
        for start in range(0, rows, PAGE):
            await repository.rows_page("req-large", start, PAGE)

    whole = await best_of(lambda: repository.get("req-large"))
    page = await best_of(lambda: repository.rows_page("req-large", middle, PAGE))
    csv = await best_of(whole_csv, runs=1)
    print(
        f"{rows:,} rows, {name}: whole document {whole:.0f} ms, "
        f"a page of {PAGE:,} products {page:.0f} ms, every CSV page {csv:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data, embedded_mongo(Path(data)) as url:
        asyncio.run(measure(url, args.rows))


if __name__ == "__main__":
    main()
