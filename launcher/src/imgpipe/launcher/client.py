"""A small HTTP client for the public API: upload a CSV, read a status, fetch the output CSV."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

FINAL_STATUSES = frozenset({"completed", "error", "cancelled"})
Command = Literal["cancel", "retry", "delete"]


@dataclass(frozen=True)
class OutputOptions:
    """The output fields of `POST /upload`; None leaves the service's default."""

    quality: int | None = None
    format: str | None = None
    max_side: int | None = None
    progressive: bool = False
    refresh: bool = False  # reuse no output of an earlier request

    def form(self) -> dict[str, str]:
        fields = {"quality": self.quality, "format": self.format, "max_side": self.max_side}
        form = {name: str(value) for name, value in fields.items() if value is not None}
        if self.progressive:
            form["progressive"] = "true"
        if self.refresh:
            form["refresh"] = "true"
        return form


class ClientError(RuntimeError):
    """A failure to show the user: `problems` lists each validation problem, if any."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class ServiceUnreachable(ClientError):
    pass


class RequestNotFound(ClientError):
    pass


@dataclass(frozen=True)
class Submitted:
    request_id: str
    status: str
    status_url: str


@dataclass
class ImgpipeClient:
    ingest_url: str
    status_url: str
    api_key: str | None = None
    timeout: float = 30.0
    _http: httpx.Client = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ingest_url = self.ingest_url.rstrip("/")
        self.status_url = self.status_url.rstrip("/")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(timeout=self.timeout, headers=headers)

    def __enter__(self) -> ImgpipeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def submit(
        self,
        csv_path: Path,
        webhook_url: str | None = None,
        options: OutputOptions | None = None,
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Upload once per call: the call's Idempotency-Key (a fresh UUID unless given)
        makes an upload sent again (a retry, a resend after a lost answer) answer the
        first one's request instead of starting a second."""
        data = (options or OutputOptions()).form()
        if webhook_url:
            data["webhook_url"] = webhook_url
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        with csv_path.open("rb") as handle:
            files = {"file": (csv_path.name, handle, "text/csv")}
            response = self._send(
                "POST", f"{self.ingest_url}/upload", "ingest", files, data, headers
            )
        body = response.json()
        return Submitted(body["request_id"], body.get("status", "received"), body["status_url"])

    def command(self, request_id: str, command: Command) -> dict[str, Any]:
        """Cancel, retry or delete a request; the ingest service's 202 answer."""
        url = f"{self.ingest_url}/requests/{request_id}"
        if command == "delete":
            return self._send("DELETE", url, "ingest").json()
        return self._send("POST", f"{url}/{command}", "ingest").json()

    def list_requests(
        self, status: str | None = None, limit: int | None = None, before: str | None = None
    ) -> dict[str, Any]:
        """One page of `GET /requests`: `{"items": [...], "next": cursor or None}`."""
        given = {"status": status, "limit": limit, "before": before}
        params = {name: str(value) for name, value in given.items() if value is not None}
        return self._send("GET", f"{self.status_url}/requests", "status", params=params).json()

    def status(
        self, request_id: str, limit: int | None = None, after: str | None = None
    ) -> dict[str, Any]:
        """`GET /status/{id}`: the request, with one page of its products (the first,
        up to 1,000 products, unless `after` names another)."""
        given = {"limit": limit, "after": after}
        params = {name: str(value) for name, value in given.items() if value is not None}
        return self._send("GET", self.status_endpoint(request_id), "status", params=params).json()

    def products(self, request_id: str, answer: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every product of the request, `answer`'s page first, then each page after it
        (following `next`); a page at a time in memory."""
        yield from answer.get("products") or []
        following = answer.get("next")
        while following:
            page = self.status(request_id, after=following)
            yield from page.get("products") or []
            following = page.get("next")

    def with_every_product(self, request_id: str, answer: dict[str, Any]) -> dict[str, Any]:
        """`answer` (a first page) with the products of every page, for what needs them
        all: `imgpipe status --full` and the failed images of a large request."""
        if not answer.get("next"):
            return answer
        every = list(self.products(request_id, answer))
        return {**answer, "products": every, "next": None}

    def status_endpoint(self, request_id: str) -> str:
        return f"{self.status_url}/status/{request_id}"

    def output_csv_url(self, request_id: str) -> str:
        return f"{self.status_endpoint(request_id)}/output.csv"

    def download_output(self, request_id: str, destination: Path) -> Path:
        response = self._send("GET", self.output_csv_url(request_id), "status")
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(response.content)
        return destination

    def wait(
        self,
        request_id: str,
        on_update: Callable[[dict[str, Any]], None] = lambda _: None,
        interval: float = 0.5,
        not_found_grace: float = 60.0,
        round: int = 0,
    ) -> dict[str, Any]:
        """Poll the status until it is final in `round` (a retry's) or a later one;
        `on_update` sees every answer."""
        give_up = time.monotonic() + not_found_grace
        while True:
            try:
                current = self.status(request_id)
            except RequestNotFound:
                # Status may not have seen the RequestReceived event yet.
                if time.monotonic() > give_up:
                    raise
            else:
                on_update(current)
                if current.get("status") in FINAL_STATUSES and current.get("round", 0) >= round:
                    return current
            time.sleep(interval)

    def _send(
        self,
        method: str,
        url: str,
        service: str,
        files: dict[str, Any] | None = None,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(
                method, url, files=files, data=data, headers=headers, params=params
            )
        except httpx.ConnectError as error:
            raise ServiceUnreachable(
                f"cannot reach the {service} service at {url}: is `imgpipe up` running?"
            ) from error
        except httpx.TimeoutException as error:
            raise ServiceUnreachable(f"the {service} service at {url} did not answer") from error
        if response.is_success:
            return response
        raise _error_for(response, service)


def _error_for(response: httpx.Response, service: str) -> ClientError:
    code = response.status_code
    if code == 401:
        return ClientError(
            f"{service} refused the API key (HTTP 401): pass --api-key or set IMGPIPE_API_KEY"
        )
    if code == 404 and service == "status":
        return RequestNotFound(f"unknown request (HTTP 404 from {response.request.url})")
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text.strip()
    problems = problems_from(body)
    summary = _message_from(body) or response.reason_phrase
    return ClientError(f"{service} answered HTTP {code}: {summary}", problems)


def _message_from(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if isinstance(body.get(key), str):
                return body[key]
        detail = body.get("detail")
        if isinstance(detail, dict):
            return _message_from(detail)
    return body if isinstance(body, str) else ""


def problems_from(body: Any) -> list[str]:
    """Every validation problem in an error body, as `line N: message` where a line is known."""
    if isinstance(body, dict):
        for key in ("errors", "problems", "detail"):
            value = body.get(key)
            if isinstance(value, list):
                return [_describe(item) for item in value]
            if isinstance(value, dict):
                return problems_from(value)
    if isinstance(body, list):
        return [_describe(item) for item in body]
    return []


def _describe(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    message = item.get("message") or item.get("msg") or item.get("detail") or str(item)
    if item.get("line") is not None:
        where = f"line {item['line']}"
        if item.get("column"):
            where += f", {item['column']}"
        return f"{where}: {message}"
    if item.get("field"):
        return f"field {item['field']}: {message}"
    if isinstance(item.get("loc"), list):  # FastAPI's own request validation
        return f"{'.'.join(map(str, item['loc']))}: {message}"
    return str(message)
