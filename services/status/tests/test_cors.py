"""The status service lets the web console's origin (ingest's `GET /`) read it from a
browser, with the API key in Authorization, and no other origin."""

from __future__ import annotations

import httpx

from imgpipe.contracts.settings import Settings
from imgpipe.status.app import create_app


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }


async def test_the_console_origin_may_call_with_its_key(tmp_path) -> None:
    settings = Settings(ingest_port=9001, IMGPIPE_DATA_DIR=tmp_path)
    assert settings.console_origins == ["http://127.0.0.1:9001", "http://localhost:9001"]
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://status") as http:
        allowed = await http.options("/status/abc", headers=preflight("http://localhost:9001"))
        other = await http.options("/status/abc", headers=preflight("http://evil.example"))
        simple = await http.get("/healthz", headers={"Origin": "http://127.0.0.1:9001"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:9001"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers  # no cookies
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    assert simple.headers["access-control-allow-origin"] == "http://127.0.0.1:9001"


def test_console_origins_setting_replaces_the_default() -> None:
    settings = Settings(
        ingest_port=9001,
        IMGPIPE_CONSOLE_ORIGINS=" https://console.example.com/ , http://10.0.0.5:8001",
    )
    assert settings.console_origins == ["https://console.example.com", "http://10.0.0.5:8001"]
