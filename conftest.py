"""Real parts for every test: a real RabbitMQ and a real MongoDB wire-protocol server.

Order of preference (docs/architecture.md, "Tests"): AMQP_URL / MONGODB_URL when
set; testcontainers when a Docker engine answers; otherwise the local RabbitMQ on
127.0.0.1:5672 and an embedded SecantusDB started for the test session.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgpipe.contracts.settings import Settings
from imgpipe.launcher.embedded import embedded_mongo
from tests.support.infra import docker_engine_answers
from tests.support.namespaces import remove_namespace


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("MONGODB_URL"):
        yield url
    elif docker_engine_answers():
        from testcontainers.mongodb import MongoDbContainer

        with MongoDbContainer("mongo:8") as container:
            yield container.get_connection_url()
    else:
        with embedded_mongo(tmp_path_factory.mktemp("secantus")) as url:
            yield url


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    if url := os.environ.get("AMQP_URL"):
        yield url
    elif docker_engine_answers():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:4-management") as container:
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/"
    else:
        yield "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
def settings(mongo_url: str, amqp_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings for one test: its own namespace (queues, exchanges, databases) and data dir."""
    namespace = "t" + uuid.uuid4().hex[:10]
    settings = Settings(
        amqp_url=amqp_url,
        mongodb_url=mongo_url,
        IMGPIPE_DATA_DIR=tmp_path / "data",
        IMGPIPE_NAMESPACE=namespace,
        IMGPIPE_ALLOW_PRIVATE_URLS=True,
        public_base_url="http://127.0.0.1:8002",
        webhook_secret="whsec_" + "dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI=",
    )
    yield settings
    remove_namespace(settings)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Kill what is left of the process pools tests started.

    A test that kills an image worker breaks its pool, and CPython's pool may start a
    replacement worker just as its manager thread gives up on the broken pool; that
    thread then waits at interpreter exit for a worker that waits for work, for ever
    (seen once in ~10 runs: every test passed and pytest never exited)."""
    for child in multiprocessing.active_children():
        child.kill()
