"""`imgpipe backup` and `imgpipe restore` as a user runs them: a running system with its
embedded database is backed up, its data directory wiped, the backup restored into a new
data directory (and so a new embedded database), and the restored system answers the same
and delivers the webhook retry that was pending when the backup was taken.

Real parts: the real broker, the embedded database the launcher starts, real processes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bson
import httpx
import pytest
from pymongo import MongoClient

from imgpipe.contracts.settings import VERSION, Settings
from tests.support.faults import csv_upload, output_urls, wait_finished, wait_until
from tests.support.http_server import LoopbackServer, Recorded, Response, loopback_server
from tests.support.images import jpeg_bytes
from tests.support.namespaces import SERVICES, remove_namespace
from tests.support.system import settings_env
from tests.support.up import IMGPIPE, Up, launch_up, start_up

pytestmark = pytest.mark.timeout(420)
IMAGES = 4
# The first webhook attempt meets a 500; its retry is due 10 s (+-20%) later, so it is
# pending when the backup is taken and due by the time the restored system is up.
RETRIES = {"WEBHOOK_RETRY_SCHEDULE": "10s,10s,10s,10s,10s,10s,10s,10s"}


def imgpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IMGPIPE, *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def system_settings(amqp_url: str, mongo_url: str, tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(
        amqp_url=amqp_url,
        mongodb_url=mongo_url,  # for remove_namespace only: the launcher starts its own
        IMGPIPE_DATA_DIR=tmp_path / "data",
        IMGPIPE_NAMESPACE="t" + uuid.uuid4().hex[:10],
    )
    yield settings
    remove_namespace(settings)


class Webhooks:
    """A webhook receiver on loopback that answers 500 until told otherwise."""

    def __init__(self, server: LoopbackServer) -> None:
        self.status = 500
        self.url = server.add("/hook", self._answer)
        self.server = server

    def _answer(self, recorded: Recorded) -> Response:
        return Response(b"", self.status)

    def ids(self) -> list[str]:
        return [r.headers["webhook-id"] for r in self.server.requests_to("/hook")]


def deliveries(client: httpx.Client, up: Up, request_id: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{up.settings.notifier_port}/deliveries"
    answer = client.get(url, params={"request_id": request_id})
    return answer.json() if answer.status_code == 200 else []


def seen_by_a_user(client: httpx.Client, status_url: str) -> dict[str, Any]:
    """The status answer, the output CSV and every media file's bytes."""
    status = client.get(status_url)
    assert status.status_code == 200, status.text
    media = {url: client.get(url).content for url in output_urls(client, status_url)}
    assert all(media.values()), media
    return {
        "status": status.json(),
        "csv": client.get(f"{status_url}/output.csv").text,
        "media": media,
    }


def test_a_backup_of_a_running_system_restores_into_a_new_data_directory(
    system_settings: Settings, tmp_path: Path
) -> None:
    dump = tmp_path / "backup"
    with loopback_server() as server, httpx.Client(timeout=30) as client:
        hooks = Webhooks(server)
        images = [
            server.add(
                f"/{i}.jpg", Response(jpeg_bytes(320, 240, seed=i), content_type="image/jpeg")
            )
            for i in range(IMAGES)
        ]
        up = start_up(system_settings, "--quiet", embedded=True, WEBHOOK_SECRET="", **RETRIES)
        try:
            up.wait_until_up()
            s = up.settings
            upload = client.post(
                f"http://127.0.0.1:{s.ingest_port}/upload",
                files={"file": ("products.csv", csv_upload(images), "text/csv")},
                data={"webhook_url": hooks.url},
            )
            assert upload.status_code == 202, upload.text
            request_id = upload.json()["request_id"]
            status_url = f"http://127.0.0.1:{s.status_port}/status/{request_id}"
            assert wait_finished(client, status_url)["status"] == "completed"
            pending = wait_until(
                lambda: (
                    hooks.ids()
                    and [d for d in deliveries(client, up, request_id) if d["status"] == "pending"]
                ),
                60,
                "a webhook attempt answered 500 and its retry pending",
            )
            before = seen_by_a_user(client, status_url)

            made = imgpipe(up.env, "backup", str(dump))  # while the system runs
            assert made.returncode == 0, made.stdout + made.stderr
        finally:
            assert up.stop() == 0, up.output

        shutil.rmtree(s.data_dir)
        new_data = tmp_path / "restored"
        env = {**up.env, "IMGPIPE_DATA_DIR": str(new_data)}
        restored = imgpipe(env, "restore", str(dump))
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert "counts match the manifest" in restored.stdout
        assert (new_data / "webhook_secret").is_file()

        hooks.status = 200
        again = launch_up(s.model_copy(update={"data_dir": new_data}), env, "--quiet")
        try:
            again.wait_until_up()
            assert seen_by_a_user(client, status_url) == before
            # The retry pending at backup time goes out, then every webhook after it.
            delivered = wait_until(
                lambda: (
                    (found := deliveries(client, again, request_id))
                    and all(d["status"] == "delivered" for d in found)
                    and found
                ),
                90,
                "the pending webhooks to be delivered after the restore",
            )
        finally:
            assert again.stop() == 0, again.output
    # Pending at backup time: the first webhook, tried and due for a retry, and the later ones
    # waiting for it (one endpoint gets a request's webhooks in order).
    tried = [d["id"] for d in pending if d["attempts"]]
    assert len(tried) == 1, pending
    after = {d["id"]: d for d in delivered}
    assert {d["id"] for d in pending} <= set(after), (pending, delivered)
    outcomes = [attempt["outcome"] for attempt in after[tried[0]]["attempts"]]
    assert outcomes[0] == "retry" and outcomes[-1] == "delivered", outcomes  # 500, then 200
    assert {d["webhook_id"] for d in delivered} <= set(hooks.ids())
    assert {d["event_type"] for d in delivered} >= {"request.received", "request.completed"}
    secret = (dump / "webhook_secret").read_text()
    assert secret.startswith("whsec_") and (new_data / "webhook_secret").read_text() == secret


