"""Fixtures for the status service's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pymongo import AsyncMongoClient

from imgpipe.contracts.mongo import connect
from imgpipe.contracts.settings import Settings


@pytest.fixture
async def mongo(settings: Settings) -> AsyncIterator[AsyncMongoClient]:
    """A client of the test's database server (its databases are the test's own)."""
    client = connect(settings)
    try:
        yield client
    finally:
        await client.close()
