"""The web console's files as ingest serves them: the page, its script and style, the
config it reads, and the Content-Security-Policy on each (the browser tests are in
tests/test_console.py)."""

from __future__ import annotations

import httpx

from imgpipe.contracts.settings import Settings
from imgpipe.ingest.app import create_app


def client(settings: Settings) -> httpx.AsyncClient:
    # The console's routes never touch the Runtime: no lifespan, no broker needed.
    transport = httpx.ASGITransport(app=create_app(settings))
    return httpx.AsyncClient(transport=transport, base_url="http://ingest")


async def test_the_page_and_its_files_carry_a_strict_policy() -> None:
    settings = Settings(public_base_url="https://status.example.com/")
    async with client(settings) as http:
        page = await http.get("/")
        script = await http.get("/console/console.js")
        style = await http.get("/console/console.css")
        missing = await http.get("/console/other.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/console/console.js" defer></script>' in page.text
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    assert missing.status_code == 422
    for answer in (page, script, style):
        policy = answer.headers["content-security-policy"]
        directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'"
        assert directives["style-src"] == "'self'"
        assert directives["connect-src"] == "'self' https://status.example.com"
        assert directives["img-src"] == "'self' http: https:"
        assert directives["frame-ancestors"] == "'none'"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"


async def test_config_tells_the_page_where_status_is_and_whether_a_key_is_needed() -> None:
    async with client(Settings(status_port=9102)) as http:
        open_config = (await http.get("/console/config.json")).json()
    async with client(Settings(IMGPIPE_API_KEYS="k1,k2")) as http:
        keyed = await http.get("/console/config.json")
        page = await http.get("/")
        upload = await http.post("/upload")
    assert open_config["status_base_url"] == "http://127.0.0.1:9102"
    assert open_config["api_key_required"] is False
    # The page and its config hold no data: open like the docs; the API stays guarded.
    assert keyed.status_code == 200 and keyed.json()["api_key_required"] is True
    assert "k1" not in keyed.text
    assert page.status_code == 200
    assert upload.status_code == 401


def test_the_console_files_are_in_the_package() -> None:
    # hatch puts every file under src/imgpipe in the wheel (checked with `uv build`).
    from imgpipe.ingest import web_console

    for name in ("index.html", "console.js", "console.css"):
        assert (web_console.STATIC / name).is_file()
