"""`imgpipe up`: run every service as a child process, restart one that dies (restarts.py
says when, and when a crash loop stops everything), and stop them all together."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import httpx

from imgpipe.contracts.settings import Settings
from imgpipe.launcher.embedded import announce_url, embedded_mongo, free_port
from imgpipe.launcher.restarts import CrashHistory, RestartPolicy, describe_exit
from imgpipe.launcher.tethered import tethered_command

DEFAULT_MONGO_PORT = 27018
STOP_GRACE_SECONDS = 10.0


class LaunchError(RuntimeError):
    """Startup or supervision failed; the message is meant for the user."""


class _Stop(BaseException):
    """Raised from the SIGTERM/SIGINT handler to unwind into the shutdown path."""


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # "ingest", "processor-2", ...
    service: str  # the package: imgpipe.<service>.main
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> list[str]:
        # `python -c` rather than the console script: works wherever the package imports.
        code = f"import sys; from imgpipe.{self.service}.main import main; sys.exit(main())"
        return [sys.executable, "-c", code]


def plan_services(settings: Settings, processors: int = 1) -> list[ServiceSpec]:
    """One spec per child; processor instance i gets its own health port."""
    specs = [ServiceSpec("ingest", "ingest", settings.ingest_port)]
    for i in range(processors):
        port = settings.processor_port + i
        name = "processor" if processors == 1 else f"processor-{i + 1}"
        specs.append(ServiceSpec(name, "processor", port, {"PROCESSOR_PORT": str(port)}))
    specs.append(ServiceSpec("status", "status", settings.status_port))
    specs.append(ServiceSpec("notifier", "notifier", settings.notifier_port))
    return specs


def mask_url(url: str) -> str:
    """Hide the password of a URL before printing it."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def local_host(host: str) -> str:
    """The address to reach a server bound to `host` from this machine."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


class Console:
    """Serialises the supervisor's own lines and the children's prefixed log lines."""

    def __init__(self, stream: IO[str] | None = None, echo_logs: bool = True) -> None:
        self.stream = stream or sys.stdout
        self.echo_logs = echo_logs
        self.lock = threading.Lock()
        self.width = 10

    def say(self, text: str = "") -> None:
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def log_line(self, name: str, line: str) -> None:
        if not self.echo_logs:
            return
        with self.lock:
            self.stream.write(f"{name:<{self.width}} | {line}\n")
            self.stream.flush()


class Child:
    """One service process: its output goes to its log file and, prefixed, to the console."""

    def __init__(self, spec: ServiceSpec, env: dict[str, str], log_path: Path, console: Console):
        self.spec = spec
        self.log_path = log_path
        self.started_at = time.monotonic()
        self.tail: deque[str] = deque(maxlen=30)
        self.process = subprocess.Popen(
            # Tethered: the service gets SIGTERM if the launcher is killed (even with SIGKILL),
            # so it never outlives it holding its port.
            tethered_command(spec.command),
            env={**env, **spec.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own process group: a terminal's Ctrl-C reaches only the supervisor, which then
            # stops the children in order; killpg also reaches a processor's worker pool.
            process_group=0,
        )
        self._pump = threading.Thread(target=self._copy_output, args=(console,), daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _copy_output(self, console: Console) -> None:
        assert self.process.stdout is not None
        with open(self.log_path, "ab") as log:
            for raw in self.process.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                console.log_line(self.spec.name, line)

    def exited(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def last_lines(self, count: int = 20) -> str:
        self._pump.join(timeout=1)  # let the last output of a dead child arrive
        return "\n".join(list(self.tail)[-count:]) or "(no output)"

    def note(self, text: str) -> None:
        """A line of the supervisor's own in this service's log, once its output has ended."""
        self._pump.join(timeout=1)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"imgpipe: {text}\n")


@dataclass
class Supervisor:
    settings: Settings
    processors: int = 1
    mongo_port: int | None = None
    ready_timeout: float = 90.0
    console: Console = field(default_factory=Console)
    # None: the defaults, with IMGPIPE_RESTART_BACKOFF read when `run` starts.
    restart_policy: RestartPolicy | None = None
    children: list[Child] = field(default_factory=list)
    mongo_description: str = ""
    child_env: dict[str, str] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.settings.data_dir.resolve() / "logs"

    def run(self) -> int:
        """Start everything, wait until ready, supervise; returns the exit code."""
        with _stop_on_signals(), ExitStack() as stack:
            try:
                policy = self._restart_policy()
                specs = plan_services(self.settings, self.processors)
                self._check_ports(specs)
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self.child_env = self._child_env(stack)
                stack.callback(self._stop_children)
                for spec in specs:
                    self.children.append(self._start(spec))
                self._wait_ready()
                self._print_summary()
                return self._watch(policy)
            except _Stop:
                self.console.say("imgpipe: stopping ...")
                return 0
            except LaunchError as error:
                self.console.say(f"imgpipe: error: {error}")
                return 1
            finally:
                # From here on a second Ctrl-C must not cut the cleanup short.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _restart_policy(self) -> RestartPolicy:
        if self.restart_policy is not None:
            return self.restart_policy
        try:
            return RestartPolicy.from_env(os.environ)
        except ValueError as error:
            raise LaunchError(str(error)) from error

    def _check_ports(self, specs: list[ServiceSpec]) -> None:
        for spec in specs:
            if not port_is_free(self.settings.host, spec.port):
                variable = f"{spec.service.upper()}_PORT"
                raise LaunchError(
                    f"port {spec.port} for {spec.name} is in use (another `imgpipe up`?); "
                    f"stop it or set {variable}"
                )

    def _child_env(self, stack: ExitStack) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["IMGPIPE_DATA_DIR"] = str(self.settings.data_dir.resolve())
        if self.settings.mongodb_url:
            self.mongo_description = f"MongoDB at {mask_url(self.settings.mongodb_url)}"
            env["MONGODB_URL"] = self.settings.mongodb_url
            return env
        storage = self.settings.data_dir.resolve() / "mongo"
        port = self.mongo_port or _default_mongo_port()
        self.console.say(f"imgpipe: MONGODB_URL is unset: starting embedded SecantusDB on {port}")
        try:
            url = stack.enter_context(
                embedded_mongo(storage, port, log_file=self.log_dir / "mongo.log")
            )
        except (RuntimeError, TimeoutError) as error:
            raise LaunchError(
                f"embedded SecantusDB did not start: {error} (log: {self.log_dir / 'mongo.log'})"
            ) from error
        self.mongo_description = f"embedded SecantusDB at {url} (data: {storage})"
        # For `imgpipe backup` while this runs; gone before the database stops.
        stack.callback(announce_url(self.settings.data_dir.resolve(), url).unlink, missing_ok=True)
        env["MONGODB_URL"] = url
        return env

    def _start(self, spec: ServiceSpec) -> Child:
        # Always from the main thread: the tether is to the thread that forks the child.
        self.console.width = max(self.console.width, len(spec.name))
        child = Child(spec, self.child_env, self.log_dir / f"{spec.name}.log", self.console)
        self.console.say(f"imgpipe: started {spec.name} (pid {child.pid}, port {spec.port})")
        return child

    def _wait_ready(self) -> None:
        host = local_host(self.settings.host)
        pending = {child.spec.name: child for child in self.children}
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=2.0) as http:
            while pending:
                for name, child in list(pending.items()):
                    if (code := child.exited()) is not None:
                        raise LaunchError(
                            f"{name} exited with code {code} while starting; "
                            f"last lines of {child.log_path}:\n{child.last_lines()}"
                        )
                    if _answers_ready(http, f"http://{host}:{child.spec.port}/readyz"):
                        del pending[name]
                if pending and time.monotonic() > deadline:
                    name, child = next(iter(pending.items()))
                    raise LaunchError(
                        f"{name} did not answer /readyz on port {child.spec.port} within "
                        f"{self.ready_timeout:.0f}s; last lines of {child.log_path}:\n"
                        f"{child.last_lines()}"
                    )
                time.sleep(0.25)

    def _watch(self, policy: RestartPolicy) -> int:
        """Restart each child that exits, after its backoff; only a crash loop ends this."""
        crashes = {child.spec.name: CrashHistory(policy) for child in self.children}
        due: dict[str, float] = {}  # a dead child's name -> when it is restarted
        returning: set[str] = set()  # restarted, not yet answering /readyz
        host = local_host(self.settings.host)
        with httpx.Client(timeout=1.0) as http:
            while True:
                now = time.monotonic()
                for index, child in enumerate(self.children):
                    name = child.spec.name
                    if name in due:
                        if now >= due[name]:
                            del due[name]
                            child.note("restarting")
                            self.children[index] = self._start(child.spec)
                            returning.add(name)
                    elif (code := child.exited()) is not None:
                        returning.discard(name)
                        due[name] = now + self._crashed(child, code, crashes[name], now)
                    elif name in returning and _answers_ready(
                        http, f"http://{host}:{child.spec.port}/readyz"
                    ):
                        returning.discard(name)
                        self.console.say(f"imgpipe: {name} is back (pid {child.pid})")
                time.sleep(0.25)

    def _crashed(self, child: Child, code: int, crashes: CrashHistory, now: float) -> float:
        """Report a child's death; its restart delay, or LaunchError for a crash loop."""
        child.kill()  # what is left of its group (a processor's image workers) holds its port
        delay = crashes.record(now, uptime=now - child.started_at)
        name, how = child.spec.name, describe_exit(code)
        window = f"{crashes.policy.window:.0f}s"
        if delay is None:
            child.note(f"{how}: {crashes.recent} crashes within {window}, a crash loop")
            raise LaunchError(
                f"{name} crashed {crashes.recent} times within {window} (last: {how}): a crash "
                f"loop, so imgpipe stops instead of hiding it. Last lines of {child.log_path}:\n"
                f"{child.last_lines()}"
            )
        report = (
            f"{name} (pid {child.pid}) exited unexpectedly ({how}); restarting it in "
            f"{delay:g}s ({crashes.recent} crash(es) in the last {window}; imgpipe stops at "
            f"{crashes.policy.crash_limit})"
        )
        child.note(report)
        self.console.say(f"imgpipe: {report}")
        return delay

    def _stop_children(self) -> None:
        """SIGTERM every child, wait, SIGKILL stragglers (the embedded DB stops after)."""
        for child in self.children:
            child.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in self.children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.console.say(f"imgpipe: {child.spec.name} did not stop in time: killing it")
            # Kill the group either way: a processor's pool workers must not outlive it.
            child.kill()
            child.process.wait()
        self.console.say("imgpipe: all services stopped")

    def _print_summary(self) -> None:
        settings = self.settings
        host = local_host(settings.host)
        ingest = f"http://{host}:{settings.ingest_port}"
        status = f"http://{host}:{settings.status_port}"
        notifier = f"http://{host}:{settings.notifier_port}"
        processors = [c.spec for c in self.children if c.spec.service == "processor"]
        storage = (
            f"cloudinary: cloud {urlsplit(settings.cloudinary_url).hostname}"
            if settings.cloudinary_url
            else f"local: {settings.media_dir.resolve()}"
        )
        lines = [
            "",
            "imgpipe is up" + (f" (namespace {settings.namespace})" if settings.namespace else ""),
            f"  console       {ingest}/",
            f"  upload        POST {ingest}/upload",
            f"  ingest docs   {ingest}/docs",
            f"  status        {status}/status/{{request_id}}",
            f"  status docs   {status}/docs",
            f"  notifier      {notifier}",
            "  processor     " + ", ".join(f"{p.name} :{p.port} (health only)" for p in processors),
            f"  storage       {storage}",
            f"  media URLs    {settings.media_base_url}/...",
            f"  database      {self.mongo_description}",
            f"  broker        {mask_url(settings.amqp_url)}",
            f"  logs          {self.log_dir}",
        ]
        if settings.allow_private_urls:
            lines.append(
                "  WARNING: IMGPIPE_ALLOW_PRIVATE_URLS is on: image and webhook URLs may point at "
                "loopback and private networks. Use it only for tests and demos."
            )
        lines += ["Press Ctrl-C to stop.", ""]
        self.console.say("\n".join(lines))


def _answers_ready(http: httpx.Client, url: str) -> bool:
    try:
        return http.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def _default_mongo_port() -> int:
    return DEFAULT_MONGO_PORT if port_is_free("127.0.0.1", DEFAULT_MONGO_PORT) else free_port()


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM unwind the main thread into the orderly shutdown."""

    def handler(signum: int, frame: object) -> None:
        raise _Stop

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
