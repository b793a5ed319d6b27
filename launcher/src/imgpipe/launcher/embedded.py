"""The embedded MongoDB-compatible server (SecantusDB) for machines without MongoDB."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from imgpipe.launcher.tethered import tethered_command

# Where `imgpipe up` says which URL its embedded database answers on, while it runs, so that
# `imgpipe backup` (another process) reaches the same server instead of starting a second one
# on the same storage.
URL_FILE = "embedded-mongo.url"


class EmbeddedMongoUnavailable(RuntimeError):
    pass


def announce_url(data_dir: Path, url: str) -> Path:
    path = data_dir / URL_FILE
    path.write_text(url + "\n")
    return path


def running_url(data_dir: Path) -> str | None:
    """The URL of the embedded database `imgpipe up` runs on `data_dir`, if one answers."""
    try:
        url = (data_dir / URL_FILE).read_text().strip()
    except OSError:
        return None
    port = urlsplit(url).port
    if port is None:
        return None
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return url if sock.connect_ex(("127.0.0.1", port)) == 0 else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(
    port: int, timeout: float = 30.0, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise EmbeddedMongoUnavailable(f"server exited with code {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# WiredTiger's cache. SecantusDB's default, 1G, fills during a 100,000-image request
# (the database is ~500 MiB on disk by then) and is never given back; beyond this cap,
# pages are evicted to disk and read back. The server peaked at 1,006 MiB with the
# default, 879 MiB with the cap: the rest is its own (pure-Python) memory.
CACHE_SIZE = "256M"


def _server_command() -> str:
    local = Path(sys.executable).with_name("secantusd-py")
    found = str(local) if local.exists() else shutil.which("secantusd-py")
    if not found:
        raise EmbeddedMongoUnavailable(
            "MONGODB_URL is unset and SecantusDB is not installed: "
            "install the launcher's 'embedded' extra or point MONGODB_URL at a MongoDB"
        )
    return found


@contextmanager
def embedded_mongo(
    storage: Path, port: int | None = None, log_file: Path | None = None, timeout: float = 30.0
) -> Iterator[str]:
    """Run SecantusDB as a child process; yields its mongodb:// URL."""
    storage.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        # Tethered: a killed launcher must not leave a database holding the storage directory.
        tethered_command(
            [
                _server_command(),
                *("--port", str(port), "--storage-path", str(storage)),
                *("--cache-size", CACHE_SIZE),
            ]
        ),
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # Own process group: a terminal's Ctrl-C must not stop the database before the
        # services that use it; whoever started it stops it (the `finally` below).
        process_group=0,
    )
    try:
        wait_for_port(port, timeout, process=process)
        # No retryable writes on the embedded server: SecantusDB keeps each one's reply for
        # 30 minutes and scans (past 10,000, sorts) them on every write, ~5 ms a write after
        # a few thousand images. imgpipe's writes are idempotent or checked and the bus
        # retries a handler that lost its connection; a real MongoDB keeps its default.
        yield f"mongodb://127.0.0.1:{port}/?retryWrites=false"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        if not isinstance(output, int):  # a log file we opened, not DEVNULL
            output.close()
