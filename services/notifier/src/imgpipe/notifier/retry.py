"""What to do after an attempt: done, retry later (when), or give up."""

from __future__ import annotations

import random
from dataclasses import dataclass

from imgpipe.notifier.webhooks import DELIVERED, FAILED, PENDING

MAX_RETRY_AFTER = 24 * 3600.0
RETRYABLE_4XX = frozenset({408, 429})


@dataclass(frozen=True)
class Decision:
    status: str  # DELIVERED, PENDING (retry) or FAILED
    delay: float | None = None  # seconds until the retry


def decide(
    status_code: int | None,
    tries: int,
    schedule: list[float],
    retry_after: float | None = None,
    rng: random.Random | None = None,
    *,
    refused: bool = False,
) -> Decision:
    """`tries` counts this attempt. Network errors arrive as status_code None.

    2xx is delivered. Other 4xx (but 408 and 429) is the receiver saying no: final.
    So is a URL the SSRF guard refuses (`refused`): asking again will not change it.
    Anything else is retried after the schedule's next delay with +-20% jitter (so
    many deliveries failing together do not come back together), and never sooner
    than the receiver's Retry-After; once the schedule is used up it has failed.
    """
    if status_code is not None and 200 <= status_code < 300:
        return Decision(DELIVERED)
    if refused:
        return Decision(FAILED)
    if status_code is not None and 400 <= status_code < 500 and status_code not in RETRYABLE_4XX:
        return Decision(FAILED)
    if tries > len(schedule):
        return Decision(FAILED)
    delay = schedule[tries - 1] * (rng or random).uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return Decision(PENDING, delay)
