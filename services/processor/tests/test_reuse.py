"""Incremental catalogues, with the handlers called directly (real broker, database and
files): the host is asked before anything is downloaded again, the same bytes are
encoded once, shared outputs outlive a deleted request while another uses them, and
refresh does everything anew."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from imgpipe.contracts.events import ImageProcessed, Options, RequestDeleted, RequestReceived
from imgpipe.contracts.metrics import REGISTRY
from imgpipe.contracts.settings import Settings
from imgpipe.processor.compress import Compressed
from imgpipe.processor.handlers import Processor
from imgpipe.processor.jobs import jobs_for
from tests.support.http_server import LoopbackServer, Response
from tests.support.images import jpeg_bytes
from tests.support.remote_host import Behaviour, RemoteHost, remote_host
from tests.support.tap import EventTap

NOW = datetime.now(UTC)


@pytest.fixture
def host() -> Iterator[RemoteHost]:
    with remote_host(behaviour=Behaviour(etags=True)) as host:
        yield host


@pytest.fixture
def encodes(processor: Processor) -> list[bytes]:
    """The inputs the processor sent to the codec, in order."""
    seen: list[bytes] = []
    compress = processor.compressor

    async def counting(data: bytes, options: Options) -> Compressed:
        seen.append(data)
        return await compress(data, options)

    processor.compressor = counting
    return seen


async def run(
    processor: Processor, tap: EventTap, make_request, urls: list[list[str]], **fields: object
) -> dict[str, ImageProcessed]:
    """Process a request of these rows to its end; its ImageProcessed by image key."""
    request_id = uuid.uuid4().hex
    received: RequestReceived = make_request(request_id, urls).data
    received = received.model_copy(update=fields)
    await processor.request_received(received)
    for job in jobs_for(received):  # the jobs sent wait in a queue nobody consumes
        await processor.process_job(job)
    await tap.flush()
    return {event.data.image_key: event.data for event in tap.of(request_id, ImageProcessed)}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def file_of(settings: Settings, url: str | None) -> Path:
    assert url is not None and url.startswith(settings.media_base_url + "/")
    return settings.media_dir / url.removeprefix(settings.media_base_url + "/")


def opens(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


async def test_the_same_catalogue_again_is_asked_for_conditionally_and_reuses_every_output(
    settings: Settings,
    tap: EventTap,
    processor: Processor,
    make_request,
    host: RemoteHost,
    encodes: list[bytes],
) -> None:
    urls = [host.add(f"/p/{i}.jpg", jpeg_bytes(96, 64, seed=i)) for i in range(5)]
    rows = [urls[:3], urls[3:]]
    first = await run(processor, tap, make_request, rows)
    assert len(encodes) == 5 and all(image.reused is None for image in first.values())
    assert host.conditional() == []  # nothing known yet: plain GETs
    saved = metric("imgpipe_download_bytes_saved_total")
    reused = metric("imgpipe_images_reused_total", reason="not_modified")

    second = await run(processor, tap, make_request, rows)

    assert len(encodes) == 5, "nothing decoded or encoded the second time"
    asked = host.conditional()
    assert len(asked) == 5 and all(seen.status == 304 for seen in asked)
    assert {key: image.reused for key, image in second.items()} == {
        key: "not_modified" for key in first
    }
    for key, image in second.items():
        assert image.outcome == "ok"
        assert image.output_url == first[key].output_url  # one file, two requests
        assert (image.bytes_in, image.bytes_out) == (first[key].bytes_in, first[key].bytes_out)
        assert opens(file_of(settings, image.output_url)) == (image.width, image.height)
    assert metric("imgpipe_images_reused_total", reason="not_modified") - reused == 5
    downloaded = sum(image.bytes_in or 0 for image in first.values())
    assert metric("imgpipe_download_bytes_saved_total") - saved == downloaded

    # One picture changes at its host (a new ETag): that one alone is done again.
    changed = jpeg_bytes(96, 64, seed=99)
    host.files["/p/3.jpg"] = changed
    third = await run(processor, tap, make_request, rows)

    assert encodes[5:] == [changed]
    assert third["1-0"].reused is None and third["1-0"].bytes_in == len(changed)
    assert third["1-0"].output_url != first["1-0"].output_url
    assert {key for key, image in third.items() if image.reused == "not_modified"} == {
        "0-0",
        "0-1",
        "0-2",
        "1-1",
    }
    # A fourth upload asks with the new ETag, and reuses the new output.
    fourth = await run(processor, tap, make_request, rows)
    assert len(encodes) == 6
    assert fourth["1-0"].reused == "not_modified"
    assert fourth["1-0"].output_url == third["1-0"].output_url


async def test_the_same_bytes_under_two_urls_are_encoded_once(
    tap: EventTap,
    processor: Processor,
    make_request,
    image_server: LoopbackServer,
    encodes: list[bytes],
) -> None:
    # A host without validators: every request downloads, none is asked conditionally.
    picture = jpeg_bytes(96, 64, seed=7)
    urls = [image_server.add(f"/{name}.jpg", Response(picture)) for name in ("a", "b")]
    other = image_server.add("/c.jpg", Response(jpeg_bytes(96, 64, seed=8)))

    first = await run(processor, tap, make_request, [[*urls, other]])

    assert len(encodes) == 2  # a.jpg (or b.jpg) and c.jpg
    assert first["0-0"].output_url == first["0-1"].output_url
    assert sorted(str(first[key].reused) for key in ("0-0", "0-1")) == ["None", "same_bytes"]

    second = await run(processor, tap, make_request, [[other, *urls]])

    assert len(encodes) == 2
    assert [second[key].reused for key in ("0-0", "0-1", "0-2")] == ["same_bytes"] * 3
    assert second["0-0"].output_url == first["0-2"].output_url
    for path in ("/a.jpg", "/b.jpg", "/c.jpg"):
        requests = image_server.requests_to(path)
        assert len(requests) == 2 and "If-None-Match" not in requests[1].headers

    # Other options are another output.
    third = await run(processor, tap, make_request, [urls], options=Options(quality=80))
    assert len(encodes) == 3
    assert third["0-0"].output_url == third["0-1"].output_url != first["0-0"].output_url


async def test_the_same_bytes_again_in_a_request_join_their_output_without_a_write(
    tap: EventTap, processor: Processor, make_request, image_server: LoopbackServer
) -> None:
    # A placeholder picture under many product URLs: the request is a user of its output
    # from the first one on, and a read shows it for the others.
    picture = jpeg_bytes(96, 64, seed=9)
    urls = [image_server.add(f"/same-{n}.jpg", Response(picture)) for n in range(4)]
    repository = processor.outputs.repository
    join_writes: list[list[tuple[str, str, bool]]] = []
    join = repository.join_outputs

    async def counting(joins: list[tuple[str, str, bool]]) -> None:
        join_writes.append(joins)
        await join(joins)

    repository.join_outputs = counting  # type: ignore[method-assign]
    images = await run(processor, tap, make_request, [urls])

    assert [images[f"0-{n}"].reused for n in range(4)].count("same_bytes") == 3
    assert len({image.output_url for image in images.values()}) == 1
    # Only the first URL's claim was written (it found no output yet, and encoded it).
    assert [len(joins) for joins in join_writes] == [1]
    (output,) = await repository.outputs.find({}).to_list()
    assert output["requests"] == [images["0-0"].request_id]


async def test_a_join_remembered_but_gone_is_written_again(processor: Processor) -> None:
    # The hint is only a hint: an output deleted since (its request let go of it) is
    # joined, and created, anew.
    outputs, key = processor.outputs, "ab" * 32
    assert await outputs.reserve("r1", key) is not None
    released = await outputs.repository.release_output(key, "r1")
    assert released is not None and released["deleting"]
    await outputs.repository.forget_output(key)

    again = await outputs.reserve("r1", key)

    assert again is not None and not again.get("deleting")
    stored = await outputs.repository.get_output(key)
    assert stored is not None and stored["requests"] == ["r1"]


async def test_a_shared_output_is_deleted_with_the_last_request_that_uses_it(
    settings: Settings,
    tap: EventTap,
    processor: Processor,
    make_request,
    host: RemoteHost,
) -> None:
    urls = [host.add(f"/d/{i}.jpg", jpeg_bytes(96, 64, seed=20 + i)) for i in range(3)]
    first = await run(processor, tap, make_request, [urls])
    second = await run(processor, tap, make_request, [urls[:2]])
    # An output of an earlier layout (one folder per request) is deleted with its request.
    older = settings.media_dir / next(iter(first.values())).request_id / "9-9.jpg"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"an output stored before outputs were shared")
    objects = settings.media_dir / "objects"
    assert len(list(objects.iterdir())) == 3

    first_id = first["0-0"].request_id
    deleted = RequestDeleted(request_id=first_id, deleted_at=NOW)
    await processor.commands.delete(deleted)
    await processor.commands.delete(deleted)  # redelivered

    assert not older.parent.exists()
    assert sorted(objects.iterdir()) == sorted(
        file_of(settings, image.output_url) for image in second.values()
    )
    for image in second.values():
        assert opens(file_of(settings, image.output_url)) == (image.width, image.height)

    await processor.commands.delete(
        RequestDeleted(request_id=second["0-0"].request_id, deleted_at=NOW)
    )
    assert list(objects.iterdir()) == []
    assert await processor.repository.outputs.count_documents({}) == 0


async def test_a_delete_that_crashed_midway_deletes_the_file_when_delivered_again(
    settings: Settings,
    tap: EventTap,
    processor: Processor,
    make_request,
    host: RemoteHost,
    encodes: list[bytes],
) -> None:
    url = host.add("/crash.jpg", jpeg_bytes(96, 64, seed=30))
    first = (await run(processor, tap, make_request, [[url]]))["0-0"]
    request_id, path = first.request_id, file_of(settings, first.output_url)
    repository = processor.repository
    [key] = await repository.outputs_of(request_id)
    # The delete marked the output as going, then died before deleting the file.
    assert await repository.release_output(key, request_id) is not None

    # Meanwhile the same picture is asked for again: the marked output is not reused,
    # and the image gets a file of its own, which the output's deletion leaves alone.
    again = (await run(processor, tap, make_request, [[url]]))["0-0"]
    assert again.reused is None and len(encodes) == 2
    assert f"/{again.request_id}/" in str(again.output_url)

    await processor.commands.delete(RequestDeleted(request_id=request_id, deleted_at=NOW))
    assert not path.exists()
    assert await repository.outputs.count_documents({}) == 0
    assert opens(file_of(settings, again.output_url)) == (again.width, again.height)


async def test_refresh_downloads_and_encodes_everything_anew(
    tap: EventTap,
    processor: Processor,
    make_request,
    host: RemoteHost,
    encodes: list[bytes],
) -> None:
    urls = [host.add(f"/r/{i}.jpg", jpeg_bytes(96, 64, seed=40 + i)) for i in range(3)]
    first = await run(processor, tap, make_request, [urls])

    refreshed = await run(processor, tap, make_request, [urls], refresh=True)

    assert len(encodes) == 6
    assert host.conditional() == []
    assert host.statuses() == {200: 6}
    assert all(image.reused is None for image in refreshed.values())
    # The same bytes and options make the same output: it is written again in place.
    assert {k: i.output_url for k, i in refreshed.items()} == {
        k: i.output_url for k, i in first.items()
    }


async def test_an_output_encoded_anew_differently_is_what_later_requests_reuse(
    tap: EventTap, processor: Processor, make_request, host: RemoteHost
) -> None:
    # A refresh after the codec changed: the output record follows the new file.
    url = host.add("/changed.jpg", jpeg_bytes(96, 64, seed=77))
    first = (await run(processor, tap, make_request, [[url]]))["0-0"]
    compress = processor.compressor

    async def finer(data: bytes, options: Options) -> Compressed:
        return await compress(data, options.model_copy(update={"quality": 95}))

    processor.compressor = finer
    refreshed = (await run(processor, tap, make_request, [[url]], refresh=True))["0-0"]
    processor.compressor = compress
    again = (await run(processor, tap, make_request, [[url]]))["0-0"]

    assert refreshed.bytes_out != first.bytes_out
    assert again.reused == "not_modified"
    assert again.bytes_out == refreshed.bytes_out


async def test_a_304_whose_output_went_meanwhile_downloads_the_bytes_after_all(
    settings: Settings,
    tap: EventTap,
    processor: Processor,
    make_request,
    host: RemoteHost,
    encodes: list[bytes],
) -> None:
    url = host.add("/gone.jpg", jpeg_bytes(96, 64, seed=50))
    first = (await run(processor, tap, make_request, [[url]]))["0-0"]
    request_id = uuid.uuid4().hex
    received: RequestReceived = make_request(request_id, [[url]]).data
    await processor.request_received(received)
    [job] = jobs_for(received)
    [known] = (await processor.outputs.known([url], job.options)).values()

    # The only request using the output is deleted after the lookup, before the claim.
    await processor.commands.delete(RequestDeleted(request_id=first.request_id, deleted_at=NOW))
    assert not file_of(settings, first.output_url).exists()
    await processor._process_image(job, job.images[0], {}, known)
    await tap.flush()

    [again] = [event.data for event in tap.of(request_id, ImageProcessed)]
    assert again.outcome == "ok" and again.reused is None and len(encodes) == 2
    assert [seen.status for seen in host.requests_for("/gone.jpg")] == [200, 304, 200]
    assert again.attempts == 2  # the 304 and the download after it
    assert opens(file_of(settings, again.output_url)) == (again.width, again.height)
