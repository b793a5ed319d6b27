"""docker-compose.yml is valid Compose and runs the whole system, every imgpipe service
built from the one root Dockerfile, and its observability profile runs Prometheus and
Grafana on deploy/observability (checked offline: no engine; promtool checks the
Prometheus configuration, the alert rules and every query)."""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from fastapi import FastAPI

from imgpipe.contracts.metrics import instrument
from imgpipe.contracts.settings import Settings
from tests.support.metrics import exposed_names, imgpipe_names, promtool_path

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("ingest", "processor", "status", "notifier")
SCHEMA = Path("shared") / "schemas" / "compose-spec.json"


# A copy of shared/schemas/compose-spec.json, so a clone alone can run this test.
VENDORED = Path(__file__).resolve().parent / "data" / "compose-spec.json"


def find_schema() -> Path:
    """../shared beside the repository (the design's copy), else the vendored copy."""
    for folder in Path(__file__).resolve().parents:
        if (folder / SCHEMA).is_file():
            return folder / SCHEMA
    return VENDORED


DOCKERFILE = REPO / "Dockerfile"
BUILD_ARGS = ("SERVICE", "PORT")


def default_port(name: str) -> int:
    """The port a service listens on unless told otherwise."""
    return Settings.model_fields[f"{name}_port"].default


def instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def stages(parsed: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each FROM ... stage."""
    result: list[list[tuple[str, str]]] = []
    for keyword, arguments in parsed:
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, arguments))
    return result


def expand(arguments: str, values: dict[str, str]) -> str:
    """Substitute the build arguments as docker does ($X, ${X}); leave other variables."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda match: values.get(match[1] or match[2], match[0]),
        arguments,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_specification(compose: dict) -> None:
    schema = json.loads(find_schema().read_text())
    jsonschema.Draft7Validator(schema).validate(compose)


def test_every_service_is_built_from_the_one_dockerfile(compose: dict) -> None:
    for name in SERVICES:
        build = compose["services"][name]["build"]
        assert (REPO / build["context"]).resolve() == REPO, name
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
        assert build["args"] == {"SERVICE": name, "PORT": str(default_port(name))}, name
    # No per-service copy left to drift from the shared one.
    assert not list(REPO.glob("services/*/Dockerfile"))


def test_healthchecks_probe_the_port_each_service_listens_on(compose: dict) -> None:
    for name in SERVICES:
        probe = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert f"127.0.0.1:{default_port(name)}/readyz" in probe, name


def test_dockerfile_declares_service_and_port_in_every_stage_that_uses_them() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG SERVICE$", text, re.MULTILINE)
    for stage in stages(instructions(text)):
        declared: set[str] = set()
        for keyword, arguments in stage:
            if keyword == "ARG":
                declared.add(arguments.partition("=")[0])
            # A stage sees only the ARGs it declares: unset, $SERVICE would expand to "".
            for variable in BUILD_ARGS:
                if re.search(rf"\$\{{?{variable}\b", arguments):
                    assert variable in declared, f"{keyword} {arguments}"


def test_dockerfile_accepts_each_service_with_its_port_and_nothing_else() -> None:
    (check,) = [
        arguments
        for keyword, arguments in instructions(DOCKERFILE.read_text())
        if keyword == "RUN" and arguments.startswith("case ")
    ]

    def accepts(service: str, port: str) -> bool:
        environment = {"PATH": "/usr/bin:/bin", "SERVICE": service, "PORT": port}
        checked = subprocess.run(["sh", "-c", check], env=environment, capture_output=True)
        return checked.returncode == 0

    for name in SERVICES:
        assert accepts(name, str(default_port(name))), name
        assert not accepts(name, ""), name
    assert not accepts("", "")
    assert not accepts("status", "8001")
    assert not accepts("launcher", "8000")
    assert not accepts("contracts", "8001")


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_builds_and_runs_each_service(name: str, tmp_path: Path) -> None:
    """Every path, package and command the Dockerfile names exists, for each SERVICE."""
    values = {"SERVICE": name, "PORT": str(default_port(name))}
    build, runtime = stages(instructions(DOCKERFILE.read_text()))
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    project = tomllib.loads((REPO / "services" / name / "pyproject.toml").read_text())

    for keyword, arguments in build + runtime:
        arguments = expand(arguments, values)
        if keyword == "COPY" and "--from=" not in arguments:
            for source in arguments.split()[:-1]:
                assert (REPO / source).exists(), f"{name}: COPY {source}"
    (export,) = [expand(a, values) for k, a in build if k == "RUN" and "uv export" in a]
    package = re.search(r"--package\s+\"?([\w-]+)", export).group(1)
    assert package == f"imgpipe-{name}"
    assert package in {entry["name"] for entry in lock["package"]}
    installed = [expand(a, values) for k, a in build if "--no-deps" in a]
    assert f"./services/{name}" in installed[0]

    keywords = [keyword for keyword, _ in runtime]
    assert "USER" in keywords, f"{name} must not run as root"
    (exposed,) = [expand(a, values) for k, a in runtime if k == "EXPOSE"]
    assert exposed == str(default_port(name))

    # Run the image's CMD, with its ENV, against a stand-in for the console scripts: it
    # must start exactly imgpipe-<name>, the script the service's package installs.
    environment = {}
    for keyword, arguments in runtime:
        if keyword == "ENV":
            for pair in shlex.split(expand(arguments, values)):
                key, _, value = pair.partition("=")
                environment[key] = value
    for script in (f"imgpipe-{other}" for other in SERVICES):
        stand_in = tmp_path / script
        stand_in.write_text(f"#!/bin/sh\necho {script}\n")
        stand_in.chmod(0o755)
    environment["PATH"] = f"{tmp_path}:/usr/bin:/bin"
    (command,) = [json.loads(a) for k, a in runtime if k == "CMD"]
    started = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    assert started.stdout.strip() == f"imgpipe-{name}"
    assert f"imgpipe-{name}" in project["project"]["scripts"]


def test_every_service_has_a_healthcheck(compose: dict) -> None:
    for name, service in compose["services"].items():
        assert service.get("healthcheck", {}).get("test"), name


def test_services_wait_for_a_healthy_broker_and_database(compose: dict) -> None:
    for name in SERVICES:
        depends = compose["services"][name]["depends_on"]
        for needed in ("rabbitmq", "mongo"):
            assert depends[needed]["condition"] == "service_healthy", (name, needed)
        environment = compose["services"][name]["environment"]
        for variable in ("AMQP_URL", "MONGODB_URL", "PUBLIC_BASE_URL"):
            assert environment[variable], (name, variable)
        assert environment["IMGPIPE_DATA_DIR"] == "/data"


def test_processor_can_be_scaled(compose: dict) -> None:
    processor = compose["services"]["processor"]
    assert "container_name" not in processor
    # A published host port would collide between replicas.
    assert "ports" not in processor


def test_processor_writes_and_status_serves_the_same_media_volume(compose: dict) -> None:
    assert "media" in compose["volumes"]
    for name in ("processor", "status"):
        assert "media:/data" in compose["services"][name]["volumes"], name


def test_public_ports_match_the_documented_defaults(compose: dict) -> None:
    expected = {"ingest": "8001:8001", "status": "8002:8002", "notifier": "8003:8003"}
    for name, mapping in expected.items():
        assert mapping in compose["services"][name]["ports"], name


# The observability profile ----------------------------------------------------------

OBSERVABILITY = REPO / "deploy" / "observability"
PROMETHEUS_CONFIG = OBSERVABILITY / "prometheus.yml"
RULES = OBSERVABILITY / "rules.yml"
RULE_TESTS = OBSERVABILITY / "rules.test.yml"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "imgpipe.json"
GRAFANA_PROVISIONING = OBSERVABILITY / "grafana" / "provisioning"
MONITORING = ("prometheus", "grafana")

# Alerts the README's "Monitoring" section promises.
REQUIRED_ALERTS = {
    "ImgpipeServiceDown",
    "ImgpipeMessagesDeadLettered",
    "ImgpipeWebhookDeliveriesFailed",
    "ImgpipeJobsQueueGrowing",
    "ImgpipeImageFailureRateHigh",
}
# Dashboard panels by title, each with a metric its queries must read.
REQUIRED_PANELS = {
    "Throughput: images/s by outcome": "imgpipe_images_processed_total",
    "Failures by error code": "imgpipe_images_processed_total",
    "Download latency": "imgpipe_download_duration_seconds_bucket",
    "Compress latency": "imgpipe_compress_duration_seconds_bucket",
    "Store latency": "imgpipe_store_duration_seconds_bucket",
    "Jobs queue depth": "imgpipe_processor_jobs_queued",
    "Webhook deliveries by outcome": "imgpipe_webhook_attempts_total",
    "Webhook backlog and latency": "imgpipe_webhook_duration_seconds_bucket",
    "Requests received and completed": "imgpipe_requests_completed_total",
}


def promtool(*args: str) -> None:
    result = subprocess.run(
        [promtool_path(), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> dict[str, list[str]]:
    """Each dashboard panel's title and PromQL expressions."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        panel["title"]: [target["expr"] for target in panel["targets"]]
        for panel in dashboard["panels"]
    }


def bind_mounts(service: dict) -> list[tuple[Path, str, str]]:
    """(source in the repository, target, options) of a service's bind mounts."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        if source.startswith("."):
            mounts.append((REPO / source, target, ",".join(options)))
    return mounts


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    """Every metric name a service can expose: every service's modules imported (their
    metrics join the process-wide registry), then one app's real `GET /metrics`."""
    for name in SERVICES:
        for module in ("app", "bootstrap", "handlers"):
            importlib.import_module(f"imgpipe.{name}.{module}")
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, bool]:
        return {"ok": True}

    instrument(app)

    async def scrape() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.get("/ping")).status_code == 200  # HTTP metrics get samples
            response = await client.get("/metrics")
            assert response.status_code == 200
            return response.text

    names = exposed_names(asyncio.run(scrape()))
    # The metrics the README's table names, as a check on the check.
    assert {"imgpipe_images_processed_total", "imgpipe_webhook_attempts_total"} <= names
    assert "imgpipe_processor_jobs_queued" in names
    return names


def test_observability_profile_runs_prometheus_and_grafana_beside_the_services(
    compose: dict,
) -> None:
    services = compose["services"]
    for name in MONITORING:
        service = services[name]
        assert service["profiles"] == ["observability"], name
        _, _, tag = service["image"].partition(":")
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin a version, not {tag!r}"
    # The imgpipe services, the broker and the database need no profile: a plain
    # `docker compose up` still starts them, and `--profile observability` adds the rest.
    for name, service in services.items():
        if name not in MONITORING:
            assert "profiles" not in service, name
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    assert "127.0.0.1:3000:3000" in services["grafana"]["ports"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")


def test_observability_files_are_mounted_read_only_and_exist(compose: dict) -> None:
    mounted: dict[Path, str] = {}
    for name in MONITORING:
        for source, target, options in bind_mounts(compose["services"][name]):
            assert source.exists(), f"{name}: {source} is not in the repository"
            assert options == "ro", f"{name}: {source} must be mounted read-only"
            mounted[source.resolve()] = target
    assert mounted[PROMETHEUS_CONFIG] == "/etc/prometheus/prometheus.yml"
    assert mounted[RULES] == "/etc/prometheus/rules.yml"
    assert mounted[GRAFANA_PROVISIONING] == "/etc/grafana/provisioning"
    # Grafana's dashboard provider reads the folder the dashboards are mounted on.
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "imgpipe.yml").read_text())
    (dashboards,) = provider["providers"]
    assert mounted[DASHBOARD.parent] == dashboards["options"]["path"]
    prometheus_command = compose["services"]["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus_command


def test_prometheus_scrapes_every_service_and_every_processor_replica() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in ("ingest", "status", "notifier"):
        (static,) = jobs[name]["static_configs"]
        assert static["targets"] == [f"{name}:{default_port(name)}"], name
    # `--scale processor=N`: Docker's DNS gives one A record per replica, each a target.
    (discovery,) = jobs["processor"]["dns_sd_configs"]
    assert discovery["names"] == ["processor"]
    assert discovery["type"] == "A"
    assert discovery["port"] == default_port("processor")
    assert "static_configs" not in jobs["processor"]
    # The rule files resolve beside the configuration, in the repository as in the container.
    assert [(PROMETHEUS_CONFIG.parent / f).resolve() for f in config["rule_files"]] == [RULES]


def test_promtool_accepts_the_prometheus_configuration_and_rules() -> None:
    promtool("check", "config", str(PROMETHEUS_CONFIG))  # checks the rule files it names
    promtool("check", "rules", str(RULES))


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool("test", "rules", str(RULE_TESTS))


def test_the_documented_alerts_exist() -> None:
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts >= REQUIRED_ALERTS
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_dashboard_has_the_panels_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = GRAFANA_PROVISIONING / "datasources" / "prometheus.yml"
    (prometheus,) = yaml.safe_load(datasources.read_text())["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"  # the compose service
    queries = dashboard_queries()
    for title, metric in REQUIRED_PANELS.items():
        assert title in queries, f"no panel {title!r}"
        assert any(metric in imgpipe_names(expr) for expr in queries[title]), title
    latency = queries["Download latency"]
    assert all(expr.startswith("histogram_quantile(") for expr in latency)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for thing in (panel, *panel["targets"]):
            assert thing["datasource"]["uid"] == prometheus["uid"], panel["title"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard query as a recording rule (Grafana's
    $__rate_interval given a value)."""
    queries = [expr for exprs in dashboard_queries().values() for expr in exprs]
    rules = [
        {"record": f"imgpipe_dashboard:query{n}", "expr": expr.replace("$__rate_interval", "1m")}
        for n, expr in enumerate(queries)
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))


def test_rules_and_dashboard_read_only_metrics_the_services_expose(exposed: set[str]) -> None:
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in imgpipe_names(rule["expr"]):
            used.setdefault(name, set()).add(f"rule {rule['alert']}")
    for title, exprs in dashboard_queries().items():
        for name in imgpipe_names(" ".join(exprs)):
            used.setdefault(name, set()).add(f"panel {title!r}")
    assert len(used) >= 15
    missing = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert not missing, f"not exposed by any service: {missing}"
