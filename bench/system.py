"""The system under test: `imgpipe up` as a subprocess, and the public HTTP API it serves."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

READY_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0
SERVICES = ("ingest", "processor", "status", "notifier")
SLOW_POLL = 5.0  # seconds between status reads before the request is heard final
FAST_POLL = 0.005  # and after it


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def imgpipe_command() -> str:
    """The `imgpipe` console script of this environment (.venv/bin/imgpipe)."""
    local = Path(sys.executable).with_name("imgpipe")
    found = str(local) if local.exists() else shutil.which("imgpipe")
    if not found:
        raise BenchError("the `imgpipe` console script is not installed: run `make sync`")
    return found


@dataclass(frozen=True)
class Upload:
    request_id: str
    seconds_to_202: float
    started: float  # perf_counter before the request was sent


@dataclass
class System:
    """`imgpipe up` with its own data dir, namespace and free ports."""

    data_dir: Path
    namespace: str
    ports: dict[str, int] = field(default_factory=lambda: {s: free_port() for s in SERVICES})
    process: subprocess.Popen[bytes] | None = None

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['ingest']}"

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['status']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "imgpipe-up.log"

    @property
    def headers(self) -> dict[str, str]:
        keys = [k.strip() for k in os.environ.get("IMGPIPE_API_KEYS", "").split(",") if k.strip()]
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PUBLIC_BASE_URL", None)  # media URLs must follow this run's status port
        env |= {f"{service.upper()}_PORT": str(port) for service, port in self.ports.items()}
        env |= {
            "IMGPIPE_DATA_DIR": str(self.data_dir),
            "IMGPIPE_NAMESPACE": self.namespace,
            "IMGPIPE_ALLOW_PRIVATE_URLS": "true",
        }
        return env  # MONGODB_URL passes through when set; else `imgpipe up` embeds SecantusDB

    def start(self) -> int:
        """Start `imgpipe up --quiet`, wait until every service is ready; returns its pid."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [imgpipe_command(), "up", "--quiet"],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_ready()
        return self.process.pid

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = dict(self.ports)
        with httpx.Client(timeout=2.0) as http:
            while pending:
                self._check_alive()
                for service, port in list(pending.items()):
                    if _ready(http, f"http://127.0.0.1:{port}/readyz"):
                        del pending[service]
                if pending and time.monotonic() > deadline:
                    raise BenchError(f"not ready after {READY_TIMEOUT:.0f}s: {sorted(pending)}")
                time.sleep(0.25)

    def _check_alive(self) -> None:
        assert self.process is not None
        if (code := self.process.poll()) is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-30:]
            raise BenchError(f"`imgpipe up` exited with code {code}:\n" + "\n".join(tail))

    def stop(self) -> None:
        """SIGTERM `imgpipe up` (it stops its children in order), then clean the broker."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            asyncio.run(_delete_namespace(self.namespace))
            _drop_databases(self.namespace)
        except Exception as error:  # noqa: BLE001 - a failed cleanup must not hide the results
            print(f"warning: could not remove namespace {self.namespace}: {error!r}")

    def upload(
        self,
        csv_path: Path,
        quality: int = 50,
        webhook_url: str | None = None,
        refresh: bool = False,
    ) -> Upload:
        """POST /upload; the clock starts before the request and stops at the 202.
        `refresh`: reuse no output of an earlier request."""
        fields = {"quality": str(quality)} | ({"webhook_url": webhook_url} if webhook_url else {})
        fields |= {"refresh": "true"} if refresh else {}
        with httpx.Client(timeout=300.0, headers=self.headers) as http, csv_path.open("rb") as f:
            started = time.perf_counter()
            response = http.post(
                f"{self.ingest_url}/upload",
                files={"file": (csv_path.name, f, "text/csv")},
                data=fields,
            )
            elapsed = time.perf_counter() - started
        if response.status_code != 202:
            raise BenchError(f"upload answered {response.status_code}: {response.text[:2000]}")
        return Upload(response.json()["request_id"], elapsed, started)

    def status_endpoint(self, request_id: str) -> str:
        return f"{self.status_url}/status/{request_id}"

    def wait_final(
        self, request_id: str, timeout: float, final_heard: threading.Event
    ) -> tuple[dict[str, Any], float]:
        """Until the status reads `completed` or `error`; returns it and the perf_counter
        then. The status is read every few seconds until the request is heard to be final
        (or should that never come), then every few milliseconds."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=30.0, headers=self.headers) as http:
            while time.monotonic() < deadline:
                self._check_alive()
                response = http.get(self.status_endpoint(request_id))
                if response.status_code == 200:
                    body = response.json()
                    if body.get("status") in ("completed", "error"):
                        return body, time.perf_counter()
                elif response.status_code != 404:  # 404: status has not seen it yet
                    raise BenchError(f"status answered {response.status_code}: {response.text}")
                if final_heard.wait(SLOW_POLL):
                    time.sleep(FAST_POLL)
        raise BenchError(f"request {request_id} not final after {timeout:.0f}s")


def _ready(http: httpx.Client, url: str) -> bool:
    try:
        return http.get(url).status_code == 200
    except httpx.HTTPError:
        return False


async def _delete_namespace(namespace: str) -> None:
    """Remove this run's queues and exchanges, so the shared broker keeps nothing of it."""
    import aio_pika

    from imgpipe.contracts.settings import Settings
    from imgpipe.contracts.topology import Topology

    connection = await aio_pika.connect(Settings().amqp_url)
    async with connection:
        await Topology(namespace).delete(await connection.channel())


def _drop_databases(namespace: str) -> None:
    """With an external MongoDB, drop this run's databases (the embedded one is in data_dir)."""
    from pymongo import MongoClient

    from imgpipe.contracts.settings import Settings

    settings = Settings(IMGPIPE_NAMESPACE=namespace)
    if not settings.mongodb_url:
        return
    with MongoClient(settings.mongodb_url) as client:
        for service in SERVICES:
            client.drop_database(settings.database_name(service))
