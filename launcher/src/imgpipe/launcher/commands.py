"""What each CLI command does, and how its results are shown to the user."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from imgpipe.contracts.settings import Settings
from imgpipe.launcher import backup as backups
from imgpipe.launcher.client import ClientError, Command, ImgpipeClient, OutputOptions
from imgpipe.launcher.supervisor import Console as SupervisorConsole
from imgpipe.launcher.supervisor import Supervisor, local_host

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_LISTED_FAILURES = 20
LIST_ROW = "{:<32}  {:<10}  {:<16}  {:<19}  {}"


def up(
    settings: Settings,
    processors: int,
    mongo_port: int | None,
    ready_timeout: float,
    quiet: bool,
) -> int:
    supervisor = Supervisor(
        settings,
        processors=processors,
        mongo_port=mongo_port,
        ready_timeout=ready_timeout,
        console=SupervisorConsole(echo_logs=not quiet),
    )
    return supervisor.run()


def default_urls(settings: Settings) -> tuple[str, str]:
    host = local_host(settings.host)
    return f"http://{host}:{settings.ingest_port}", f"http://{host}:{settings.status_port}"


def default_api_key(settings: Settings) -> str | None:
    """IMGPIPE_API_KEY, else the first server key when this machine configures them."""
    first_server_key = settings.api_keys[0] if settings.api_keys else None
    return os.environ.get("IMGPIPE_API_KEY") or first_server_key


def submit(
    client: ImgpipeClient,
    csv_path: Path,
    webhook_url: str | None,
    options: OutputOptions,
    wait: bool,
    output: Path | None,
) -> int:
    if not csv_path.is_file():
        errors.print(f"error: no such file: {csv_path}")
        return EXIT_USAGE
    try:
        submitted = client.submit(csv_path, webhook_url, options)
        console.print(f"request id: {submitted.request_id}")
        console.print(f"status:     {submitted.status_url}")
        if not wait:
            return EXIT_OK
        final = _wait_with_progress(client, submitted.request_id)
        _print_final(_with_failures(client, final))
        console.print(f"output CSV: {client.output_csv_url(submitted.request_id)}")
        if output:
            saved = client.download_output(submitted.request_id, output)
            console.print(f"saved to:   {saved}")
    except ClientError as error:
        return _report(error)
    return EXIT_OK if final.get("status") == "completed" else EXIT_FAILED


def status(client: ImgpipeClient, request_id: str, full: bool) -> int:
    try:
        current = client.status(request_id)
        current = client.with_every_product(request_id, current) if full else current
        current = current if full else _with_failures(client, current)
    except ClientError as error:
        return _report(error)
    if not full:
        keys = (
            "request_id",
            "status",
            "progress",
            "options",
            "bytes",
            "reused",
            "error_message",
            "created_at",
            "updated_at",
        )
        current = {key: current.get(key) for key in keys} | {
            "failed_images": _failures(current),
            "output_csv": client.output_csv_url(request_id),
        }
    console.print_json(json.dumps(current))
    return EXIT_OK


def manage(client: ImgpipeClient, request_id: str, command: Command, wait: bool = False) -> int:
    """Cancel, retry or delete a request; with `wait`, follow a retry to its end."""
    try:
        accepted = client.command(request_id, command)
        round = accepted.get("round") or 0
        done = {
            "cancel": "cancel requested",
            "retry": f"retry {round} started",
            "delete": "deleted",
        }
        console.print(f"request {request_id}: {done[command]}")
        if command == "delete":
            console.print("its status answers 404 once every service has dropped it")
        if not (wait and command == "retry"):
            return EXIT_OK
        final = _wait_with_progress(client, request_id, round)
        _print_final(_with_failures(client, final))
    except ClientError as error:
        return _report(error)
    return EXIT_OK if final.get("status") == "completed" else EXIT_FAILED


def list_requests(
    client: ImgpipeClient, status: str | None, limit: int | None, before: str | None
) -> int:
    """A table of requests, newest first, and how to ask for the next page."""
    try:
        page = client.list_requests(status, limit, before)
    except ClientError as error:
        return _report(error)
    console.print(LIST_ROW.format("REQUEST ID", "STATUS", "PROGRESS", "CREATED (UTC)", "PRODUCTS"))
    for item in page["items"]:
        created = str(item["created_at"])[:19].replace("T", " ")
        cells = (item["request_id"], item["status"], _progress(item), created)
        console.print(LIST_ROW.format(*cells, item["product_count"]))
    if page["next"]:
        again = [f"--status {status}"] * bool(status) + [f"--limit {limit}"] * bool(limit)
        console.print(f"next page: imgpipe list {' '.join([*again, '--before', page['next']])}")
    return EXIT_OK


def _progress(item: dict[str, Any]) -> str:
    counts = item.get("progress") or {}
    done = counts.get("ok", 0) + counts.get("failed", 0)
    failed = f" ({counts['failed']} failed)" if counts.get("failed") else ""
    return f"{done}/{counts.get('total', 0)}{failed}"


def webhook_secret(settings: Settings) -> int:
    print(settings.resolved_webhook_secret)
    return EXIT_OK


def backup(settings: Settings, target: Path) -> int:
    try:
        manifest = backups.backup(settings, target)
    except (backups.BackupError, OSError, RuntimeError) as error:
        errors.print(f"error: backup failed: {error}")
        return EXIT_FAILED
    console.print(f"backup of imgpipe {manifest['imgpipe_version']} written to {target}")
    for name, info in manifest["databases"].items():
        console.print(f"  {name}: {_collections(info['collections'])}")
    media = manifest["media"]
    console.print(f"  media: {media['files']} files, {media['bytes']:,} bytes")
    console.print(f"  webhook secret: {'copied' if manifest['webhook_secret'] else 'none kept'}")
    return EXIT_OK


def restore(settings: Settings, source: Path, force: bool) -> int:
    try:
        report = backups.restore(settings, source, force)
    except (backups.BackupError, OSError, RuntimeError) as error:
        errors.print(f"error: restore failed: {error}")
        return EXIT_FAILED
    console.print(
        f"restored the backup of {report.created_at} (imgpipe {report.version}) "
        f"into {settings.data_dir.resolve()}"
    )
    for name, counts in report.databases.items():
        console.print(f"  {name}: {_collections(counts)}")
    console.print(f"  media: {report.media_files} files, {report.media_bytes:,} bytes")
    console.print(f"  webhook secret: {'restored' if report.webhook_secret else 'none in backup'}")
    console.print("counts match the manifest")
    return EXIT_OK


def _collections(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "no collections"


def _wait_with_progress(client: ImgpipeClient, request_id: str, round: int = 0) -> dict[str, Any]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("received", total=None, detail="")

        def update(current: dict[str, Any]) -> None:
            counts = current.get("progress") or {}
            ok, failed = counts.get("ok", 0), counts.get("failed", 0)
            progress.update(
                task,
                description=current.get("status", "?"),
                total=counts.get("total") or None,
                completed=ok + failed,
                detail=f"ok {ok}  failed {failed}",
            )

        return client.wait(request_id, update, round=round)


def _print_final(final: dict[str, Any]) -> None:
    counts = final.get("progress") or {}
    console.print(
        f"request {final.get('request_id')}: {final.get('status')} - "
        f"{counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed, "
        f"{counts.get('total', 0)} images"
    )
    sizes = final.get("bytes") or {}
    if sizes.get("ratio") is not None:
        console.print(
            f"bytes: {sizes['input']:,} in, {sizes['output']:,} out "
            f"({sizes['ratio']:.0%} of the input) over {sizes['images']} images"
        )
    if line := _reused_line(final):
        console.print(line)
    if final.get("error_message"):
        label = "error" if final.get("status") == "error" else "note"
        console.print(f"{label}: {final['error_message']}")
    failures = _failures(final)
    for failure in failures[:MAX_LISTED_FAILURES]:
        console.print(f"  failed: {failure}")
    if len(failures) > MAX_LISTED_FAILURES:
        console.print(f"  ... and {len(failures) - MAX_LISTED_FAILURES} more failed images")


def _with_failures(client: ImgpipeClient, answer: dict[str, Any]) -> dict[str, Any]:
    """The answer with every product when some image failed and later pages exist:
    the failed images are listed from all of them (a request over 1,000 products
    answers them a page at a time)."""
    if not (answer.get("progress") or {}).get("failed"):
        return answer
    return client.with_every_product(str(answer.get("request_id")), answer)


def _reused_line(final: dict[str, Any]) -> str | None:
    """`reused: 998 of 1,000 images (990 not modified at their host, 8 same bytes)`, or
    None when nothing was reused (or the status service predates reuse)."""
    reused = final.get("reused") or {}
    if not reused.get("images"):
        return None
    total = (final.get("progress") or {}).get("total", 0)
    return (
        f"reused: {reused['images']:,} of {total:,} images ({reused.get('not_modified', 0):,} "
        f"not modified at their host, {reused.get('same_bytes', 0):,} same bytes)"
    )


def _failures(state: dict[str, Any]) -> list[str]:
    """`S. No. N (product) URL: code: message` for every image that failed."""
    found = []
    for product in state.get("products") or []:
        urls = product.get("input_urls") or []
        for url, error in zip(urls, product.get("errors") or [], strict=False):
            if error:
                found.append(
                    f"S. No. {product.get('serial_number')} ({product.get('product_name')}) "
                    f"{url}: {error.get('code')}: {error.get('message')}"
                )
    return found


def _report(error: ClientError) -> int:
    errors.print(f"error: {error}")
    for problem in error.problems:
        errors.print(f"  - {problem}")
    return EXIT_FAILED
