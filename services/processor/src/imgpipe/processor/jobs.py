"""The processor's private work item on "processor.jobs": a few images of one request.

A job carries up to IMAGES_PER_JOB images rather than one: every broker message costs
a publish, a delivery, an ack and a database lookup whatever it carries, and on two
cores that overhead competed with the codec. A handful of images still spreads a
request over every processor instance.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from imgpipe.contracts.events import RequestReceived, image_key

IMAGES_PER_JOB = 8


class JobImage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    image_key: str
    row_index: int
    position: int
    input_url: str


class Job(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    request_id: str
    quality: int
    images: tuple[JobImage, ...]

    @model_validator(mode="before")
    @classmethod
    def _one_image_jobs(cls, data: Any) -> Any:
        """Jobs queued by an earlier version held one image at the top level."""
        if isinstance(data, dict) and "images" not in data and "image_key" in data:
            return {**data, "images": [data]}
        return data

    @property
    def message_id(self) -> str:
        first, last = self.images[0].image_key, self.images[-1].image_key
        return f"{self.request_id}:{first}" + (f"..{last}" if last != first else "")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def jobs_for(request: RequestReceived, per_job: int = IMAGES_PER_JOB) -> list[Job]:
    """Every input URL in input order, `per_job` to a job."""
    images = [
        JobImage(
            image_key=image_key(row_index, position),
            row_index=row_index,
            position=position,
            input_url=url,
        )
        for row_index, row in enumerate(request.rows)
        for position, url in enumerate(row.input_urls)
    ]
    return [
        Job(
            request_id=request.request_id,
            quality=request.options.quality,
            images=tuple(images[start : start + per_job]),
        )
        for start in range(0, len(images), per_job)
    ]
