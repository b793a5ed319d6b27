"""A test's own namespace on the shared broker and database server, and its removal."""

from __future__ import annotations

import asyncio

import aio_pika
from pymongo import MongoClient

from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology

SERVICES = ("ingest", "processor", "status", "notifier")


def remove_namespace(settings: Settings) -> None:
    """Delete the namespace's queues and exchanges and drop its services' databases."""
    asyncio.run(_delete_topology(settings))
    with MongoClient(settings.mongodb_url) as client:
        for service in SERVICES:
            client.drop_database(settings.database_name(service))


async def _delete_topology(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        await Topology(settings.namespace).delete(await connection.channel())
