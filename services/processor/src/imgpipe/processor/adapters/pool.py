"""The process pool the codec runs in, keeping the event loop free for I/O."""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from PIL import Image

from imgpipe.contracts.events import Options
from imgpipe.processor.compress import Compressed, CompressError, compress, within_time

log = logging.getLogger(__name__)

Compress = Callable[[bytes, Options, int], Compressed]


class PoolCompressor:
    """Runs `compress` in a process pool.

    A worker that dies (a crashing decoder, the OOM killer, an image over `time_limit`
    seconds) breaks the whole pool: every image then in it fails with BrokenProcessPool,
    though only one was to blame. Each of them is run again alone, with nothing else in
    the pool, so a second death can only be its own: that image fails, and the others go
    on."""

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
        self._pool = self._new_pool()
        self._in_flight = 0
        self._idle = asyncio.Event()  # set while no image is in the pool
        self._idle.set()
        self._solo = asyncio.Lock()  # held while an image runs alone

    def _new_pool(self) -> ProcessPoolExecutor:
        # Not plain fork: forking a process that runs threads (pymongo, asyncio) can deadlock.
        # A forkserver is single-threaded, imports Pillow once and forks workers cheaply.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["imgpipe.processor.compress"])
        return ProcessPoolExecutor(self.workers, mp_context=context)

    async def warm_up(self) -> None:
        """Start every worker and run the codec once in it now, so the first request does
        not wait for process start-up, Pillow's plugin registry or the codec libraries."""
        loop = asyncio.get_running_loop()
        pool, sample = self._pool, _sample_jpeg()
        await asyncio.gather(
            *(
                loop.run_in_executor(pool, compress, sample, Options(), self.max_pixels)
                for _ in range(self.workers)
            )
        )

    async def __call__(self, data: bytes, options: Options) -> Compressed:
        if self._solo.locked():  # wait while an image runs alone; then share the pool
            async with self._solo:
                pass
        try:
            return await self._run(data, options)
        except BrokenProcessPool:
            return await self._run_alone(data, options)

    async def _run_alone(self, data: bytes, options: Options) -> Compressed:
        async with self._solo:
            await self._idle.wait()
            try:
                return await self._run(data, options)
            except BrokenProcessPool:
                message = f"decoding this image crashed or took longer than {self.time_limit:g} s"
                raise CompressError("decode_error", message) from None

    async def _run(self, data: bytes, options: Options) -> Compressed:
        pool = self._pool
        self._in_flight += 1
        self._idle.clear()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                pool, within_time, self.time_limit, self._function, data, options, self.max_pixels
            )
        except BrokenProcessPool:
            if self._pool is pool:  # the first to notice replaces it
                log.error("image worker died; starting a new pool")
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            raise
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _sample_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "gray").save(buffer, "JPEG")
    return buffer.getvalue()
