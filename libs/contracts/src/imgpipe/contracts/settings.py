"""Settings shared by every imgpipe process (the README's settings table)."""

from __future__ import annotations

import base64
import secrets
from functools import cached_property
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

VERSION = version("imgpipe-contracts")


class Settings(BaseSettings):
    """Environment-driven configuration; each service reads the fields it needs."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # Unset: `imgpipe up` starts an embedded database; a bare service tries localhost.
    mongodb_url: str | None = None
    data_dir: Path = Field(default=Path(".imgpipe"), alias="IMGPIPE_DATA_DIR")
    namespace: str = Field(default="", alias="IMGPIPE_NAMESPACE")
    ingest_port: int = 8001
    status_port: int = 8002
    notifier_port: int = 8003
    processor_port: int = 8004
    host: str = Field(default="127.0.0.1", alias="IMGPIPE_HOST")
    public_base_url: str | None = None
    cloudinary_url: str | None = None
    # Set where processors run on several machines (the Kubernetes manifests set it): local
    # storage is one directory on one machine, so the processor refuses to start without
    # CLOUDINARY_URL rather than write images that other replicas and status cannot see.
    require_shared_storage: bool = Field(default=False, alias="IMGPIPE_REQUIRE_SHARED_STORAGE")
    # Root folder for Cloudinary uploads: each request goes under <folder>/<request_id>.
    cloudinary_folder: str = Field(default="imgpipe", alias="CLOUDINARY_FOLDER")
    allow_private_urls: bool = Field(default=False, alias="IMGPIPE_ALLOW_PRIVATE_URLS")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, alias="IMGPIPE_API_KEYS")
    webhook_secret: str | None = None
    # Origins whose pages may call the status API from a browser (CORS): the web
    # console that ingest serves at `/`. Unset: ingest on this machine (`console_origins`).
    console_origins_setting: Annotated[list[str], NoDecode] = Field(
        default_factory=list, alias="IMGPIPE_CONSOLE_ORIGINS"
    )
    # Seconds before each webhook retry (about a day in all); "5s,5m,2h" also works.
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )

    # Limits: refuse early, before anything is stored.
    max_csv_bytes: int = Field(default=20 * 1024 * 1024, alias="IMGPIPE_MAX_CSV_BYTES")
    max_rows: int = Field(default=100_000, alias="IMGPIPE_MAX_ROWS")
    max_images: int = Field(default=100_000, alias="IMGPIPE_MAX_IMAGES")
    # A request travels as one RequestReceived: RabbitMQ 4 refuses messages over 16 MiB
    # (its max_message_size), and an event it refuses would never leave ingest's outbox.
    max_event_bytes: int = Field(default=16 * 1024 * 1024, alias="IMGPIPE_MAX_EVENT_BYTES")
    max_image_bytes: int = Field(default=25 * 1024 * 1024, alias="IMGPIPE_MAX_IMAGE_BYTES")
    max_image_pixels: int = Field(default=50_000_000, alias="IMGPIPE_MAX_IMAGE_PIXELS")
    # Seconds one image may take to decode and encode; past it its worker is killed (a
    # largest allowed image takes a few seconds: this is for decoders that never end).
    image_time_limit: float = Field(default=60.0, alias="IMGPIPE_IMAGE_TIME_LIMIT")
    download_timeout: float = Field(default=30.0, alias="IMGPIPE_DOWNLOAD_TIMEOUT")
    connect_timeout: float = Field(default=5.0, alias="IMGPIPE_CONNECT_TIMEOUT")
    max_redirects: int = Field(default=5, alias="IMGPIPE_MAX_REDIRECTS")

    # Politeness towards image hosts (docs/architecture.md, "Downloads"). Per processor
    # process: N processor processes may hold N times as many connections to one host.
    per_host_connections: int = Field(default=6, ge=1, alias="IMGPIPE_PER_HOST_CONNECTIONS")
    download_attempts: int = Field(default=4, ge=1, alias="IMGPIPE_DOWNLOAD_ATTEMPTS")
    # The longest Retry-After honoured; a host asking for more waits this long.
    max_retry_wait: float = Field(default=300.0, gt=0, alias="IMGPIPE_MAX_RETRY_WAIT")
    user_agent: str = Field(default=f"imgpipe/{VERSION}", alias="IMGPIPE_USER_AGENT")

    # "text" lines (the console's), or "json": one object per line for log pipelines.
    log_format: Literal["text", "json"] = Field(default="text", alias="IMGPIPE_LOG_FORMAT")
    # /metrics on every service (Prometheus text format; open like the health routes).
    metrics: bool = Field(default=True, alias="IMGPIPE_METRICS")

    # Broker behaviour.
    delivery_limit: int = Field(default=5, alias="IMGPIPE_DELIVERY_LIMIT")
    prefetch: int = Field(default=0, alias="IMGPIPE_PREFETCH")  # 0: each service picks
    workers: int = Field(default=0, alias="IMGPIPE_WORKERS")  # 0: one per core

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _printable_keys(cls, keys: list[str]) -> list[str]:
        # HTTP carries header values as latin-1 while clients send UTF-8: a key beyond
        # printable ASCII could never match. Refuse it at start-up, not at every request.
        for key in keys:
            if not (key.isascii() and key.isprintable() and " " not in key):
                raise ValueError("IMGPIPE_API_KEYS: each key must be printable ASCII, no spaces")
        return keys

    @field_validator("console_origins_setting", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            return [_seconds(item) for item in value.split(",") if item.strip()]
        return value

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"

    @property
    def status_base_url(self) -> str:
        """Where clients reach the status service: PUBLIC_BASE_URL, else this machine."""
        return (self.public_base_url or f"http://127.0.0.1:{self.status_port}").rstrip("/")

    @property
    def console_origins(self) -> list[str]:
        """IMGPIPE_CONSOLE_ORIGINS, else ingest's local origins (where `imgpipe up` serves
        the console)."""
        if self.console_origins_setting:
            return self.console_origins_setting
        return [f"http://127.0.0.1:{self.ingest_port}", f"http://localhost:{self.ingest_port}"]

    @property
    def media_base_url(self) -> str:
        return self.status_base_url + "/media"

    def database_name(self, service: str) -> str:
        """`imgpipe_<service>`, prefixed by the namespace so tenants never share data."""
        name = f"imgpipe_{service}"
        return f"{self.namespace}_{name}" if self.namespace else name

    @cached_property
    def resolved_webhook_secret(self) -> str:
        """WEBHOOK_SECRET, or one generated once and kept under the data directory."""
        if self.webhook_secret:
            return self.webhook_secret
        path = self.data_dir / "webhook_secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Standard Webhooks secrets are "whsec_" + standard base64 of the key bytes.
            path.write_text("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
            path.chmod(0o600)
        return path.read_text().strip()


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> float:
    """Parse one schedule entry: "30" or "30s", "5m", "2h", "1d", as seconds."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:])
    value = float(text[:-1] if unit else text) * (unit or 1)
    if value < 0:
        raise ValueError(f"negative delay in retry schedule: {text}")
    return value
