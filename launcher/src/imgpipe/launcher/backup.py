"""`imgpipe backup DIR` and `imgpipe restore DIR`: everything imgpipe holds, on one machine.

The copy is in mongodump's layout, so `mongorestore DIR` reads it too:

    DIR/manifest.json                      version, namespace, time, counts
    DIR/<db>/<collection>.bson             the documents, concatenated BSON
    DIR/<db>/<collection>.metadata.json    the indexes (canonical extended JSON)
    DIR/media/...                          the local media files
    DIR/webhook_secret                     the generated webhook secret, when there is one

Consistency. Backup runs while the system runs and takes no lock; MongoDB (and the
embedded server) gives no point in time across databases without a replica set's
oplog. What it gives instead:

- each document is copied whole, as it was at one moment of its collection's read
  (mongodump's own guarantee without --oplog);
- the databases are read against the flow of data: the read models first (notifier,
  status), then processor, then the media files, then ingest. Every service writes
  before it publishes, so whatever a read model in the copy knows, the services it
  learnt it from had written before it, and the copy holds it too: a read model is
  never ahead of its sources, every output image a processor record names is in the
  media copy, and every request anything knows is in ingest's copy. Inside ingest,
  `requests` (the commit point) is read before `request_rows`; inside processor,
  `requests` (the counters) before `images`, so a counter is never ahead of the
  outcomes (the processor re-counts outcomes before it completes a request).
- the other way round, a read model may lag its sources by the events in flight
  while the backup ran (seconds). Those are not replayed by themselves after a
  restore: take the backup when no request is in progress for an exact copy (the
  README's "Backup and recovery" says what a restore can and cannot recover).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.json_util import CANONICAL_JSON_OPTIONS
from bson.json_util import dumps as json_dumps
from bson.json_util import loads as json_loads
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.database import Database

from imgpipe.contracts.settings import VERSION, Settings
from imgpipe.launcher.embedded import embedded_mongo, running_url

MANIFEST = "manifest.json"
MEDIA = "media"
SECRET = "webhook_secret"  # noqa: S105 (a file name)
FORMAT = 1
# Read models first, sources last (see the module's docstring); media between processor
# (which records an image only after its file is written) and ingest.
DUMP_ORDER = ("notifier", "status", "processor", "ingest")
COLLECTION_ORDER = {"ingest": ("requests", "request_rows"), "processor": ("requests", "images")}
INSERT_BATCH = 1000
EMBEDDED_START = 120.0  # seconds: a busy machine may take a while to open the storage
RAW = CodecOptions(document_class=RawBSONDocument)

Counts = dict[str, int]


class BackupError(RuntimeError):
    """A backup or restore that cannot go on; the message is meant for the user."""


@dataclass
class Report:
    """What a restore did, for the user."""

    databases: dict[str, Counts] = field(default_factory=dict)
    media_files: int = 0
    media_bytes: int = 0
    webhook_secret: bool = False
    version: str = ""
    created_at: str = ""


# Reaching the database -------------------------------------------------------------


@contextmanager
def database(settings: Settings) -> Iterator[MongoClient[dict[str, Any]]]:
    """A client to the database imgpipe uses (`database_url`)."""
    with database_url(settings) as url:
        client: MongoClient[dict[str, Any]] = MongoClient(url)
        with client:
            yield client


@contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """MONGODB_URL, else the embedded database a running `imgpipe up` announces in the
    data directory, else one started here on the data directory for the duration."""
    data_dir = settings.data_dir.resolve()
    if settings.mongodb_url:
        yield settings.mongodb_url
    elif url := running_url(data_dir):
        yield url
    else:
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)
        log = data_dir / "logs" / "mongo.log"
        with embedded_mongo(data_dir / "mongo", log_file=log, timeout=EMBEDDED_START) as url:
            yield url


# Backup ----------------------------------------------------------------------------


def backup(settings: Settings, target: Path) -> dict[str, Any]:
    """Write the copy to `target` (new or empty); returns the manifest."""
    partial = _fresh_partial(target)
    databases: dict[str, dict[str, Any]] = {}
    media: dict[str, int] = {}
    with database(settings) as client:
        created_at = datetime.now(UTC)  # the copy starts now
        for service in DUMP_ORDER:
            if service == "ingest":  # after processor: see the docstring
                media = copy_media(settings.media_dir, partial / MEDIA)
            name = settings.database_name(service)
            databases[name] = {
                "service": service,
                "collections": dump_database(client[name], service, partial / name),
            }
    manifest = {
        "format": FORMAT,
        "imgpipe_version": VERSION,
        "namespace": settings.namespace,
        "created_at": created_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "dump_order": list(DUMP_ORDER),
        "databases": databases,
        "media": media,
        "webhook_secret": copy_secret(settings.data_dir, partial),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    partial.rename(target)  # a crashed backup leaves DIR.partial, never a DIR that looks whole
    return manifest


def _fresh_partial(target: Path) -> Path:
    if target.exists():
        if not target.is_dir() or any(target.iterdir()):
            raise BackupError(f"{target} exists and is not an empty directory")
        target.rmdir()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def dump_database(db: Database[Any], service: str, folder: Path) -> Counts:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        name: dump_collection(db.get_collection(name, codec_options=RAW), folder)
        for name in ordered_collections(db, service)
    }


def ordered_collections(db: Database[Any], service: str) -> list[str]:
    names = [
        info["name"]
        for info in db.list_collections(filter={"type": "collection"})
        if not info["name"].startswith("system.")
    ]
    first = [name for name in COLLECTION_ORDER.get(service, ()) if name in names]
    return first + sorted(set(names) - set(first))


def dump_collection(collection: Collection[Any], folder: Path) -> int:
    """`<name>.metadata.json` (indexes, as mongodump writes it), then `<name>.bson`."""
    indexes = [_index_spec(index) for index in collection.list_indexes()]
    metadata = {
        "indexes": indexes,
        "uuid": "",
        "collectionName": collection.name,
        "type": "collection",
        "options": {},
    }
    (folder / f"{collection.name}.metadata.json").write_text(
        json_dumps(metadata, json_options=CANONICAL_JSON_OPTIONS)
    )
    count = 0
    with open(folder / f"{collection.name}.bson", "wb") as out:
        for document in collection.find():
            out.write(document.raw)
            count += 1
    return count


def _index_spec(index: Any) -> dict[str, Any]:
    return {key: value for key, value in dict(index).items() if key != "ns"}


def copy_media(source: Path, target: Path) -> dict[str, int]:
    """Copy the media files (not the storage's half-written temporary files)."""
    files = size = 0
    for path in _media_files(source):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
        files += 1
        size += destination.stat().st_size
    return {"files": files, "bytes": size}


def _media_files(root: Path) -> Iterable[Path]:
    if not root.is_dir():
        return []
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file() and not (path.name.startswith(".") and path.name.endswith(".tmp"))
    )


