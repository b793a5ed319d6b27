"""Run the services as real processes, as `imgpipe up` does, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from imgpipe.contracts.settings import Settings
from imgpipe.launcher.embedded import free_port
from imgpipe.launcher.supervisor import ServiceSpec, plan_services


def settings_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment that makes a child process read the same Settings."""
    env = {
        "AMQP_URL": settings.amqp_url,
        "MONGODB_URL": settings.mongodb_url or "",
        "IMGPIPE_DATA_DIR": str(settings.data_dir),
        "IMGPIPE_NAMESPACE": settings.namespace,
        "IMGPIPE_ALLOW_PRIVATE_URLS": str(settings.allow_private_urls).lower(),
        "INGEST_PORT": str(settings.ingest_port),
        "STATUS_PORT": str(settings.status_port),
        "NOTIFIER_PORT": str(settings.notifier_port),
        "PROCESSOR_PORT": str(settings.processor_port),
        "PUBLIC_BASE_URL": settings.public_base_url or "",
        "WEBHOOK_SECRET": settings.webhook_secret or "",
        "IMGPIPE_DELIVERY_LIMIT": str(settings.delivery_limit),
    }
    if settings.api_keys:
        env["IMGPIPE_API_KEYS"] = ",".join(settings.api_keys)
    env.update(overrides)
    return {**os.environ, **env}


def with_free_ports(settings: Settings) -> Settings:
    status_port = free_port()
    return settings.model_copy(
        update={
            "ingest_port": free_port(),
            "status_port": status_port,
            "notifier_port": free_port(),
            "processor_port": free_port(),
            "public_base_url": f"http://127.0.0.1:{status_port}",
        }
    )


@dataclass
class ServiceProcess:
    """One service as the launcher plans it, with the controls fault tests need."""

    spec: ServiceSpec
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.process = subprocess.Popen(
            self.spec.command,
            env={**self.env, **self.spec.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own process group, as the launcher does: kill() then reaches the processor's
            # image workers too, so none outlives a test.
            process_group=0,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout}s: {self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Signal the service, wait for it, kill what is left; returns its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self._kill_group()
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL the service and its children at once: a crash, nothing cleaned up."""
        self._kill_group()
        if self.process is not None:
            self.process.wait()

    def restart(self, timeout: float = 60) -> None:
        self.stop()
        self.start()
        self.wait_ready(timeout)

    def _kill_group(self) -> None:
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class System:
    settings: Settings
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.ingest_port}"

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.status_port}"

    @property
    def notifier_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.notifier_port}"


@contextmanager
def running_system(
    settings: Settings, processors: int = 1, ready_timeout: float = 60, **env: str
) -> Iterator[System]:
    """Start every service as its own process; stop them all (SIGTERM) on exit.
    `ready_timeout`: seconds each service may take to answer `/readyz`."""
    settings = with_free_ports(settings)
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    system = System(settings)
    for spec in plan_services(settings, processors):  # the launcher's own plan
        log_path = logs / f"{spec.name}.log"
        system.services[spec.name] = ServiceProcess(spec, settings_env(settings, **env), log_path)
    try:
        for service in system.services.values():
            service.start()
        for service in system.services.values():
            service.wait_ready(ready_timeout)
        yield system
    finally:
        for service in system.services.values():
            service.stop()
