"""Wiring: every adapter the processor uses is built here, and only here."""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image
from pymongo import AsyncMongoClient

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.mongo import connect, service_database
from imgpipe.contracts.outbound import outbound_client
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.processor.adapters.cloudinary_storage import CloudinaryStorage, parse_cloudinary_url
from imgpipe.processor.adapters.download import Downloader, RetryPolicy
from imgpipe.processor.adapters.host_limits import HostLimits
from imgpipe.processor.adapters.repository import ProcessorRepository
from imgpipe.processor.adapters.storage import LocalStorage, Storage
from imgpipe.processor.backlog import Backlog
from imgpipe.processor.compress import Compressed, CompressError, compress, within_time
from imgpipe.processor.handlers import BACKLOG_PER_WORKER, JOBS_QUEUE, Processor

log = logging.getLogger(__name__)

REQUESTS_QUEUE = "processor.requests"
# How long shutdown waits for jobs in progress; the broker redelivers the rest.
SHUTDOWN_GRACE = 20.0

T = TypeVar("T")
Compress = Callable[[bytes, int, int], Compressed]


def worker_count(settings: Settings) -> int:
    return settings.workers or os.cpu_count() or 1


def prefetch(settings: Settings) -> int:
    """Jobs in hand at once (each holds up to jobs.IMAGES_PER_JOB images).

    A job is acknowledged when its last image is recorded, and on real hosts images
    wait: for a host's turn (at most IMGPIPE_PER_HOST_CONNECTIONS at once), 40 ms and
    more for the first byte, up to 5 s for a retry. Images in hand that wait hold no
    bytes (the Backlog bounds those), so many are held: with the earlier `workers + 2`
    jobs, a remote host with hiccups kept the pool idle half the time (measured in the
    benchmark's remote-host phase). Still few enough to leave work in the queue for
    other processor instances."""
    return settings.prefetch or 4 * (worker_count(settings) + 2)


def build_storage(settings: Settings) -> Storage:
    """The one place the storage backend is chosen: Cloudinary when CLOUDINARY_URL is set,
    else local files. A CLOUDINARY_URL that cannot work is refused here, at start-up
    (CloudinaryConfigError), rather than at the first image."""
    if settings.cloudinary_url:
        config = parse_cloudinary_url(settings.cloudinary_url, settings.cloudinary_folder)
        log.info(
            "storage: Cloudinary cloud %s, folder %s",
            config.cloud_name,
            config.folder or "(top level)",
        )
        return CloudinaryStorage(config, threads=prefetch(settings))
    return LocalStorage(settings.media_dir, settings.media_base_url)


def build_downloader(settings: Settings) -> Downloader:
    """Downloads with the settings' limits: size, time, per-host politeness, retries."""
    return Downloader(
        outbound_client(settings, per_host=settings.per_host_connections),
        settings.max_image_bytes,
        settings.download_timeout,
        hosts=HostLimits(settings.per_host_connections),
        policy=RetryPolicy(attempts=settings.download_attempts, max_wait=settings.max_retry_wait),
    )


