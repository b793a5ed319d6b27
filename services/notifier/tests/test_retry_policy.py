"""The retry policy and the retry schedule setting, without any I/O."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook

from imgpipe.contracts.retry_after import parse_retry_after
from imgpipe.contracts.settings import Settings
from imgpipe.notifier.retry import decide

SCHEDULE = [5.0, 300.0]
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize("code", [200, 201, 204, 299])
def test_2xx_is_delivered(code: int) -> None:
    assert decide(code, 1, SCHEDULE).status == "delivered"


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 413, 422])
def test_other_4xx_is_final(code: int) -> None:
    decision = decide(code, 1, SCHEDULE)
    assert decision.status == "failed" and decision.delay is None


@pytest.mark.parametrize("code", [None, 408, 429, 500, 502, 503, 504, 301])
def test_network_errors_408_429_and_5xx_are_retried_on_schedule(code: int | None) -> None:
    first = decide(code, 1, SCHEDULE, rng=random.Random(1))
    second = decide(code, 2, SCHEDULE, rng=random.Random(1))
    assert first.status == second.status == "pending"
    assert 4.0 <= first.delay <= 6.0  # 5 s with +-20% jitter
    assert 240.0 <= second.delay <= 360.0
    assert decide(code, 3, SCHEDULE).status == "failed"  # schedule used up


def test_retry_after_is_never_undercut() -> None:
    assert decide(429, 1, SCHEDULE, retry_after=120).delay == 120
    assert 4.0 <= decide(429, 1, SCHEDULE, retry_after=1).delay <= 6.0
    assert decide(503, 1, SCHEDULE, retry_after=10**9).delay == 24 * 3600


def test_retry_after_forms() -> None:
    assert parse_retry_after("120", NOW) == 120
    later = NOW + timedelta(seconds=90)
    assert parse_retry_after(later.strftime("%a, %d %b %Y %H:%M:%S GMT"), NOW) == 90
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None


def test_schedule_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEBHOOK_RETRY_SCHEDULE", raising=False)
    assert sum(Settings().webhook_retry_schedule) > 20 * 3600  # about a day by default
    monkeypatch.setenv("WEBHOOK_RETRY_SCHEDULE", "5s, 5m,2h,1.5")
    assert Settings().webhook_retry_schedule == [5, 300, 7200, 1.5]


def test_generated_secret_is_a_valid_standard_webhooks_secret(tmp_path) -> None:
    settings = Settings(IMGPIPE_DATA_DIR=tmp_path)
    secret = settings.resolved_webhook_secret
    assert secret.startswith("whsec_")
    Webhook(secret)  # raises on a malformed secret
    assert Settings(IMGPIPE_DATA_DIR=tmp_path).resolved_webhook_secret == secret  # kept


def test_a_url_the_ssrf_guard_refuses_is_final() -> None:
    assert decide(None, 1, SCHEDULE, refused=True).status == "failed"
