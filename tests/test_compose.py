"""docker-compose.yml against the Compose specification's JSON schema, every variable it gives our
processes a setting they read, and the monitoring profile's files in order."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.config import Settings

ROOT = Path(__file__).parents[1]
# The Compose specification's schema as docker-compose 1.29.2 ships it (compose/config/compose_spec.json)
COMPOSE_WHEEL = "docker-compose==1.29.2"


@pytest.fixture(scope="session")
def compose_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("compose-schema")
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", COMPOSE_WHEEL, "-d", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    wheels = list(folder.glob("docker_compose-*.whl"))
    if fetched.returncode != 0 or not wheels:
        pytest.skip(f"could not fetch {COMPOSE_WHEEL} from the package index: {fetched.stderr[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return json.loads(wheel.read("compose/config/compose_spec.json"))  # type: ignore[no-any-return]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_the_compose_file_meets_the_compose_specification(compose_schema: dict[str, Any]) -> None:
    errors = [
        f"{list(e.absolute_path)}: {e.message}"
        for e in jsonschema.Draft7Validator(compose_schema).iter_errors(compose())
    ]
    assert errors == []
    # (the check can fail: a misspelt key is refused)
    broken = compose()
    broken["services"]["gateway"]["restrat"] = "always"
    assert list(jsonschema.Draft7Validator(compose_schema).iter_errors(broken))


def test_every_variable_given_to_our_processes_is_a_setting_they_read() -> None:
    settings = {name.upper() for name in Settings.model_fields}
    ours = {
        name: service
        for name, service in compose()["services"].items()
        if service.get("image") == "swift-trainer:latest"
    }
    assert set(ours) == {"gateway", "scheduler", "gpu-monitor", "runner", "exporter", "notifier"}
    for name, service in ours.items():
        unknown = set(service.get("environment", {})) - settings
        assert not unknown, (name, unknown)


def test_the_monitoring_profile_runs_prometheus_on_the_gateways_metrics_and_grafana_with_the_dashboard() -> None:
    services = compose()["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"] and services["grafana"]["profiles"] == ["monitoring"]
    assert all("profiles" not in services[name] for name in ("gateway", "scheduler", "runner"))
    prometheus = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["gateway:8000"]
    assert job["authorization"]["credentials_file"] in " ".join(services["prometheus"]["entrypoint"])
    mounted = {volume.split(":")[0] for volume in services["grafana"]["volumes"]}
    assert {"./monitoring/grafana/provisioning", "./monitoring/grafana/dashboards"} <= mounted
    dashboard = json.loads((ROOT / "monitoring" / "grafana" / "dashboards" / "swift-trainer.json").read_text())
    uid = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {uid["datasources"][0]["uid"]}


def dashboard_metrics() -> set[str]:
    """The metric names the Grafana dashboard's queries use (without _bucket, _total)."""
    dashboard = json.loads((ROOT / "monitoring" / "grafana" / "dashboards" / "swift-trainer.json").read_text())
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names.update(re.findall(r"swift_trainer_[a-z_]+", target["expr"]))
    return {re.sub(r"_(bucket|total)$", "", name) for name in names}