def test_backup_files_match_the_manifest_and_restore_refuses_to_overwrite(
    settings: Settings, tmp_path: Path
) -> None:
    """With MONGODB_URL: mongodump's layout, counts, indexes, and --force."""
    status_db, ingest_db = settings.database_name("status"), settings.database_name("ingest")
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with MongoClient(settings.mongodb_url) as client:
        client[status_db].requests.insert_many([{"_id": "r1", "n": 1}, {"_id": "r2", "n": 2}])
        client[status_db].requests.create_index("n", name="by_n", unique=True)
        client[ingest_db].requests.insert_one({"_id": "r1", "received_at": at})
    media = settings.media_dir / "r1" / "0-0.jpg"
    media.parent.mkdir(parents=True)
    media.write_bytes(b"\xff\xd8 not really a jpeg")
    env = settings_env(settings)
    dump = tmp_path / "backup"

    made = imgpipe(env, "backup", str(dump))
    assert made.returncode == 0, made.stdout + made.stderr

    manifest = json.loads((dump / "manifest.json").read_text())
    assert manifest["imgpipe_version"] == VERSION
    assert manifest["namespace"] == settings.namespace
    assert manifest["media"] == {"files": 1, "bytes": media.stat().st_size}
    assert manifest["databases"][status_db]["collections"]["requests"] == 2
    for db, info in manifest["databases"].items():
        for collection, count in info["collections"].items():
            with open(dump / db / f"{collection}.bson", "rb") as data:
                assert len(list(bson.decode_file_iter(data))) == count, (db, collection)
            metadata = json.loads((dump / db / f"{collection}.metadata.json").read_text())
            assert metadata["collectionName"] == collection
            assert metadata["type"] == "collection" and metadata["uuid"] == ""
            assert "_id_" in [index["name"] for index in metadata["indexes"]]
    assert {info["service"] for info in manifest["databases"].values()} <= set(SERVICES)

    refused = imgpipe(env, "restore", str(dump))
    assert refused.returncode == 1
    said = " ".join(refused.stderr.split())  # rich wraps long lines
    assert f"collection {status_db}.requests is not empty" in said, said
    assert f"collection {ingest_db}.requests is not empty" in said, said
    assert "media directory" in said and "--force" in said, said

    forced = imgpipe(env, "restore", "--force", str(dump))
    assert forced.returncode == 0, forced.stdout + forced.stderr

    elsewhere = settings.model_copy(
        update={"namespace": "t" + uuid.uuid4().hex[:10], "data_dir": tmp_path / "other"}
    )
    try:
        restored = imgpipe(settings_env(elsewhere), "restore", str(dump))
        assert restored.returncode == 0, restored.stdout + restored.stderr
        with MongoClient(settings.mongodb_url) as client:
            requests = client[elsewhere.database_name("status")].requests
            assert sorted(doc["n"] for doc in requests.find()) == [1, 2]
            assert requests.index_information()["by_n"]["unique"] is True
            ingest = client[elsewhere.database_name("ingest")].requests.find_one()
            assert ingest is not None and ingest["received_at"] == at.replace(tzinfo=None)
        assert (elsewhere.media_dir / "r1" / "0-0.jpg").read_bytes() == media.read_bytes()
    finally:
        with MongoClient(settings.mongodb_url) as client:
            for service in SERVICES:
                client.drop_database(elsewhere.database_name(service))
