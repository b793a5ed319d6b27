"""Wiring: every adapter the processor uses is built here, and only here."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from pymongo import AsyncMongoClient

from imgpipe.contracts.bus import Bus, BusLink
from imgpipe.contracts.mongo import connect, ping, service_database
from imgpipe.contracts.outbound import outbound_client
from imgpipe.contracts.service import Resources, keep_trying
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.processor.adapters.cloudinary_storage import (
    CloudinaryConfigError,
    CloudinaryStorage,
    parse_cloudinary_url,
)
from imgpipe.processor.adapters.download import Downloader, RetryPolicy
from imgpipe.processor.adapters.host_limits import HostLimits
from imgpipe.processor.adapters.pool import PoolCompressor
from imgpipe.processor.adapters.repository import ProcessorRepository
from imgpipe.processor.adapters.storage import LocalStorage, Storage
from imgpipe.processor.backlog import Backlog
from imgpipe.processor.config import ProcessorConfig
from imgpipe.processor.drain import Drain
from imgpipe.processor.handlers import BACKLOG_PER_WORKER, Processor
from imgpipe.processor.jobs import JOBS_QUEUE
from imgpipe.processor.metrics import watch_queue

log = logging.getLogger(__name__)

REQUESTS_QUEUE = "processor.requests"

SHARED_STORAGE_REQUIRED = (
    "IMGPIPE_REQUIRE_SHARED_STORAGE is set but CLOUDINARY_URL is not: local storage is one "
    "directory on one machine, which other processor replicas and the status service cannot "
    "see. Set CLOUDINARY_URL, or unset IMGPIPE_REQUIRE_SHARED_STORAGE to run on one machine."
)


def worker_count(settings: Settings) -> int:
    return settings.workers or os.cpu_count() or 1


def prefetch(settings: Settings) -> int:
    """Jobs in hand at once (each holds up to jobs.IMAGES_PER_JOB images).

    A job is acknowledged when its last image is recorded, and on real hosts images
    wait: for a host's turn (at most IMGPIPE_PER_HOST_CONNECTIONS at once), 40 ms and
    more for the first byte, up to 5 s for a retry. Images in hand that wait hold no
    bytes (the Backlog bounds those), so many are held: with `workers + 2` jobs, a
    remote host with hiccups kept the pool idle half the time (measured in the
    benchmark's remote-host phase). Still few enough to leave work in the queue for
    other processor instances."""
    return settings.prefetch or 4 * (worker_count(settings) + 2)


def build_storage(settings: Settings) -> Storage:
    """The one place the storage backend is chosen: Cloudinary when CLOUDINARY_URL is set,
    else local files. A CLOUDINARY_URL that cannot work is refused here, at start-up
    (CloudinaryConfigError), rather than at the first image, and so is local storage when
    IMGPIPE_REQUIRE_SHARED_STORAGE says the processors do not share one machine."""
    if settings.require_shared_storage and not settings.cloudinary_url:
        raise CloudinaryConfigError(SHARED_STORAGE_REQUIRED)
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


@dataclass
class Runtime:
    """Everything a running processor holds; `start` and `stop` bracket its life."""

    config: ProcessorConfig
    mongo: AsyncMongoClient
    link: BusLink
    drain: Drain
    resources: Resources

    @classmethod
    async def start(cls, settings: Settings, config: ProcessorConfig) -> Runtime:
        """Build and wire everything. The database and the broker need not answer yet:
        indexes are created and the consumers declared once they do."""
        storage = build_storage(settings)  # a bad CLOUDINARY_URL stops start-up here
        resources = Resources()
        try:
            resources.push("closing the storage", storage.aclose)
            mongo = connect(settings)
            resources.push("closing the database client", mongo.close)
            repository = ProcessorRepository(service_database(mongo, settings, "processor"))
            resources.task(keep_trying(repository.ensure_indexes, "creating the indexes"))

            compressor = PoolCompressor(
                worker_count(settings), settings.max_image_pixels, settings.image_time_limit
            )
            resources.push("stopping the image workers", compressor.aclose)
            await compressor.warm_up()
            downloader = build_downloader(settings)
            resources.push("closing the download client", downloader.aclose)

            topology = Topology(settings.namespace, settings.delivery_limit)
            drain = Drain()
            resources.push("cancelling the jobs left", drain.cancel_rest)

            async def consume(bus: Bus) -> None:  # once the broker answers
                await bus.consume(JOBS_QUEUE, drain.wrap(processor.on_job_message))
                await bus.consume_events(REQUESTS_QUEUE, drain.wrap(processor.on_event))

            link = BusLink(
                lambda: Bus.connect(
                    settings.amqp_url, topology, prefetch=prefetch(settings), service="processor"
                ),
                on_connect=consume,
                retry_interval=config.connect_retry,
            )
            processor = Processor(
                backlog=Backlog(BACKLOG_PER_WORKER * worker_count(settings)),
                repository=repository,
                bus=link,
                storage=storage,
                download=downloader,
                compressor=compressor,
                topology=topology,
                instance=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
            )
            # Closing the connection hands the unsettled messages back to the broker.
            resources.push("closing the broker connection", link.close)
            await link.start()
            queue_name = topology.queue_name(JOBS_QUEUE)
            resources.task(
                asyncio.create_task(watch_queue(link, queue_name), name="jobs-queue-length")
            )
        except BaseException:
            await resources.close()
            raise
        return cls(config, mongo, link, drain, resources)

    async def readiness(self) -> dict[str, bool]:
        return {"broker": self.link.is_connected, "database": await ping(self.mongo)}

    async def stop(self) -> None:
        # Jobs in progress get the grace period (longer than a bounded stop step), then
        # the resources go in reverse order: broker first, so nothing new arrives.
        await self.drain.stop(self.config.shutdown_grace)
        await self.resources.close()
