"""Fixtures for ingest tests: the app on the real broker and database, an event tap, a
TCP proxy in front of the broker so a test can take the broker away and bring it back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.contracts.events import RequestReceived
from imgpipe.contracts.mongo import connect, service_database
from imgpipe.contracts.settings import Settings
from imgpipe.ingest.app import create_app
from imgpipe.ingest.config import OutboxConfig
from tests.support.apps import serving
from tests.support.tap import EventTap, event_tap

# A brisk relay so outbox tests finish quickly; they never assert on durations.
FAST_OUTBOX = OutboxConfig(
    interval=0.1, grace=0.3, lease=2.0, publish_timeout=2.0, connect_retry=0.2
)
WAIT = 60.0  # generous ceiling for anything that happens in the background


@asynccontextmanager
async def _running(
    settings: Settings, outbox: OutboxConfig = FAST_OUTBOX
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings, outbox=outbox)
    async with serving(app, "http://ingest") as client:
        yield app, client


@pytest.fixture
def run_ingest() -> Callable[..., Any]:
    """`async with run_ingest(settings) as (app, client): ...`"""
    return _running


@pytest.fixture
async def received_events(settings: Settings) -> AsyncIterator[EventTap]:
    """Hears the RequestReceived events ingest publishes."""
    async with event_tap(settings, (RequestReceived.routing_key,)) as tap:
        yield tap


@pytest.fixture
async def ingest_db(settings: Settings) -> AsyncIterator[AsyncDatabase]:
    client = connect(settings)
    try:
        yield service_database(client, settings, "ingest")
    finally:
        await client.close()


class TcpProxy:
    """Forwards a local port to the broker; `down()` cuts every connection and refuses new
    ones (accept, then close) until `up()`. A real outage, without touching the broker."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.is_up = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.down()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def up(self) -> None:
        self.is_up = True

    def down(self) -> None:
        self.is_up = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.is_up:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(
            _pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True
        )
        for each in (writer, upstream_writer):
            self._writers.discard(each)
            each.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


@pytest.fixture
async def broker_proxy(settings: Settings) -> AsyncIterator[TcpProxy]:
    target = urlsplit(settings.amqp_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    yield proxy
    await proxy.stop()


def proxied(settings: Settings, proxy: TcpProxy) -> Settings:
    """The same settings with the broker reached through `proxy` (quick reconnects)."""
    target = urlsplit(settings.amqp_url)
    netloc = target.netloc.rsplit("@", 1)
    credentials = netloc[0] + "@" if len(netloc) == 2 else ""
    url = f"{target.scheme}://{credentials}127.0.0.1:{proxy.port}{target.path or '/'}"
    return settings.model_copy(update={"amqp_url": url + "?reconnect_interval=0.3"})


@pytest.fixture
def via_proxy() -> Callable[[Settings, TcpProxy], Settings]:
    return proxied
