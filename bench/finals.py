"""How the benchmark learns that a request is final, the ways an integrator would: a
RequestCompleted on the events exchange (a queue of its own bound to
`request.completed`) and the final webhook. Either one sends it to read the status,
instead of re-reading a growing status document many times a second (which would cost
the status service and this process CPU that the codec needs)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

import aio_pika
from corpus import loopback

from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology

FINAL_TYPES = {"request.completed", "request.error"}


class Finals:
    """One event per request id, set when the request is heard to be final."""

    def __init__(self) -> None:
        self._events: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self._lock = threading.Lock()

    def event(self, request_id: str) -> threading.Event:
        with self._lock:
            return self._events[request_id]

    def heard_webhook(self, body: bytes) -> None:
        try:
            payload = json.loads(body)
        except ValueError:
            return
        if isinstance(payload, dict) and payload.get("type") in FINAL_TYPES:
            self.event(str(payload.get("request_id"))).set()


@contextmanager
def receive_webhooks(finals: Finals) -> Iterator[str]:
    """Serve on 127.0.0.1 (a free port); yields the webhook URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            finals.heard_webhook(self.rfile.read(length))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with loopback(Handler) as base_url:
        yield f"{base_url}/hooks"


@contextmanager
def hear_completions(namespace: str, finals: Finals) -> Iterator[None]:
    """Listen for RequestCompleted on the namespace's events exchange, in a thread."""
    loop = asyncio.new_event_loop()
    ready, stop = threading.Event(), asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(_listen(namespace, finals, ready, stop),)
    )
    thread.start()
    ready.wait(30)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


async def _listen(
    namespace: str, finals: Finals, ready: threading.Event, stop: asyncio.Event
) -> None:
    connection = await aio_pika.connect(Settings().amqp_url)
    try:
        channel = await connection.channel()
        topology = Topology(namespace)
        events = await channel.declare_exchange(
            topology.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(events, "request.completed")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                finals.event(str(json.loads(message.body).get("subject"))).set()

        await queue.consume(on_message)
        ready.set()
        await stop.wait()
    finally:
        ready.set()
        await connection.close()