def copy_secret(data_dir: Path, target: Path) -> bool:
    """The generated webhook secret (a WEBHOOK_SECRET in the environment is not ours)."""
    source = data_dir / SECRET
    if not source.is_file():
        return False
    shutil.copy2(source, target / SECRET)
    (target / SECRET).chmod(0o600)
    return True


# Restore ---------------------------------------------------------------------------


def restore(settings: Settings, source: Path, force: bool = False) -> Report:
    """Put the copy at `source` back into this data directory and these databases."""
    manifest = read_manifest(source)
    check_files(source, manifest)
    targets = {name: settings.database_name(info["service"]) for name, info in _dbs(manifest)}
    with database(settings) as client:
        occupied = occupied_places(client, targets.values(), settings.data_dir, source)
        if occupied and not force:
            raise BackupError(
                "refusing to overwrite what is not empty (use --force to replace it): "
                + "; ".join(occupied)
            )
        if force:
            _clear(client, targets.values(), settings.data_dir)
        report = Report(version=manifest["imgpipe_version"], created_at=manifest["created_at"])
        for name, target in targets.items():
            report.databases[target] = restore_database(client[target], source / name)
        _verify_counts(report, manifest, targets)
    media = restore_media(source / MEDIA, settings.media_dir)
    report.media_files, report.media_bytes = media["files"], media["bytes"]
    report.webhook_secret = restore_secret(source, settings.data_dir)
    return report


