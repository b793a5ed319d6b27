"""The shape every service shares (docs/architecture.md, "Service shape").

Each service has the same files for the same roles: `config.py` (its own settings),
`bootstrap.py` (a Runtime that starts and stops every resource the service holds),
a thin `app.py` (`service_app`), `routes.py` (routers that reach the runtime through
`Depends`), `handlers.py` (the logic) and `adapters/` (the outside world).

What lives here, once:

- `Runtime`: what a bootstrap builds. `readiness()` feeds `/readyz`; `stop()` releases
  everything, in reverse order of start.
- `Resources`: an ordered stack of cleanups for a Runtime; a start that fails half-way
  releases what it had taken, and each step of a stop is bounded in time.
- `keep_trying`: a step retried in the background until it succeeds. A service starts
  whether or not the database and broker answer (`/readyz` says 503 meanwhile) and
  connects when it can.
- `service_app`: the FastAPI app over a Runtime, with the health routes. Routes reach
  the Runtime through a dependency of the service's own, typed with its Runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import APIRouter, FastAPI

from imgpipe.contracts.metrics import instrument
from imgpipe.contracts.web import health_router

log = logging.getLogger(__name__)

# A stop step still running after this long is logged and left behind: its state is in
# the database and the broker, so nothing is lost, and shutdown must end.
STOP_STEP_SECONDS = 10.0
RETRY_INTERVAL = 2.0  # seconds between attempts of a step retried in the background


class Runtime(Protocol):
    async def readiness(self) -> dict[str, bool]:
        """Each dependency the service needs, and whether it answers now."""
        ...

    async def stop(self) -> None: ...


Cleanup = Callable[[], Awaitable[object]]


class Resources:
    """Cleanups pushed as resources are taken, run in reverse order by `close`."""

    def __init__(self) -> None:
        self._cleanups: list[tuple[str, Cleanup]] = []

    def push(self, what: str, cleanup: Cleanup) -> None:
        self._cleanups.append((what, cleanup))

    def task(self, task: asyncio.Task[object]) -> asyncio.Task[object]:
        """A background task, cancelled (and awaited) on close."""
        self.push(f"stopping {task.get_name()}", lambda: _cancel(task))
        return task

    async def close(self) -> None:
        while self._cleanups:
            what, cleanup = self._cleanups.pop()
            await _bounded(what, cleanup())


def keep_trying(
    step: Callable[[], Awaitable[object]], what: str, interval: float = RETRY_INTERVAL
) -> asyncio.Task[object]:
    """Run `step` now and again every `interval` seconds until it succeeds (the database
    or broker may not answer yet); each failure is logged once per attempt."""

    async def attempts() -> None:
        while True:
            try:
                await step()
            except Exception as exc:
                log.warning("%s failed (%s); trying again in %.0f s", what, exc, interval)
                await asyncio.sleep(interval)
            else:
                return

    return asyncio.create_task(attempts(), name=what)


def service_app(
    *,
    title: str,
    summary: str,
    start: Callable[[], Awaitable[Runtime]],
    routers: Iterable[APIRouter] = (),
    metrics: bool = True,
) -> FastAPI:
    """A service's FastAPI app: `start` builds its Runtime when the app starts, and the
    Runtime is stopped when it stops; `/healthz` and `/readyz` come with it, and
    `/metrics` unless `metrics` is off (IMGPIPE_METRICS=false)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await start()
        app.state.runtime = runtime
        try:
            yield
        finally:
            app.state.runtime = None
            await runtime.stop()

    async def checks() -> dict[str, bool]:
        runtime: Runtime | None = getattr(app.state, "runtime", None)
        if runtime is None:
            return {"started": False}
        return await runtime.readiness()

    app = FastAPI(title=title, summary=summary, lifespan=lifespan)
    app.include_router(health_router(checks))
    if metrics:
        instrument(app)
    for router in routers:
        app.include_router(router)
    return app


async def _cancel(task: asyncio.Task[object]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _bounded(step: str, awaitable: Awaitable[object]) -> None:
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=STOP_STEP_SECONDS)
    if not done:
        log.warning("stop: %s took over %.0f s; leaving it", step, STOP_STEP_SECONDS)
    elif task.exception() is not None:
        log.warning("stop: %s failed: %r", step, task.exception())
