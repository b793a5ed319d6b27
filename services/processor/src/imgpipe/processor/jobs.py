"""The processor's private work item: one message per image on "processor.jobs"."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from imgpipe.contracts.events import RequestReceived, image_key


class Job(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    request_id: str
    image_key: str
    row_index: int
    position: int
    input_url: str
    quality: int

    @property
    def message_id(self) -> str:
        return f"{self.request_id}:{self.image_key}"

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def jobs_for(request: RequestReceived) -> list[Job]:
    """One job per input URL, in input order."""
    return [
        Job(
            request_id=request.request_id,
            image_key=image_key(row_index, position),
            row_index=row_index,
            position=position,
            input_url=url,
            quality=request.options.quality,
        )
        for row_index, row in enumerate(request.rows)
        for position, url in enumerate(row.input_urls)
    ]
