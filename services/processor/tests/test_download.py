"""Downloads against a real loopback HTTP server: size cap, status, sniffing, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest

from imgpipe.contracts.outbound import outbound_client
from imgpipe.contracts.settings import Settings
from imgpipe.processor.adapters.download import DownloadError, download
from tests.support.http_server import LoopbackServer, Response, loopback_server
from tests.support.images import jpeg_bytes, png_with_alpha_bytes


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with loopback_server() as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with outbound_client(Settings(IMGPIPE_ALLOW_PRIVATE_URLS=True), timeout=5) as client:
        yield client


async def failure(client: httpx.AsyncClient, url: str, max_bytes: int = 10**7) -> DownloadError:
    with pytest.raises(DownloadError) as raised:
        await download(client, url, max_bytes)
    return raised.value


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A server speaking HTTP by hand, for what the loopback server will not do; yields
    its base URL."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


class EndlessChunks:
    """Sends one chunk after another until the client hangs up (or 100 MB); counts them."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk
        self.sent = 0

    async def send(self, writer: asyncio.StreamWriter) -> None:
        try:
            while self.sent < 10**8:
                writer.write(b"%x\r\n%s\r\n" % (len(self.chunk), self.chunk))
                self.sent += len(self.chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def test_image_is_downloaded_whatever_its_content_type(
    server: LoopbackServer, client: httpx.AsyncClient
) -> None:
    png = png_with_alpha_bytes()
    url = server.add("/photo", Response(png, content_type="text/plain"))
    assert await download(client, url, 10**7) == png


async def test_redirects_are_followed(server: LoopbackServer, client: httpx.AsyncClient) -> None:
    jpeg = jpeg_bytes()
    server.add("/new", Response(jpeg, content_type="image/jpeg"))
    url = server.add("/old", Response(status=302, headers={"Location": server.url("/new")}))
    assert await download(client, url, 10**7) == jpeg


async def test_http_error_names_the_status(
    server: LoopbackServer, client: httpx.AsyncClient
) -> None:
    error = await failure(client, server.url("/missing"))
    assert error.code == "http_error"
    assert "404" in error.message


async def test_html_served_as_jpeg_is_not_an_image(
    server: LoopbackServer, client: httpx.AsyncClient
) -> None:
    url = server.add("/fake.jpg", Response(b"<html>hello</html>", content_type="image/jpeg"))
    assert (await failure(client, url)).code == "not_an_image"


async def test_declared_size_over_the_cap_is_too_large(
    server: LoopbackServer, client: httpx.AsyncClient
) -> None:
    url = server.add("/big.jpg", Response(jpeg_bytes(), content_type="image/jpeg"))
    assert (await failure(client, url, max_bytes=1000)).code == "too_large"


async def test_streamed_body_over_the_cap_stops_reading(client: httpx.AsyncClient) -> None:
    """A chunked response without Content-Length that never ends: the cap must cut it."""
    body = EndlessChunks(b"\xff\xd8\xff" + b"\0" * 8189)

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await body.send(writer)

    async with raw_server(endless) as base_url:
        error = await failure(client, f"{base_url}/stream", max_bytes=100_000)
    assert error.code == "too_large"
    assert body.sent < 10**8


async def test_slow_server_is_a_timeout(server: LoopbackServer) -> None:
    url = server.add("/slow", Response(jpeg_bytes(), delay=3))
    async with outbound_client(Settings(IMGPIPE_ALLOW_PRIVATE_URLS=True), timeout=0.2) as client:
        assert (await failure(client, url)).code == "timeout"


async def test_unreachable_host_is_a_download_failure(client: httpx.AsyncClient) -> None:
    with loopback_server() as gone:
        url = gone.url("/x")
    error = await failure(client, url)
    assert error.code == "download_failed"
    assert error.message


async def test_slow_drip_past_the_deadline_is_a_timeout(client: httpx.AsyncClient) -> None:
    """A byte every 50 ms never trips a read timeout; the whole-download deadline stops it."""
    dripped = 0

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dripped
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n\xff\xd8\xff")
        try:
            while dripped < 100_000:
                writer.write(b"\0")
                dripped += 1
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async with raw_server(drip) as base_url:
        with pytest.raises(DownloadError) as raised:
            await download(client, f"{base_url}/drip", 10**7, deadline=1.0)
    assert raised.value.code == "timeout"
    assert dripped < 1_000  # stopped after about a second, not after the whole body


async def test_refused_address_is_reported_as_refused() -> None:
    async with outbound_client(Settings(IMGPIPE_ALLOW_PRIVATE_URLS=False), timeout=5) as client:
        with pytest.raises(DownloadError) as raised:
            await download(client, "http://169.254.169.254/latest/meta-data/", 10**7)
    assert raised.value.code == "url_refused"
    assert "169.254.169.254" in raised.value.message


async def test_a_compressed_body_is_refused_unread(
    server: LoopbackServer, client: httpx.AsyncClient
) -> None:
    """A few hundred gzipped bytes can inflate to gigabytes: images are asked for as is,
    and a server that encodes one anyway is refused before anything is decoded."""
    inflated = gzip.compress(jpeg_bytes() + b"\0" * 10_000_000)
    url = server.add(
        "/bomb.jpg",
        Response(inflated, content_type="image/jpeg", headers={"Content-Encoding": "gzip"}),
    )
    error = await failure(client, url)
    assert error.code == "download_failed"
    assert "gzip-encoded" in error.message
    [request] = server.requests_to("/bomb.jpg")
    assert request.headers["Accept-Encoding"] == "identity"


async def test_a_redirect_body_is_never_read(client: httpx.AsyncClient) -> None:
    """The body of a redirect is not the image: an endless one must not hold the download."""
    jpeg = jpeg_bytes()
    redirect_body = EndlessChunks(b"\0" * 8192)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        if request.startswith(b"GET /image"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(jpeg), jpeg))
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: /image\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        await redirect_body.send(writer)

    async with raw_server(serve) as base_url:
        body = await download(client, f"{base_url}/old", 10**7, deadline=10)
    assert body == jpeg
    assert redirect_body.sent < 10**7
