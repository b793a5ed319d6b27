"""Record outcomes that finish together in one bulk write, one counter bump per request,
and one burst of publishes.

An outcome waits up to `window` seconds for others (and outcomes that finish while a
batch is being written go together in the next one): SecantusDB spends ~0.5 ms per
operation on top of its per-document work, and a batch costs one counter update per
request instead of one per image. The wait holds the job's prefetch slot, so the
processor's prefetch leaves room for it (bootstrap.prefetch). A job is acked only after
its batch is stored and its ImageProcessed confirmed (its `record` returns then), so
"ack after the work is stored" holds for every job in a batch.

Each ImageProcessed leaves with its request's counters as they stand after the batch's
bump (`Tally`): status shows a large request's progress from them without counting.

A crash between the outcome write and the counter bump leaves the counters behind, as
it could one image at a time: the redelivered job finds its outcome and repairs them
(Processor._replay).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from imgpipe.contracts.batching import Batcher
from imgpipe.contracts.events import CloudEvent, ImageProcessed, Tally
from imgpipe.processor.adapters.repository import Doc, Outcome, ProcessorRepository, tally_of

# Outcomes in flight are bounded by the prefetch anyway; this only caps a write's size.
MAX_BATCH = 100
# With one image per codec worker, outcomes finish evenly spread: at 0.03 s a batch held
# about 4 of them (a journaled counter bump each), at 0.1 s about 6.5, and the CPU per
# image outside the codec fell by 0.3 to 0.4 ms.
WINDOW = 0.1

PublishMany = Callable[[Sequence[CloudEvent]], Awaitable[None]]


@dataclass(frozen=True)
class Recorded:
    """What recording one outcome did: `stored` False means a duplicate job stored this
    image's outcome first (that one stands); `request` is the request after the bump."""

    stored: bool
    request: Doc | None


@dataclass(frozen=True)
class _Item:
    outcome: Outcome
    event: CloudEvent  # the ImageProcessed to publish if this outcome is stored


class OutcomeBatcher:
    def __init__(
        self, repository: ProcessorRepository, publish_many: PublishMany, window: float = WINDOW
    ) -> None:
        self._repository = repository
        self._publish_many = publish_many
        self._batches: Batcher[_Item, Recorded] = Batcher(
            self._write, window=window, max_batch=MAX_BATCH, name="outcome-batches"
        )

    async def record(self, outcome: Outcome, event: CloudEvent) -> Recorded:
        """Store the outcome, bump its request's counter and publish `event`; returns once
        all three are done (raises if they could not be)."""
        return await self._batches.submit(_Item(outcome, event))

    async def _write(self, batch: list[_Item]) -> list[Recorded]:
        stored = await self._repository.record_outcomes([item.outcome for item in batch])
        mine = [item for item, was_set in zip(batch, stored, strict=True) if was_set]
        requests = await self._repository.count_batch([item.outcome for item in mine])
        # Publish the whole batch before any job checks completion: RequestCompleted
        # then never overtakes an ImageProcessed of its own batch.
        await self._publish_many(
            [_with_tally(item.event, requests[item.outcome.request_id]) for item in mine]
        )
        return [
            Recorded(True, requests[item.outcome.request_id]) if was_set else Recorded(False, None)
            for item, was_set in zip(batch, stored, strict=True)
        ]


def _with_tally(event: CloudEvent, request: Doc) -> CloudEvent:
    """The ImageProcessed carrying its request's totals after this batch's count."""
    if not isinstance(event.data, ImageProcessed):
        return event
    data = event.data.model_copy(update={"tally": Tally(**tally_of(request))})
    return event.model_copy(update={"data": data})