class PoolCompressor:
    """Runs `compress` in a process pool, keeping the event loop free for I/O.

    A worker that dies (a crashing decoder, the OOM killer, an image over `time_limit`
    seconds) breaks the whole pool: every image then in it fails with BrokenProcessPool,
    though only one was to blame. Each of them is run again alone, with nothing else in
    the pool, so a second death can only be its own: that image fails, and the others go
    on."""

    def __init__(
        self,
        workers: int,
        max_pixels: int,
        time_limit: float = 60.0,
        function: Compress = compress,
    ) -> None:
        self.workers = workers
        self.max_pixels = max_pixels
        self.time_limit = time_limit
        self._function = function  # a seam for tests: a module-level function
        self._pool = self._new_pool()
        self._in_flight = 0
        self._idle = asyncio.Event()  # set while no image is in the pool
        self._idle.set()
        self._solo = asyncio.Lock()  # held while an image runs alone

    def _new_pool(self) -> ProcessPoolExecutor:
        # Not plain fork: forking a process that runs threads (pymongo, asyncio) can deadlock.
        # A forkserver is single-threaded, imports Pillow once and forks workers cheaply.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["imgpipe.processor.compress"])
        return ProcessPoolExecutor(self.workers, mp_context=context)

    async def warm_up(self) -> None:
        """Start every worker and run the codec once in it now, so the first request does
        not wait for process start-up, Pillow's plugin registry or the codec libraries."""
        loop = asyncio.get_running_loop()
        pool, sample = self._pool, _sample_jpeg()
        await asyncio.gather(
            *(
                loop.run_in_executor(pool, compress, sample, 50, self.max_pixels)
                for _ in range(self.workers)
            )
        )

    async def __call__(self, data: bytes, quality: int) -> Compressed:
        if self._solo.locked():  # wait while an image runs alone; then share the pool
            async with self._solo:
                pass
        try:
            return await self._run(data, quality)
        except BrokenProcessPool:
            return await self._run_alone(data, quality)

    async def _run_alone(self, data: bytes, quality: int) -> Compressed:
        async with self._solo:
            await self._idle.wait()
            try:
                return await self._run(data, quality)
            except BrokenProcessPool:
                message = f"decoding this image crashed or took longer than {self.time_limit:g} s"
                raise CompressError("decode_error", message) from None

    async def _run(self, data: bytes, quality: int) -> Compressed:
        pool = self._pool
        self._in_flight += 1
        self._idle.clear()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                pool, within_time, self.time_limit, self._function, data, quality, self.max_pixels
            )
        except BrokenProcessPool:
            if self._pool is pool:  # the first to notice replaces it
                log.error("image worker died; starting a new pool")
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            raise
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _sample_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "gray").save(buffer, "JPEG")
    return buffer.getvalue()


class Drain:
    """Tracks handlers in progress so shutdown can let them finish.

    Bus has no way to cancel a consumer, so after `stop` a newly delivered message is
    parked, never settled: closing the connection hands it back to the broker."""

    def __init__(self) -> None:
        self._stopping = False
        self._running: set[asyncio.Task[object]] = set()
        self._parked: set[asyncio.Task[object]] = set()

    def wrap(self, handler: Callable[[T], Awaitable[None]]) -> Callable[[T], Awaitable[None]]:
        async def wrapped(item: T) -> None:
            task = asyncio.current_task()
            assert task is not None
            if self._stopping:
                self._parked.add(task)
                await asyncio.Event().wait()
            self._running.add(task)
            try:
                await handler(item)
            finally:
                self._running.discard(task)

        return wrapped

    async def stop(self, grace: float) -> None:
        self._stopping = True
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=grace)
            if pending:
                log.warning("%d jobs still running at shutdown: redelivered", len(pending))

    async def cancel_rest(self) -> None:
        rest = self._running | self._parked
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)


@dataclass
class Runtime:
    """Everything a running processor holds; `start` and `stop` bracket its life."""

    settings: Settings
    mongo: AsyncMongoClient
    bus: Bus
    compressor: PoolCompressor
    processor: Processor
    drain: Drain

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        mongo = connect(settings)
        compressor = PoolCompressor(
            worker_count(settings), settings.max_image_pixels, settings.image_time_limit
        )
        downloader = build_downloader(settings)
        bus: Bus | None = None
        warming = asyncio.ensure_future(compressor.warm_up())
        try:
            repository = ProcessorRepository(service_database(mongo, settings, "processor"))
            await repository.ensure_indexes()
            topology = Topology(settings.namespace, settings.delivery_limit)
            bus = await Bus.connect(
                settings.amqp_url,
                topology,
                prefetch=prefetch(settings),
                service="processor",
            )
            processor = Processor(
                backlog=Backlog(BACKLOG_PER_WORKER * worker_count(settings)),
                repository=repository,
                bus=bus,
                storage=build_storage(settings),
                download=downloader,
                compressor=compressor,
                topology=topology,
                instance=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
            )
            await warming
            drain = Drain()
            await bus.consume(JOBS_QUEUE, drain.wrap(processor.on_job_message))
            await bus.consume_events(REQUESTS_QUEUE, drain.wrap(processor.on_event))
        except BaseException:
            warming.cancel()
            if bus is not None:
                await bus.close()
            await downloader.aclose()
            compressor.shutdown()
            await mongo.close()
            raise
        return cls(settings, mongo, bus, compressor, processor, drain)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        await self.drain.stop(grace)
        await self.bus.close()  # unsettled messages go back to the queue
        await self.drain.cancel_rest()
        await self.processor.download.aclose()
        self.compressor.shutdown()
        await self.mongo.close()
