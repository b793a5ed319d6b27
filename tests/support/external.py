"""Runs docs/examples/external_consumer.py, exactly as documented, beside a test."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import threading
import time
from pathlib import Path
from types import ModuleType

import aio_pika

from imgpipe.contracts.topology import Topology

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "external_consumer.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("external_consumer", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ExternalConsumer:
    """The example's `listen()` on its own loop in a thread; collects what it hears."""

    def __init__(self, amqp_url: str, topology: Topology) -> None:
        self.amqp_url = amqp_url
        self.topology = topology
        self.queue_name = topology.name("external-test")
        self.events: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        listen = load_example().listen

        async def on_event(event: dict) -> None:
            self.events.append(event)

        self._task = self._loop.create_task(
            listen(self.amqp_url, on_event, self.queue_name, self.topology.events_exchange)
        )
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)

    def __enter__(self) -> ExternalConsumer:
        self._thread.start()
        asyncio.run(self._wait_for_queue())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)
        asyncio.run(self._delete_queue())

    def wait_for(self, event_type: str, subject: str, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e["type"] == event_type and e["subject"] == subject for e in self.events):
                return list(self.events)
            time.sleep(0.1)
        raise AssertionError(f"no {event_type} for {subject}; heard {len(self.events)} events")

    async def _wait_for_queue(self) -> None:
        """The example declares its queue; wait until it exists with its bindings in place."""
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            for _ in range(100):
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(self.queue_name, passive=True)
                    if queue.declaration_result.consumer_count:
                        return
                except aio_pika.exceptions.ChannelClosed:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("the example consumer never declared its queue")

    async def _delete_queue(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(self.queue_name, if_unused=False, if_empty=False)
