"""The database client every service uses: what it promises when the database dies."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgpipe.contracts.mongo import connect, followed_by_journaled
from imgpipe.contracts.settings import Settings

SERVER = str(Path(sys.executable).with_name("secantusd-py"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(port: int, storage: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [SERVER, "--port", str(port), "--storage-path", str(storage)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the database did not start")


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[int, Path, list[subprocess.Popen]]]:
    port, storage, processes = _free_port(), tmp_path / "db", []
    processes.append(_start(port, storage))
    yield port, storage, processes
    for process in processes:
        process.kill()
        process.wait()


async def test_a_confirmed_write_survives_the_database_being_killed(database) -> None:
    port, storage, processes = database
    settings = Settings(mongodb_url=f"mongodb://127.0.0.1:{port}/?retryWrites=false")
    client = connect(settings)
    images = client["durability"]["images"]
    for batch in range(100):
        await images.insert_many([{"_id": f"{batch}-{i}"} for i in range(8)])
    processes[0].send_signal(signal.SIGKILL)  # no chance to flush what it confirmed
    processes[0].wait()
    await client.close()

    processes.append(_start(port, storage))
    client = connect(settings)
    try:
        assert await client["durability"]["images"].count_documents({}) == 800
    finally:
        await client.close()


async def test_writes_before_a_confirmed_write_survive_with_it(database) -> None:
    """The journal is written in order: one journaled write makes every earlier one
    durable, which is what lets a service skip the sync on the writes that lead to it."""
    port, storage, processes = database
    settings = Settings(mongodb_url=f"mongodb://127.0.0.1:{port}/?retryWrites=false")
    client = connect(settings)
    db = client["durability"]
    early = followed_by_journaled(db["outputs"])
    for n in range(300):  # each updated document is a commit of its own
        await early.update_one({"_id": n}, {"$set": {"stored": True}}, upsert=True)
    await db["requests"].update_one({"_id": "r"}, {"$inc": {"ok": 300}}, upsert=True)
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait()
    await client.close()

    processes.append(_start(port, storage))
    client = connect(settings)
    try:
        assert await client["durability"]["outputs"].count_documents({"stored": True}) == 300
        assert (await client["durability"]["requests"].find_one({"_id": "r"}))["ok"] == 300
    finally:
        await client.close()
