"""docker-compose.yml is valid Compose and runs the whole system, every imgpipe service
built from the one root Dockerfile (checked offline: no engine)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from imgpipe.contracts.settings import Settings

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
