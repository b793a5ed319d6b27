"""Tools for fault tests: the broker's own view (rabbitmqctl), event taps, the dead-letter
queue, a database that can be stopped and started again, and polling helpers."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import httpx
import pytest

from imgpipe.contracts.topology import Topology
from imgpipe.launcher.embedded import embedded_mongo, free_port

T = TypeVar("T")


# Polling ------------------------------------------------------------------------------


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll until `probe` returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def get_json(client: httpx.Client, url: str) -> dict | None:
    try:
        response = client.get(url)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def is_ready(client: httpx.Client, base_url: str) -> bool | None:
    """True/False from /readyz; None when the service does not answer at all."""
    try:
        return client.get(f"{base_url}/readyz").status_code == 200
    except httpx.HTTPError:
        return None


def wait_finished(client: httpx.Client, status_url: str, timeout: float = 120) -> dict:
    def finished() -> dict | None:
        body = get_json(client, status_url)
        return body if body and body["status"] in ("completed", "error") else None

    return wait_until(finished, timeout, f"{status_url} to finish")


# The user's view of a finished request -----------------------------------------------------


def csv_upload(urls: list[str], per_row: int = 2) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for row, start in enumerate(range(0, len(urls), per_row), start=1):
        writer.writerow([str(row), f"Product {row}", ",".join(urls[start : start + per_row])])
    return text.getvalue().encode()


def output_urls(client: httpx.Client, status_url: str) -> list[str]:
    """Every cell of the output CSV's `Output Image Urls` column, in input order."""
    response = client.get(f"{status_url}/output.csv")
    assert response.status_code == 200, response.text
    rows = list(csv.DictReader(io.StringIO(response.text)))
    return [url for row in rows for url in row["Output Image Urls"].split(",")]


def media_files(media_dir: Path, request_id: str) -> list[str]:
    """Names of the files under the media folder: the request's own and the shared ones
    (`objects/`; each test has its own data directory), temporary files included."""
    folders = (media_dir / request_id, media_dir / "objects")
    return sorted(path.name for folder in folders if folder.exists() for path in folder.iterdir())


# Listening on the events exchange ----------------------------------------------------------


@dataclass
class Heard:
    id: str
    routing_key: str
    body: bytes


@dataclass
class DurableTap:
    """A durable queue of the test's own bound to the events exchange: what an outsider
    hears. For the fault tests, which are synchronous (they drive the services as OS
    processes and kill them): the queue keeps what arrives, and `drain` reads it on
    demand. The in-process tests use tests/support/tap.py, which listens as it runs."""

    amqp_url: str
    topology: Topology
    routing_keys: tuple[str, ...]
    queue_name: str = ""
    heard: list[Heard] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queue_name = self.queue_name or self.topology.name(f"tap-{uuid.uuid4().hex[:6]}")

    def __enter__(self) -> DurableTap:
        asyncio.run(self._declare())
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run(_delete_queue(self.amqp_url, self.queue_name))

    def drain(self) -> list[Heard]:
        """Take what arrived since the last call; returns everything heard so far."""
        asyncio.run(self._drain())
        return self.heard

    def ids(self, routing_key: str) -> list[str]:
        return [h.id for h in self.drain() if h.routing_key == routing_key]

    async def _declare(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            events = await self.topology.declare(channel)
            queue = await channel.declare_queue(self.queue_name, durable=True)
            for key in self.routing_keys:
                await queue.bind(events, key)

    async def _drain(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(self.queue_name, durable=True)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                heard = Heard(message.message_id or "", message.routing_key or "", message.body)
                self.heard.append(heard)


def dead_letters(amqp_url: str, topology: Topology) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Everything in the namespace's dead-letter queue (taken off it)."""

    async def take() -> list[aio_pika.abc.AbstractIncomingMessage]:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await topology.declare(channel)
            queue = await channel.declare_queue(
                topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
            taken = []
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                taken.append(message)
            return taken

    return asyncio.run(take())


async def _delete_queue(amqp_url: str, name: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name, if_unused=False, if_empty=False)


# The broker's own tools ------------------------------------------------------------------

_CONNECTION_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout


def require_rabbitmqctl(amqp_url: str) -> None:
    host = urlsplit(amqp_url).hostname
    if shutil.which("rabbitmqctl") is None or host not in ("127.0.0.1", "localhost"):
        pytest.skip("needs rabbitmqctl for the broker under test")


def broker_connections(name_prefix: str, vhost: str = "/") -> dict[str, str]:
    """{connection pid: client-provided name} for the connections whose name starts so."""
    found = {}
    output = rabbitmqctl("list_connections", "-p", vhost, "-s", "pid", "client_properties")
    for line in output.splitlines():
        pid, _, properties = line.partition("\t")
        match = _CONNECTION_NAME.search(properties)
        if match and match.group(1).startswith(name_prefix):
            found[pid.strip()] = match.group(1)
    return found


def close_broker_connections(name_prefix: str, vhost: str = "/") -> dict[str, str]:
    """Close only the matching connections (others on this shared broker live on)."""
    connections = broker_connections(name_prefix, vhost)
    for pid in connections:
        rabbitmqctl("close_connection", pid, "test: broker connection dropped")
    return connections


def queue_consumers(vhost: str) -> dict[str, int]:
    output = rabbitmqctl("list_queues", "-p", vhost, "-s", "name", "consumers")
    pairs = (line.split("\t") for line in output.splitlines() if "\t" in line)
    return {name: int(count) for name, count in pairs}


@contextmanager
def own_vhost(amqp_url: str, name: str) -> Iterator[str]:
    """A vhost for one test (its connections can be held off without touching others);
    yields the AMQP URL that points at it."""
    rabbitmqctl("add_vhost", name)
    try:
        user = urlsplit(amqp_url).username or "guest"
        rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        parts = urlsplit(amqp_url)
        yield urlunsplit(parts._replace(path="/" + quote(name, safe="")))
    finally:
        rabbitmqctl("delete_vhost", name)


def limit_connections(vhost: str, limit: int) -> None:
    """`max-connections` of a vhost: 0 refuses every new connection, -1 lifts the limit."""
    rabbitmqctl("set_vhost_limits", "-p", vhost, f'{{"max-connections": {limit}}}')


# A database of the test's own --------------------------------------------------------------


class RestartableMongo:
    """SecantusDB on a fixed port and storage dir, stopped and started again at will."""

    def __init__(self, storage: Path, log_file: Path) -> None:
        self.storage = storage
        self.log_file = log_file
        self.port = free_port()
        self.url = f"mongodb://127.0.0.1:{self.port}/"
        self._stack: ExitStack | None = None

    def start(self) -> None:
        stack = ExitStack()
        stack.enter_context(embedded_mongo(self.storage, self.port, log_file=self.log_file))
        self._stack = stack

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __enter__(self) -> RestartableMongo:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
