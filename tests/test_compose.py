"""docker-compose.yml is valid Compose and runs the whole system (checked offline: no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

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


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_specification(compose: dict) -> None:
    schema = json.loads(find_schema().read_text())
    jsonschema.Draft7Validator(schema).validate(compose)


def test_every_service_is_built_from_its_own_dockerfile(compose: dict) -> None:
    for name in SERVICES:
        assert (REPO / "services" / name / "Dockerfile").is_file(), name
        build = compose["services"][name]["build"]
        context = (REPO / build["context"]).resolve()
        assert context.is_dir(), name
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
        assert dockerfile == REPO / "services" / name / "Dockerfile"


def test_dockerfiles_copy_only_paths_that_exist() -> None:
    for name in SERVICES:
        text = (REPO / "services" / name / "Dockerfile").read_text()
        sources = [
            line.split()[1:-1]
            for line in text.splitlines()
            if line.startswith("COPY") and "--from=" not in line
        ]
        for source in (path for paths in sources for path in paths):
            assert (REPO / source).exists(), f"{name}: COPY {source}"
        assert f'CMD ["imgpipe-{name}"]' in text
        assert "\nUSER " in text, f"{name} must not run as root"


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
