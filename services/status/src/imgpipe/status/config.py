"""Status-only settings: the read cache (env `IMGPIPE_STATUS_CACHE_*`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ReadCacheConfig(BaseSettings):
    """How long a rendered answer is served without reading the database again.

    A request still in progress may change with every event, so its answer is kept only
    `ttl` seconds: hot polling costs one database read per `ttl` per instance, and an
    answer is at most `ttl` (plus one read) behind the events. A final answer with every
    image known no longer changes; it is kept `final_ttl` (a bound in case a replayed
    event moves `updated_at`) or until evicted. `max_bytes` bounds the memory (LRU);
    0 turns the cache off.
    """

    model_config = SettingsConfigDict(env_prefix="IMGPIPE_STATUS_CACHE_", extra="ignore")

    ttl: float = Field(default=0.25, ge=0)
    # A request in progress whose read takes long (its outcomes are read whole for the
    # counts and totals: ~0.9 s at 60,000 images on SecantusDB) is kept at least its read
    # time / `read_share`, and only a status change drops it early, so that polling one
    # request keeps an instance reading at most this share of the time, whatever its size.
    read_share: float = Field(default=0.2, gt=0, le=1)
    # Seconds past its time an answer of a request in progress may still be served while
    # a fresh read runs in the background (stale-while-revalidate); 0: every poll after
    # the TTL or a write waits for the read.
    stale: float = Field(default=5.0, ge=0)
    final_ttl: float = Field(default=300.0, ge=0)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
