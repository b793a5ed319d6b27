"""The processor's private work item on "processor.jobs": a few images of one request.

A job carries up to IMAGES_PER_JOB images rather than one: every broker message costs
a publish, a delivery, an ack and a database lookup whatever it carries, and on two
cores that overhead competed with the codec. A handful of images still spreads a
request over every processor instance.

An image is one distinct URL of the request. The same URL in several cells (a shared
placeholder, a size chart) is downloaded and compressed once; its other places ride
along in `also` and get the same outcome.

A parked image (its host asked for a long pause, docs/architecture.md "Downloads")
travels alone in a job of its own, carrying the attempts made so far and the time
before which it is not to be tried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

from pydantic import BaseModel, ConfigDict

from imgpipe.contracts.events import Options, RequestReceived, image_key

IMAGES_PER_JOB = 8
JOBS_QUEUE = "processor.jobs"
# Sends in flight together: confirms overlap (~0.35 ms each instead of ~1.1 ms in a loop).
SEND_BATCH = 500

Send = Callable[[str, bytes, str], Awaitable[None]]  # queue key, body, message id
Spot = tuple[int, int]  # a place as (row index, position), until its job is built


class Place(BaseModel):
    """Where an input URL sits in the CSV."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    image_key: str
    row_index: int
    position: int


class JobImage(Place):
    """A URL to process, at its first place; `also` are its other places."""

    input_url: str
    also: tuple[Place, ...] = ()
    attempts: int = 0  # download attempts made already (a parked image)
    first_attempt_at: float | None = None  # epoch seconds of the first of them
    not_before: float | None = None  # epoch seconds before which not to try again

    @property
    def places(self) -> tuple[Place, ...]:
        return (
            Place(image_key=self.image_key, row_index=self.row_index, position=self.position),
            *self.also,
        )


class Job(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    request_id: str
    options: Options = Options()
    images: tuple[JobImage, ...]
    round: int = 0  # 0 for the request's first run; N for its Nth retry of failed images
    refresh: bool = False  # reuse no earlier output: download and encode anew

    @property
    def message_id(self) -> str:
        first, last = self.images[0], self.images[-1]
        suffix = f"..{last.image_key}" if last is not first else ""
        retry = f"#{first.attempts}" if len(self.images) == 1 and first.attempts else ""
        in_round = f":r{self.round}" if self.round else ""
        return f"{self.request_id}{in_round}:{first.image_key}{suffix}{retry}"

    def parked(
        self, image: JobImage, attempts: int, first_attempt_at: float | None, not_before: float
    ) -> Job:
        """A job of `image` alone, to be tried again from `not_before` on."""
        update = {
            "attempts": attempts,
            "first_attempt_at": first_attempt_at,
            "not_before": not_before,
        }
        return Job(
            request_id=self.request_id,
            options=self.options,
            images=(image.model_copy(update=update),),
            round=self.round,
            refresh=self.refresh,
        )

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_defaults=True).encode()


def jobs_for(request: RequestReceived, per_job: int = IMAGES_PER_JOB) -> Iterator[Job]:
    """Every distinct input URL in input order, `per_job` to a job. The jobs are built as
    they are taken: a request of 100,000 images holds one plain tuple per place, not
    every job at once (about 1.3 KB a place as models)."""
    places: dict[str, list[Spot]] = {}  # URL -> its places, first one first
    for row_index, row in enumerate(request.rows):
        for position, url in enumerate(row.input_urls):
            places.setdefault(url, []).append((row_index, position))
    return _jobs(request.request_id, request.options, places, 0, per_job, request.refresh)


def retry_jobs(
    request_id: str,
    options: Options,
    round: int,
    failed: Iterable[Mapping[str, Any]],
    per_job: int = IMAGES_PER_JOB,
    refresh: bool = False,
) -> Iterator[Job]:
    """Jobs of round `round` for the image records of failed images, one download per URL."""
    places: dict[str, list[Spot]] = {}
    for doc in sorted(failed, key=lambda d: (d["row_index"], d["position"])):
        places.setdefault(doc["input_url"], []).append((doc["row_index"], doc["position"]))
    return _jobs(request_id, options, places, round, per_job, refresh)


def _place(spot: Spot) -> Place:
    row_index, position = spot
    return Place(image_key=image_key(row_index, position), row_index=row_index, position=position)


def _jobs(
    request_id: str,
    options: Options,
    places: Mapping[str, list[Spot]],
    round: int,
    per_job: int,
    refresh: bool = False,
) -> Iterator[Job]:
    urls = iter(places.items())
    while chunk := list(islice(urls, per_job)):
        images = tuple(
            JobImage(
                image_key=image_key(*first),
                row_index=first[0],
                position=first[1],
                input_url=url,
                also=tuple(map(_place, also)),
            )
            for url, (first, *also) in chunk
        )
        yield Job(
            request_id=request_id, options=options, images=images, round=round, refresh=refresh
        )


async def send_jobs(send: Send, jobs: Iterable[Job]) -> int:
    """Send the jobs to the jobs queue, `SEND_BATCH` at a time (never all built at once);
    returns how many were sent."""
    pending, sent = iter(jobs), 0
    while batch := list(islice(pending, SEND_BATCH)):
        await asyncio.gather(*(send(JOBS_QUEUE, job.to_bytes(), job.message_id) for job in batch))
        sent += len(batch)
    return sent
