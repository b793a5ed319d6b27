"""Settings read from the environment: what a deployment's variables turn into."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from imgpipe.contracts.settings import Settings


def test_api_keys_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_API_KEYS", " k1 ,k2,, ")
    assert Settings().api_keys == ["k1", "k2"]


@pytest.mark.parametrize("key", ["clé", "two words", "tab\there"])
def test_an_api_key_no_client_could_send_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("IMGPIPE_API_KEYS", f"good,{key}")
    with pytest.raises(ValidationError, match="printable ASCII"):
        Settings()
