"""Settings: from the environment and env/.env.<ENVIRONMENT>; an invalid one stops the process
at start with a message naming it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def run_cli(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "gateway"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_invalid_setting_stops_the_process_naming_it(tmp_path: Path) -> None:
    done = run_cli(tmp_path, APP_PORT="eighty")
    assert done.returncode == 2
    assert "APP_PORT" in done.stderr


def test_settings_are_read_from_the_environment_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / ".env.staging").write_text("APP_PORT=9123\nAPI_PREFIX=/api/v2/\nREDIS_HOST=redis.internal\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENVIRONMENT", "staging")
    settings = load_settings()
    assert settings.app_port == 9123
    assert settings.api_prefix == "/api/v2"
    assert settings.resolved_redis_url == "redis://redis.internal:6379/0"
    assert not settings.embedded
    # The process environment wins over the file
    monkeypatch.setenv("APP_PORT", "9200")
    assert load_settings().app_port == 9200


def test_an_invalid_value_in_the_environment_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / ".env.prod").write_text("LOG_LEVEL=LOUD\n")
    done = run_cli(tmp_path, ENVIRONMENT="prod")
    assert done.returncode == 2 and "LOG_LEVEL" in done.stderr


def test_without_redis_settings_the_embedded_redis_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("REDIS_URL", "REDIS_HOST", "REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(embedded_redis_port=6500, data_dir=tmp_path)
    url = settings.resolved_redis_url
    # with the password made once in the data directory, which every process started on it reads
    password = (tmp_path / "secrets" / "redis-password").read_text().strip()
    assert settings.embedded and url == f"redis://:{password}@127.0.0.1:6500/0"
    assert load_settings(embedded_redis_port=6500, data_dir=tmp_path).resolved_redis_url == settings.resolved_redis_url
    assert password not in settings.redis_url_for_logs
    with pytest.raises(ConfigError, match="NAMESPACE"):
        load_settings(namespace="bad namespace!")


@pytest.mark.parametrize("value", ["10.0.0.7", "fe80::1", "gpu-3.cluster.internal"])
def test_a_node_address_is_an_ip_address_or_a_host_name(value: str) -> None:
    assert load_settings(node_addr=value).node_addr == value


@pytest.mark.parametrize("value", ["not an address", "-bad-.example", "a..b", "10.0.0.7:29500"])
def test_a_node_address_that_is_neither_stops_the_process_naming_it(value: str) -> None:
    with pytest.raises(ConfigError, match="NODE_ADDR"):
        load_settings(node_addr=value)


def test_config_prints_every_setting_with_its_source_and_no_secret(tmp_path: Path) -> None:
    # Given an env file giving one setting, and secrets in the environment
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / ".env.staging").write_text("APP_PORT=9123\n")
    secrets = {
        "REDIS_URL": "redis://:hunter2-url@redis.internal:6379/0",
        "API_KEYS": "alice:user:sk-alice-key",
        "AUTH_SECRET": "the-signing-secret",
        "REDIS_PASSWORD": "hunter2-password",
    }
    env = {k: v for k, v in os.environ.items() if k not in secrets and k != "ENVIRONMENT"}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "config", "--json"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT), "ENVIRONMENT": "staging", **secrets},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # Then every setting is there, with where it came from
    shown = json.loads(done.stdout)
    assert {name for name in shown if not name.startswith("(")} == set(setting_names())
    assert shown["APP_PORT"] == {"value": "9123", "source": "env/.env.staging"}
    assert shown["NAMESPACE"] == {"value": "st", "source": "default"}
    assert shown["REDIS_URL"] == {"value": "redis://:***@redis.internal:6379/0", "source": "environment"}
    assert shown["(redis)"]["value"] == "redis://:***@redis.internal:6379/0"
    # And no secret's value, only that it is set
    for name in ("API_KEYS", "AUTH_SECRET", "REDIS_PASSWORD"):
        assert shown[name] == {"value": "set (hidden)", "source": "environment"}
    assert shown["REDIS_SENTINEL_PASSWORD"]["value"] == "unset"
    assert not any(secret in done.stdout for secret in ("hunter2", "sk-alice-key", "the-signing-secret"))


def setting_names() -> list[str]:
    return [(info.alias or name).upper() for name, info in Settings.model_fields.items()]


def test_every_setting_is_in_the_readme_table_and_the_table_names_only_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    # the names in the first column of each row of the table
    named = {
        name
        for row in section.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", row.split(" | ")[0])
    }
    assert sorted(set(setting_names()) - named) == []  # settings the README does not name
    assert sorted(named - set(setting_names())) == []  # names the README gives that no setting reads
