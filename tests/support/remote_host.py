"""A loopback image host that behaves like a real one far away, and counts what it saw.

Real image hosts (a supplier's CDN, a Shopify or S3 bucket) answer tens of milliseconds
late, allow a client a handful of connections and answer 429 beyond them, hiccup with a
503 now and then, reset connections and stall. `RemoteHost` does all of that on
127.0.0.1, for the tests and for the benchmark's "remote host" phase:

- host-wide behaviour (`Behaviour`): latency before each answer, a limit on connections
  with a request in progress, with 429 + Retry-After beyond it, and a 503 on the first
  request for one path in N;
- per-path scripts: the answers to give to the first requests for a path (a status with
  or without Retry-After, a reset, a stall), after which the path's file is served;
- validators (`Behaviour(etags=True)`): every file is served with an ETag (a hash of
  its bytes, so a file whose bytes change gets a new one), and a request whose
  If-None-Match names the current one is answered 304 Not Modified, without a body.

A "path" here is the request target with its query string (`/img.jpg?v=2` is another URL
than `/img.jpg`, as for any cache); files are looked up without the query.

It runs its own asyncio loop in a thread (one socket per connection, no thread per
connection), serves files with `sendfile`, and records every request, the peak number
of connections open at once and the peak number of requests being answered at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path

IDLE_TIMEOUT = 60.0  # seconds an idle keep-alive connection stays open


@dataclass(frozen=True)
class Status:
    """Answer with this status; `retry_after` is sent as the Retry-After header (a
    callable is called at answer time, for HTTP dates relative to now)."""

    code: int
    retry_after: str | Callable[[], str] | None = None


@dataclass(frozen=True)
class Reset:
    """Read the request, then reset the connection without an answer."""


@dataclass(frozen=True)
class Stall:
    """Read the request, send nothing for `seconds`, then close the connection."""

    seconds: float


Answer = Status | Reset | Stall


def http_date_in(seconds: float) -> Callable[[], str]:
    """A Retry-After value `seconds` from the moment it is sent, as an HTTP date."""
    return lambda: formatdate(time.time() + seconds, usegmt=True)


@dataclass(frozen=True)
class Behaviour:
    latency: float = 0.0  # seconds before each answer's first byte
    # Connections with a request in progress beyond this get 429s (as nginx's
    # limit_conn counts them: idle keep-alive connections do not count).
    max_connections: int | None = None
    throttle_retry_after: str | None = "1"  # Retry-After sent with those 429s
    hiccup_one_in: int = 0  # the first request for one path in N answers 503 (0: never)
    etags: bool = False  # send ETags and answer a matching If-None-Match with 304


@dataclass(frozen=True)
class Seen:
    path: str
    status: int  # 0 for a reset or a stall
    at: float  # time.monotonic()
    headers: Mapping[str, str]


@dataclass
class _Counts:
    open: int = 0
    peak_open: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0


class RemoteHost:
    def __init__(
        self,
        files: Mapping[str, bytes] | None = None,
        directory: Path | None = None,
        behaviour: Behaviour = Behaviour(),
    ) -> None:
        self.files = dict(files or {})
        self.directory = directory
        self.behaviour = behaviour
        self.seen: list[Seen] = []
        self._scripts: dict[str, list[Answer]] = {}
        self._requests_per_path: Counter[str] = Counter()
        self._counts = _Counts()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping = asyncio.Event()
        self.port = 0

    # Set-up ---------------------------------------------------------------------------

    def add(self, path: str, body: bytes, *script: Answer) -> str:
        """Serve `body` at `path` after answering its first requests with `script`."""
        self.files[path] = body
        self._scripts[path] = list(script)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # What it saw ----------------------------------------------------------------------

    @property
    def peak_connections(self) -> int:
        return self._counts.peak_open

    @property
    def peak_in_flight(self) -> int:
        return self._counts.peak_in_flight

    def requests_for(self, path: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if seen.path == path]

    def statuses(self) -> Counter[int]:
        with self._lock:
            return Counter(seen.status for seen in self.seen)

    def conditional(self) -> list[Seen]:
        """The requests that named an ETag (If-None-Match), answered 304 or not."""
        with self._lock:
            return [seen for seen in self.seen if "if-none-match" in seen.headers]

    # Serving --------------------------------------------------------------------------

    def start(self) -> RemoteHost:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self._server = started.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=128)

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            self._stopping.set()  # ends stalls and idle waits
            for writer in list(self._writers):
                writer.transport.abort()
            await asyncio.sleep(0.05)  # let every connection see its end

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts = self._counts
        counts.open += 1
        counts.peak_open = max(counts.peak_open, counts.open)
        self._writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            counts.open -= 1
            self._writers.discard(writer)
            with suppress(Exception):
                writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection is to close."""
        async with asyncio.timeout(IDLE_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        method, path, headers = _parse_head(head)
        counts = self._counts
        limit = self.behaviour.max_connections
        answer = self._answer_for(path, over_limit=limit is not None and counts.in_flight >= limit)
        counts.in_flight += 1
        counts.peak_in_flight = max(counts.peak_in_flight, counts.in_flight)
        try:
            if self.behaviour.latency:
                await asyncio.sleep(self.behaviour.latency)
            self._record(path, answer, headers)
            return await self._send(reader, writer, method, path, answer, headers)
        finally:
            counts.in_flight -= 1

    def _answer_for(self, path: str, over_limit: bool) -> Answer | None:
        """The scripted or host-wide fault for this request, or None to serve the file."""
        behaviour = self.behaviour
        with self._lock:
            self._requests_per_path[path] += 1
            first = self._requests_per_path[path] == 1
            script = self._scripts.get(path)
            scripted = script.pop(0) if script else None
        if scripted is not None:
            return scripted
        if over_limit:
            return Status(429, behaviour.throttle_retry_after)
        if (
            first
            and behaviour.hiccup_one_in
            and zlib.crc32(path.encode()) % behaviour.hiccup_one_in == 0
        ):
            return Status(503)
        return None

    def _record(self, path: str, answer: Answer | None, headers: Mapping[str, str]) -> None:
        if answer is None:
            if self._body_source(path) is None:
                status = 404
            else:
                status = 304 if self._not_modified(path, headers) else 200
        else:
            status = answer.code if isinstance(answer, Status) else 0
        with self._lock:
            self.seen.append(Seen(path, status, time.monotonic(), headers))

    async def _send(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        answer: Answer | None,
        headers: Mapping[str, str],
    ) -> bool:
        if isinstance(answer, Reset):
            _reset(writer)
            return False
        if isinstance(answer, Stall):
            await self._stall(reader, answer.seconds)
            return False
        if isinstance(answer, Status):
            extra = {}
            if answer.retry_after is not None:
                value = answer.retry_after
                extra["Retry-After"] = value() if callable(value) else value
            body = f"{answer.code}\n".encode()
            await _write(writer, answer.code, body, "text/plain", extra, method)
            return True
        source = self._body_source(path)
        etag = self._etag(path)
        validators = {"ETag": etag} if etag else {}
        if source is None:
            await _write(writer, 404, b"not found\n", "text/plain", {}, method)
        elif self._not_modified(path, headers):
            writer.write(_head_bytes(304, 0, "image/jpeg", validators, with_length=False))
            await writer.drain()
        elif isinstance(source, bytes):
            await _write(writer, 200, source, "image/jpeg", validators, method)
        else:
            await _send_file(writer, source, method, validators)
        return True

    async def _stall(self, reader: asyncio.StreamReader, seconds: float) -> None:
        """Send nothing for `seconds`, ending early when the host stops or the client
        hangs up: a real server sees the client's FIN, and a connection the client has
        closed must not count as open (the per-host limit checks count them)."""
        waits = [
            asyncio.ensure_future(self._stopping.wait()),
            asyncio.ensure_future(reader.read()),  # returns at the client's FIN
        ]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def _etag(self, target: str) -> str | None:
        """The file's ETag when the host sends them: a hash of its bytes (of its size and
        modification time for a file on disk, as nginx makes them)."""
        if not self.behaviour.etags:
            return None
        source = self._body_source(target)
        if isinstance(source, bytes):
            return f'"{zlib.crc32(source):08x}-{len(source):x}"'
        if isinstance(source, Path):
            stat = source.stat()
            return f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
        return None

    def _not_modified(self, target: str, headers: Mapping[str, str]) -> bool:
        etag = self._etag(target)
        asked = headers.get("if-none-match")
        return etag is not None and asked is not None and etag in _tags(asked)

    def _body_source(self, target: str) -> bytes | Path | None:
        """What `target` serves; the query string is ignored (it makes URLs distinct)."""
        path = target.split("?", 1)[0]
        if path in self.files:
            return self.files[path]
        if self.directory is not None:
            candidate = self.directory / path.lstrip("/")
            if candidate.parent == self.directory and candidate.is_file():
                return candidate
        return None


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _tags(value: str) -> list[str]:
    """The entity tags of an If-None-Match value, compared weakly (RFC 9110, 13.1.2)."""
    return [tag.strip().removeprefix("W/") for tag in value.split(",")]


def _head_bytes(
    status: int, length: int, content_type: str, extra: Mapping[str, str], with_length: bool = True
) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    if with_length:  # a 304 has no body, and says nothing of the body it stands for
        lines.append(f"Content-Length: {length}")
    lines.append(f"Content-Type: {content_type}")
    lines += [f"{name}: {value}" for name, value in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str,
    extra: Mapping[str, str],
    method: str,
) -> None:
    writer.write(_head_bytes(status, len(body), content_type, extra))
    if method != "HEAD":
        writer.write(body)
    await writer.drain()


async def _send_file(
    writer: asyncio.StreamWriter, path: Path, method: str, extra: Mapping[str, str]
) -> None:
    # A local file in the page cache: opening it costs microseconds, no thread needed.
    with path.open("rb") as handle:  # noqa: ASYNC230
        size = os.fstat(handle.fileno()).st_size
        writer.write(_head_bytes(200, size, "image/jpeg", extra))
        await writer.drain()
        if method != "HEAD":
            await asyncio.get_running_loop().sendfile(writer.transport, handle)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextmanager
def remote_host(
    files: Mapping[str, bytes] | None = None,
    directory: Path | None = None,
    behaviour: Behaviour = Behaviour(),
) -> Iterator[RemoteHost]:
    host = RemoteHost(files, directory, behaviour).start()
    try:
        yield host
    finally:
        host.stop()


__all__ = [
    "Answer",
    "Behaviour",
    "RemoteHost",
    "Reset",
    "Seen",
    "Stall",
    "Status",
    "http_date_in",
    "remote_host",
]
