"""`imgpipe`: argument parsing only; the work happens in commands, supervisor and client."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from imgpipe.contracts.settings import Settings
from imgpipe.launcher import commands
from imgpipe.launcher.client import ImgpipeClient, OutputOptions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgpipe",
        description="Run imgpipe locally and talk to it. Settings come from the environment "
        "(and .env): AMQP_URL, MONGODB_URL, IMGPIPE_DATA_DIR, INGEST_PORT, ...",
    )
    commands_ = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands_.add_parser(
        "up",
        help="start every service (and an embedded database when MONGODB_URL is unset)",
        description="Start ingest, processor, status and notifier as child processes; "
        "their logs go to stdout, prefixed, and to IMGPIPE_DATA_DIR/logs/<service>.log. "
        "A service that dies is restarted (after 1 s, doubling to 30 s); 5 crashes of one "
        "service within 60 s stop everything. Ctrl-C or SIGTERM stops everything.",
    )
    up.add_argument(
        "--processors",
        type=_positive,
        default=1,
        metavar="N",
        help="processor instances to run (health ports PROCESSOR_PORT + i)",
    )
    up.add_argument(
        "--mongo-port",
        type=_positive,
        default=None,
        metavar="PORT",
        help="port for the embedded database (default 27018, or a free one)",
    )
    up.add_argument(
        "--ready-timeout",
        type=_positive,
        default=90,
        metavar="SECONDS",
        help="how long each service may take to answer /readyz (default 90)",
    )
    up.add_argument(
        "--quiet",
        action="store_true",
        help="do not echo service logs (they still go to the log files)",
    )

    submit = commands_.add_parser("submit", help="upload a CSV of product image URLs")
    submit.add_argument("csv", type=Path, help="the CSV (S. No., Product Name, Input Image Urls)")
    submit.add_argument(
        "--wait", action="store_true", help="show progress until the request completes"
    )
    submit.add_argument("--webhook-url", help="notify this URL at every status change")
    submit.add_argument(
        "--quality", type=_quality, help="JPEG/WebP/AVIF quality, 1 to 95 (default 50)"
    )
    submit.add_argument(
        "--format",
        choices=("auto", "jpeg", "webp", "avif"),
        help="output format (default auto: JPEG when opaque, WebP with transparency)",
    )
    submit.add_argument(
        "--max-side", type=_positive, metavar="PIXELS", help="longest side; never enlarges"
    )
    submit.add_argument("--progressive", action="store_true", help="progressive JPEG")
    submit.add_argument(
        "--refresh",
        action="store_true",
        help="process every image anew, reusing no output of an earlier upload",
    )
    submit.add_argument(
        "--output", type=Path, metavar="FILE", help="with --wait: download the output CSV to FILE"
    )
    _add_client_options(submit)

    status = commands_.add_parser("status", help="show the status of a request")
    status.add_argument("request_id")
    status.add_argument("--full", action="store_true", help="print the whole status document")
    _add_client_options(status)

    cancel = commands_.add_parser(
        "cancel", help="stop a running request (images not yet started are not processed)"
    )
    cancel.add_argument("request_id")
    _add_client_options(cancel)

    retry = commands_.add_parser("retry", help="run the failed images of a finished request again")
    retry.add_argument("request_id")
    retry.add_argument("--wait", action="store_true", help="show progress until it ends")
    _add_client_options(retry)

    delete = commands_.add_parser(
        "delete", help="delete a request everywhere, its stored images included"
    )
    delete.add_argument("request_id")
    _add_client_options(delete)

    listing = commands_.add_parser(
        "list",
        help="list requests, newest first",
        description="A page of requests, newest first; the last line gives the command "
        "for the next page.",
    )
    listing.add_argument(
        "--status",
        choices=("received", "processing", "completed", "error", "cancelled"),
        help="only requests in this status",
    )
    listing.add_argument(
        "--limit", type=_page_size, metavar="N", help="requests per page, 1 to 200 (default 50)"
    )
    listing.add_argument("--before", metavar="CURSOR", help="the page after the one that gave it")
    _add_client_options(listing)

    commands_.add_parser("webhook-secret", help="print the key that signs webhooks")

    backup = commands_.add_parser(
        "backup",
        help="copy every database, the media files and the webhook secret to DIR",
        description="Copy each service's database (mongodump's layout: <db>/<collection>.bson "
        "and .metadata.json), IMGPIPE_DATA_DIR/media, the generated webhook secret and a "
        "manifest.json to DIR, while imgpipe runs. Reaches MONGODB_URL, else the embedded "
        "database of a running `imgpipe up`, else starts it on IMGPIPE_DATA_DIR.",
    )
    backup.add_argument("dir", type=Path, help="a new or empty directory")

    restore = commands_.add_parser(
        "restore",
        help="put a backup back into empty databases and an empty data directory",
        description="Restore what `imgpipe backup` wrote: documents, indexes, media, the "
        "webhook secret; checks the manifest's version and counts. Refuses to overwrite a "
        "non-empty collection, media directory or another webhook secret without --force.",
    )
    restore.add_argument("dir", type=Path, help="the backup directory")
    restore.add_argument(
        "--force", action="store_true", help="drop the databases and media there first"
    )
    return parser


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ingest-url", help="default http://127.0.0.1:$INGEST_PORT")
    parser.add_argument("--status-url", help="default http://127.0.0.1:$STATUS_PORT")
    parser.add_argument("--api-key", help="default $IMGPIPE_API_KEY")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _page_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 200:
        raise argparse.ArgumentTypeError("must be between 1 and 200")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 95:
        raise argparse.ArgumentTypeError("must be between 1 and 95")
    return value


def _client(settings: Settings, args: argparse.Namespace) -> ImgpipeClient:
    ingest, status = commands.default_urls(settings)
    return ImgpipeClient(
        ingest_url=args.ingest_url or ingest,
        status_url=args.status_url or status,
        api_key=args.api_key or commands.default_api_key(settings),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"imgpipe: invalid settings in the environment:\n{error}", file=sys.stderr)
        return commands.EXIT_USAGE
    if args.command == "up":
        return commands.up(
            settings, args.processors, args.mongo_port, args.ready_timeout, args.quiet
        )
    if args.command == "webhook-secret":
        return commands.webhook_secret(settings)
    if args.command == "backup":
        return commands.backup(settings, args.dir)
    if args.command == "restore":
        return commands.restore(settings, args.dir, args.force)
    if args.command == "submit" and args.output and not args.wait:
        print("imgpipe: --output needs --wait", file=sys.stderr)
        return commands.EXIT_USAGE
    with _client(settings, args) as client:
        if args.command == "submit":
            options = OutputOptions(
                args.quality, args.format, args.max_side, args.progressive, args.refresh
            )
            return commands.submit(
                client, args.csv, args.webhook_url, options, args.wait, args.output
            )
        if args.command in ("cancel", "retry", "delete"):
            wait = getattr(args, "wait", False)
            return commands.manage(client, args.request_id, args.command, wait)

        if args.command == "list":
            return commands.list_requests(client, args.status, args.limit, args.before)
        return commands.status(client, args.request_id, args.full)


if __name__ == "__main__":
    sys.exit(main())