def _dbs(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return list(manifest["databases"].items())


def read_manifest(source: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((source / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{source / MANIFEST} is missing: not an imgpipe backup") from None
    except ValueError as error:
        raise BackupError(f"{source / MANIFEST} is not valid JSON: {error}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{source / MANIFEST}: unknown backup format {manifest.get('format')}")
    if manifest["imgpipe_version"] != VERSION:
        raise BackupError(
            f"the backup was written by imgpipe {manifest['imgpipe_version']}, this is "
            f"imgpipe {VERSION}: restore it with the same version"
        )
    return manifest


def check_files(source: Path, manifest: dict[str, Any]) -> None:
    """Every .bson file holds whole documents, as many as the manifest says."""
    for name, info in _dbs(manifest):
        for collection, expected in info["collections"].items():
            found = count_documents(source / name / f"{collection}.bson")
            if found != expected:
                raise BackupError(
                    f"{name}.{collection}: the manifest says {expected} documents, "
                    f"the backup holds {found}"
                )
    media = manifest["media"]
    found_media = sum(1 for _ in _media_files(source / MEDIA))
    if found_media != media["files"]:
        raise BackupError(f"the manifest says {media['files']} media files, found {found_media}")


def count_documents(path: Path) -> int:
    try:
        with open(path, "rb") as data:
            return sum(1 for _ in bson.decode_file_iter(data, RAW))
    except FileNotFoundError:
        raise BackupError(f"{path} is missing") from None
    except bson.errors.BSONError as error:
        raise BackupError(f"{path} is damaged: {error}") from None


def occupied_places(
    client: MongoClient[Any], databases: Iterable[str], data_dir: Path, source: Path
) -> list[str]:
    """What a restore would overwrite: non-empty collections, media, another secret."""
    occupied = []
    for name in databases:
        db = client[name]
        for collection in sorted(db.list_collection_names()):
            if db[collection].find_one({}, {"_id": 1}) is not None:
                occupied.append(f"collection {name}.{collection} is not empty")
    media = data_dir / MEDIA
    if any(_media_files(media)):
        occupied.append(f"media directory {media.resolve()} is not empty")
    secret = data_dir / SECRET
    kept = source / SECRET
    if kept.is_file() and secret.is_file() and secret.read_bytes() != kept.read_bytes():
        occupied.append(f"{secret.resolve()} holds another webhook secret")
    return occupied


def _clear(client: MongoClient[Any], databases: Iterable[str], data_dir: Path) -> None:
    for name in databases:
        client.drop_database(name)
    shutil.rmtree(data_dir / MEDIA, ignore_errors=True)


def restore_database(db: Database[Any], folder: Path) -> Counts:
    counts = {}
    for metadata_path in sorted(folder.glob("*.metadata.json")):
        metadata = json_loads(metadata_path.read_text())
        name = metadata["collectionName"]
        collection = _create(db, name)
        insert_documents(collection, folder / f"{name}.bson")
        create_indexes(db, name, metadata["indexes"])
        counts[name] = collection.count_documents({})  # what the database now holds
    return counts


def _create(db: Database[Any], name: str) -> Collection[Any]:
    if name not in db.list_collection_names():
        db.create_collection(name)
    return db.get_collection(name, codec_options=RAW)


def insert_documents(collection: Collection[Any], path: Path) -> int:
    count = 0
    with open(path, "rb") as data:
        batch: list[RawBSONDocument] = []
        for document in bson.decode_file_iter(data, RAW):
            batch.append(document)
            if len(batch) == INSERT_BATCH:
                count += _insert(collection, batch)
        count += _insert(collection, batch)
    return count


def _insert(collection: Collection[Any], batch: list[RawBSONDocument]) -> int:
    if not batch:
        return 0
    # Raw documents go as they are (pymongo lists no inserted_ids for them); an error raises.
    collection.insert_many(batch, ordered=True)
    inserted = len(batch)
    batch.clear()
    return inserted


def create_indexes(db: Database[Any], collection: str, indexes: list[dict[str, Any]]) -> None:
    specs = [_index_spec(index) for index in indexes if index["name"] != "_id_"]
    if specs:
        db.command("createIndexes", collection, indexes=specs)


def _verify_counts(report: Report, manifest: dict[str, Any], targets: dict[str, str]) -> None:
    for name, info in _dbs(manifest):
        restored = report.databases[targets[name]]
        if restored != info["collections"]:
            raise BackupError(
                f"{targets[name]}: restored {restored}, the manifest says {info['collections']}"
            )


def restore_media(source: Path, target: Path) -> dict[str, int]:
    return copy_media(source, target)


def restore_secret(source: Path, data_dir: Path) -> bool:
    if not (source / SECRET).is_file():
        return False
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / SECRET, data_dir / SECRET)
    os.chmod(data_dir / SECRET, 0o600)
    return True
