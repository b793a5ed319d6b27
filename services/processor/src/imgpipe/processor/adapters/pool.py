"""The worker processes the codec runs in, keeping the event loop free for I/O.

Each worker is a process of its own with a socket to the event loop, and runs one image
at a time: the bytes go down the socket as they are, the result comes back pickled. The
event loop reads and writes the sockets itself, so the hand-off takes no thread, no
lock and no pickled copy of the input (a ProcessPoolExecutor's manager and feeder
threads, and its worker's reads and unpickling, cost about 0.4 ms more CPU per 500 KB
image in the processor and 0.2 ms more in the worker: README, "Against the reference").

A worker that dies (a crashing decoder, the OOM killer, an image over `time_limit`
seconds) fails only the image it was running, and a new one takes its place.
"""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from PIL import Image

from imgpipe.contracts.events import Options
from imgpipe.processor.compress import Compressed, CompressError, compress, within_time

log = logging.getLogger(__name__)

Compress = Callable[[bytes, Options, int], Compressed]

# multiprocessing.Connection's framing, which the worker side reads and writes: a
# signed 32-bit length, or -1 and an unsigned 64-bit one for a frame of 2 GiB or more.
_SHORT, _LONG = struct.Struct("!i"), struct.Struct("!Q")
SEND_BUFFER = 2 << 20  # bytes
STOP_TIMEOUT = 5.0  # seconds a worker has to exit once its socket is closed


class PoolCompressor:
    """Runs `function` (compress) in `workers` processes, one image each at a time."""

    def __init__(
        self,
        workers: int,
        max_pixels: int,
        time_limit: float = 60.0,
        function: Compress = compress,
    ) -> None:
        self.workers = workers
        self.max_pixels = max_pixels
        self.time_limit = time_limit
        self._function = function  # a seam for tests: a module-level function
        # Not plain fork: forking a process that runs threads (pymongo, asyncio) can deadlock.
        # A forkserver is single-threaded, imports Pillow once and forks workers cheaply.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["imgpipe.processor.compress", "simplejpeg"])
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()
        self._started: asyncio.Future[None] | None = None
        self._respawning: set[asyncio.Future[None]] = set()  # held, or the loop may drop them
        self._closed = False

    async def warm_up(self) -> None:
        """Start every worker and run the codec once in it now, so the first request does
        not wait for process start-up, Pillow's plugin registry or the codec libraries."""
        await self._start()
        workers = [await self._idle.get() for _ in range(self.workers)]
        try:
            sample = _sample_jpeg()
            await asyncio.gather(*(self._ask(w, compress, sample, Options()) for w in workers))
        finally:
            for worker in workers:
                self._idle.put_nowait(worker)

    async def __call__(self, data: bytes, options: Options) -> Compressed:
        await self._start()
        worker = await self._idle.get()
        try:
            failed, value = await self._ask(worker, self._function, data, options)
        except (ConnectionError, asyncio.IncompleteReadError):
            self._replace(worker, "died")
            message = f"decoding this image crashed or took longer than {self.time_limit:g} s"
            raise CompressError("decode_error", message) from None
        except BaseException:  # cancelled mid-image: its answer would go to the next one
            self._replace(worker, "was left mid-image")
            raise
        self._idle.put_nowait(worker)
        if failed:
            raise value
        return value

    async def _ask(
        self, worker: _Worker, function: Compress, data: bytes, options: Options
    ) -> tuple[bool, Any]:
        """Run `function` on `data` in `worker`: (False, its result) or (True, the
        exception it raised)."""
        work = pickle.dumps((function, options, self.max_pixels, self.time_limit))
        worker.writer.write(_header(len(work)) + work)
        worker.writer.write(_header(len(data)))
        worker.writer.write(data)  # as it is: no pickled copy of ~500 KB
        # Our own worker's answer, over a socket pair no other process holds (as
        # multiprocessing itself does).
        answer: tuple[bool, Any] = pickle.loads(await _read_frame(worker.reader))  # noqa: S301
        return answer

    async def _start(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self._spawn_all())
        await asyncio.shield(self._started)

    async def _spawn_all(self) -> None:
        for _ in range(self.workers):
            self._idle.put_nowait(await self._spawn())

    async def _spawn(self) -> _Worker:
        ours, theirs = self._context.Pipe(duplex=True)  # a socket pair
        process = self._context.Process(target=_serve, args=(theirs,), daemon=True)
        # Blocking (the first start launches the forkserver): off the event loop.
        await asyncio.to_thread(process.start)
        theirs.close()
        sock = socket.socket(fileno=os.dup(ours.fileno()))
        ours.close()
        # Room for a whole image: written in one go, not a wake-up per 200 KB (the
        # kernel caps it at net.core.wmem_max).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        # A buffer as large: an answer is read whole, without pausing the socket.
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=SEND_BUFFER)
        worker = _Worker(process, reader, writer)
        self._all.add(worker)
        return worker

    def _replace(self, worker: _Worker, what: str) -> None:
        """End `worker` and start another in its place (unless the pool is closing)."""
        log.error("image worker (pid %s) %s; starting another", worker.process.pid, what)
        self._all.discard(worker)
        worker.end()
        if not self._closed:
            respawn = asyncio.ensure_future(self._respawn())
            self._respawning.add(respawn)
            respawn.add_done_callback(self._respawning.discard)

    async def _respawn(self) -> None:
        while not self._closed:
            try:
                self._idle.put_nowait(await self._spawn())
                return
            except Exception:
                log.exception("could not start an image worker; trying again in 1 s")
                await asyncio.sleep(1)

    async def aclose(self) -> None:
        """Close every worker's socket (it exits when it has read to the end), then
        wait for them; a worker still busy after STOP_TIMEOUT is killed."""
        self._closed = True
        for respawn in self._respawning:
            respawn.cancel()
        workers = list(self._all)
        self._all.clear()
        for worker in workers:
            worker.writer.close()
        await asyncio.to_thread(_join_all, [w.process for w in workers])


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def end(self) -> None:
        self.writer.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(0)  # reaps it if it is gone already; never waits


def _join_all(processes: list[BaseProcess]) -> None:
    for process in processes:
        process.join(STOP_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()


def _header(size: int) -> bytes:
    if size > 0x7FFFFFFF:
        return _SHORT.pack(-1) + _LONG.pack(size)
    return _SHORT.pack(size)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = _SHORT.unpack(await reader.readexactly(_SHORT.size))
    if size == -1:
        (size,) = _LONG.unpack(await reader.readexactly(_LONG.size))
    return await reader.readexactly(size)


def _serve(connection: Connection) -> None:
    """A worker's life: run each image sent, answer (failed, result or exception); exit
    when the socket closes."""
    # Ctrl-C reaches the whole process group: the processor stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            work = pickle.loads(connection.recv_bytes())  # noqa: S301 - from the processor
            function, options, max_pixels, time_limit = work
            data = connection.recv_bytes()
        except EOFError:
            return
        try:
            answer: tuple[bool, object] = (
                False,
                within_time(time_limit, function, data, options, max_pixels),
            )
        except Exception as exc:  # raised in the event loop's process instead
            answer = (True, exc)
        try:
            reply = pickle.dumps(answer)
        except Exception as exc:  # an exception that cannot be pickled
            reply = pickle.dumps((True, RuntimeError(f"{type(exc).__name__}: {answer[1]!r}")))
        connection.send_bytes(reply)


def _sample_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "gray").save(buffer, "JPEG")
    return buffer.getvalue()
