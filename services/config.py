"""Settings from the environment (and ``env/.env.<ENVIRONMENT>`` when it exists).

An invalid setting stops the process at start with a message naming it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from events.connection import SentinelTarget, parse_sentinel_url, parse_sentinels, sentinel_url
from events.keys import Keys
from events.params import ModelHub
from events.policy import Policy
from events.quotas import Quotas
from services import host_secrets
from services.errors import ServiceError

# A host name as RFC 1123 spells one: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class ConfigError(ServiceError):
    """A setting is missing or invalid; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, frozen=True)

    environment: str = Field("development", pattern=r"^[A-Za-z0-9_.-]+$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["console", "json"] = "console"

    # Redis: REDIS_URL wins; else REDIS_HOST/REDIS_PORT; else the embedded server on EMBEDDED_REDIS_PORT.
    # Whoever can write to Redis controls the system, so the embedded one requires a password too:
    # REDIS_PASSWORD, else one made once under DATA_DIR/secrets (see embedded_redis_password).
    redis_url: str | None = None
    redis_host: str | None = None
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_db: int = Field(0, ge=0)
    redis_password: SecretStr | None = None
    # Or through Sentinel: REDIS_SENTINELS=host:port,host:port,... (instead of REDIS_URL/REDIS_HOST),
    # the master's name, and the sentinels' own password if they require one (REDIS_PASSWORD and
    # REDIS_DB are the master's); or REDIS_URL=redis+sentinel://... (see events.connection).
    redis_sentinels: str = ""
    redis_sentinel_master: str = Field("mymaster", pattern=r"^[A-Za-z0-9_.:-]+$")
    redis_sentinel_password: SecretStr | None = None
    # The gateway acknowledges a command once this many replicas hold it too (WAIT), else answers
    # 503 after the timeout; default 1 through Sentinel, else 0 (see wait_replicas).
    redis_wait_replicas: int | None = Field(None, ge=0, le=16)
    redis_wait_timeout_ms: int = Field(1000, ge=1, le=60_000)
    embedded_redis_port: int = Field(6399, ge=1, le=65535)
    namespace: str = Field("st", pattern=r"^[A-Za-z0-9_.:-]+$")

    api_prefix: str = "/api/v1"
    app_host: str = "127.0.0.1"
    app_port: int = Field(8000, ge=1, le=65535)
    # Several gateway processes on one host may share APP_PORT (SO_REUSEPORT: the kernel spreads
    # connections among them), e.g. `honcho start -c gateway=2`.
    app_reuse_port: bool = False

    data_dir: Path = Path("data")
    # Where local model, data and output paths may be (separated by ':'); default: DATA_DIR and
    # the working directory.
    path_roots: str = ""
    max_sweep_points: int = Field(256, ge=1, le=100_000)  # jobs one sweep may create
    # Idle-GPU reclaim, off unless set: a job whose GPUs all stay under IDLE_GPU_UTIL_PCT for
    # IDLE_TIMEOUT_S (a job's idle_timeout_s wins) is stopped with a checkpoint and fails (idle);
    # a deploy, once it has served no request that long.
    idle_timeout_s: int | None = Field(None, ge=1)
    idle_gpu_util_pct: float = Field(5.0, ge=0, le=100)
    # Simulated GPUs' utilisation, read at each heartbeat from this JSON file ({"0": 90, "*": 0}):
    # for trying idle reclaim without GPUs. Unset or unreadable: 0 %.
    simulated_gpu_utilization_file: Path | None = None
    # Notifications: cluster-wide webhooks (comma-separated; "slack:" before a URL for a Slack
    # body), the secret their signatures use (unset: one kept in DATA_DIR/secrets/webhook-secret),
    # whether loopback URLs may be called, and each delivery's timeout and attempts.
    webhook_urls: str = ""
    webhook_secret: SecretStr | None = None
    allow_loopback_webhooks: bool = False
    webhook_timeout_s: float = Field(5.0, gt=0, le=120)
    webhook_attempts: int = Field(4, ge=1, le=20)
    webhook_backoff_s: float = Field(0.5, gt=0, le=60)
    # Where hub ids are downloaded from, unless a job says (its `hub`).
    model_hub: ModelHub = ModelHub.modelscope
    # Extra ms-swift flags that load code (external_plugins ...): refused unless this is on, and
    # then accepted from admins only.
    allow_code_flags: bool = False
    node_name: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9_.-]+$")
    # Where the other nodes reach this one (an IP address or host name), advertised in its
    # heartbeats: a gang job's rank 0 node is its ranks' MASTER_ADDR. Unset: not a rank 0 node.
    node_addr: str | None = None
    instance: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        pattern=r"^[A-Za-z0-9_.:-]+$",
    )

    simulated_gpus: int = Field(2, ge=0, le=64)
    simulated_gpu_memory_mb: int = Field(24_576, ge=1)
    heartbeat_interval_s: float = Field(2.0, gt=0, le=60)
    node_timeout_s: float = Field(30.0, gt=0)
    backfill: bool = False  # start short jobs ahead of a blocked one when they end before it could start
    foreign_memory_threshold_mb: int = Field(1024, ge=0)
    # Sharing the pool. PREEMPTION=priority: a queued job may stop (checkpoint and requeue)
    # running preemptible jobs at least PREEMPT_PRIORITY_GAP below it that have run
    # PREEMPT_MIN_RUNTIME_S since they started, when that lets it start at once.
    preemption: Literal["off", "priority"] = "off"
    preempt_priority_gap: int = Field(1, ge=1, le=10)
    preempt_min_runtime_s: float = Field(300.0, ge=0)
    max_preemptions: int = Field(3, ge=0, le=1000)  # a job preempted this often is not preempted again
    # Quotas per user and team: a JSON table, inline or in a file (see README, Quotas); applied
    # when it differs from the last table the scheduler applied (admins change it at run time).
    quotas: str = ""
    quota_borrowing: bool = False  # over-quota jobs may use GPUs no job within quota waits for
    fair_share: bool = False  # within a priority, the owner with the least decayed GPU usage first
    fair_share_half_life_s: float = Field(7 * 24 * 3600.0, gt=0)

    swift_bin: str = "swift"
    deploy_port_range: str = Field("20000-20999", pattern=r"^\d{2,5}-\d{2,5}$")
    # torchrun's rendezvous port of each attempt on several GPUs or nodes (MASTER_PORT), chosen by
    # the scheduler and recorded in the log.
    rendezvous_port_range: str = Field("29500-29999", pattern=r"^\d{2,5}-\d{2,5}$")
    # A job to resume from a checkpoint that no node in service can read (it was written on a
    # node that is lost, to storage no other node shares): wait for that node, or start it again
    # from zero, with the reason in the log.
    lost_checkpoint: Literal["wait", "restart"] = "wait"
    job_omp_num_threads: int = Field(1, ge=1)
    job_log_maxlen: int = Field(10_000, ge=100)
    telemetry_maxlen: int = Field(10_000, ge=100)
    stop_grace_s: float = Field(30.0, gt=0)

    leader_lease_ms: int = Field(5000, ge=500)
    claim_idle_ms: int = Field(60_000, ge=100)
    max_deliveries: int = Field(5, ge=1)
    submit_wait_s: float = Field(2.0, ge=0, le=30)

    # Access control: "name:admin|user:key" entries (key in clear, or sha256:<hex>); none: off,
    # which the gateway allows only on a loopback address. AUTH_SECRET signs browsers' short-lived
    # tokens; unset, the gateways of one DATA_DIR share one kept in DATA_DIR/secrets/auth-secret
    # (never in Redis: whoever reads Redis must not be able to forge a token). Gateways on
    # several hosts need the same AUTH_SECRET.
    api_keys: SecretStr = SecretStr("")
    auth_secret: SecretStr | None = None
    auth_token_ttl_s: float = Field(300.0, gt=0)
    # The names (Host) the gateway answers to besides loopback ones, comma-separated, "*.domain"
    # for a domain's: without API keys only these (a page elsewhere could rebind its own name to
    # 127.0.0.1); with keys, any name unless some are listed.
    allowed_hosts: str = ""
    # Origins (scheme://host[:port]) besides the gateway's own whose pages may send it writes:
    # e.g. the https:// address of a proxy in front of it.
    allowed_origins: str = ""

    # Retention of the log (the audit trail): keep everything unless a limit is set. Entries past
    # a limit are archived (compressed JSON lines under ARCHIVE_DIR) and then trimmed from Redis.
    audit_max_age_s: float | None = Field(None, gt=0)
    audit_max_entries: int | None = Field(None, ge=1000)
    archive_dir_: Path | None = Field(None, alias="archive_dir")
    retention_interval_s: float = Field(60.0, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _sentinel_url(cls, value: str | None) -> str | None:
        if value:
            parse_sentinel_url(value)  # raises, saying why, for a malformed redis+sentinel:// URL
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            return ""
        if info.data.get("redis_url") or info.data.get("redis_host"):
            raise ValueError("set either REDIS_SENTINELS or REDIS_URL/REDIS_HOST, not both")
        parse_sentinels(value)
        return value

    @field_validator("node_addr")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        """An IP address, or a host name the other nodes resolve."""
        if value is None or not value.strip():
            return None
        value = value.strip()
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(value))
        if not _HOST_NAME.match(value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name")
        return value

    @field_validator("api_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = "/" + value.strip("/")
        return "" if value == "/" else value

    @property
    def policy(self) -> Policy:
        """How the pool is shared, as the scheduler decides and the gateway explains it."""
        return Policy(
            preemption=self.preemption == "priority",
            preempt_gap=self.preempt_priority_gap,
            preempt_min_runtime_s=self.preempt_min_runtime_s,
            max_preemptions=self.max_preemptions,
            borrowing=self.quota_borrowing,
            fair_share=self.fair_share,
        )

    @cached_property
    def configured_quotas(self) -> Quotas | None:
        """The QUOTAS table (inline JSON, or the path of a JSON file); None when not set.
        Raises ConfigError naming what is wrong."""
        text = self.quotas.strip()
        if not text:
            return None
        if not text.startswith("{"):
            try:
                text = Path(text).expanduser().read_text()
            except OSError as exc:
                raise ConfigError(f"QUOTAS: cannot read {self.quotas!r}: {exc.strerror}") from exc
        try:
            return Quotas.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the table"
            raise ConfigError(f"QUOTAS: {where}: {first['msg']}") from exc

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: the `redis` process runs one in the data dir."""
        return not self.redis_url and not self.redis_host and not self.redis_sentinels

    @cached_property
    def embedded_redis_password(self) -> str:
        """The password the embedded Redis requires: REDIS_PASSWORD, else the one kept in
        DATA_DIR/secrets/redis-password (made by the first process to ask), so that every process
        started on the same DATA_DIR connects with no configuration."""
        configured = self.redis_password.get_secret_value() if self.redis_password else ""
        return configured or host_secrets.read_or_create(host_secrets.redis_password_file(self.data_dir))

    @cached_property
    def resolved_webhook_secret(self) -> str:
        """WEBHOOK_SECRET, else the one kept in DATA_DIR/secrets/webhook-secret (give it to receivers)."""
        configured = self.webhook_secret.get_secret_value() if self.webhook_secret else ""
        return configured or host_secrets.read_or_create(host_secrets.secrets_dir(self.data_dir) / "webhook-secret")

    @cached_property
    def resolved_redis_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        if self.redis_sentinels:
            secret = self.redis_sentinel_password
            target = SentinelTarget(
                sentinels=parse_sentinels(self.redis_sentinels),
                master=self.redis_sentinel_master,
                db=self.redis_db,
                password=self.redis_password.get_secret_value() if self.redis_password else None,
                sentinel_password=secret.get_secret_value() if secret else None,
            )
            return sentinel_url(target)
        if self.redis_host:
            password = self.redis_password.get_secret_value() if self.redis_password else ""
            return _redis_url(self.redis_host, self.redis_port, self.redis_db, password)
        return _redis_url("127.0.0.1", self.embedded_redis_port, self.redis_db, self.embedded_redis_password)

    @property
    def redis_sentinel(self) -> bool:
        """True when Redis is reached through Sentinel (a master that may fail over)."""
        return parse_sentinel_url(self.resolved_redis_url) is not None

    @property
    def wait_replicas(self) -> int:
        """How many replicas must hold a command before the gateway acknowledges it."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_sentinel else 0

    @property
    def redis_url_for_logs(self) -> str:
        """Where Redis is, with any password in the URL masked."""
        return masked_url(self.resolved_redis_url)

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)

    @cached_property
    def roots(self) -> list[Path]:
        listed = [Path(p).expanduser().resolve() for p in self.path_roots.split(":") if p]
        return listed or [self.data_dir.resolve(), Path.cwd().resolve()]

    @cached_property
    def private_dirs(self) -> tuple[Path, ...]:
        """The service's own folders, which no job may read or write even where they lie inside
        a root: its secrets, Redis's files (the embedded one's AOF), the log's archives."""
        folders = (self.data_dir / "secrets", self.data_dir / "redis", self.archive_dir)
        return tuple(folder.expanduser().resolve() for folder in folders)

    @property
    def deploy_ports(self) -> range:
        return _port_range(self.deploy_port_range)

    @property
    def rendezvous_ports(self) -> range:
        return _port_range(self.rendezvous_port_range)

    @property
    def archive_dir(self) -> Path:
        return self.archive_dir_ or self.data_dir / "archive"

    @property
    def retention(self) -> bool:
        return self.audit_max_age_s is not None or self.audit_max_entries is not None

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"


def masked_url(url: str) -> str:
    """A Redis URL with its passwords (and a Sentinel's) masked."""
    parts = urlsplit(url)
    if "sentinel_password=" in parts.query:
        parts = parts._replace(query=re.sub(r"(sentinel_password=)[^&]*", r"\1***", parts.query))
    if parts.password is None:
        return parts.geturl()
    netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def _port_range(text: str) -> range:
    low, high = (int(part) for part in text.split("-"))
    return range(low, high + 1)


def _redis_url(host: str, port: int, db: int, password: str) -> str:
    # Quoted: a password may hold characters that mean something in a URL ('@', '/', ':', '%').
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the process environment, over ``env/.env.<ENVIRONMENT>`` when present."""
    environment = os.environ.get("ENVIRONMENT", "development")
    env_file = Path("env") / f".env.{environment}"
    try:
        return Settings(_env_file=env_file if env_file.is_file() else None, **overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from exc


def _shown(name: str, value: object) -> str:
    """A setting's value as printed: a secret (any SecretStr setting) only as set or unset, a
    URL's password masked."""
    if isinstance(value, SecretStr):
        return "set (hidden)" if value.get_secret_value() else "unset"
    if value is None or value == "":
        return "unset"
    if name == "redis_url":
        return masked_url(str(value))
    return str(value)


def effective(settings: Settings) -> list[tuple[str, str, str]]:
    """Every setting as a process started here would read it: its name, its value (secrets
    hidden, a URL's password masked), and where the value came from (the environment, the
    ``env/.env.<ENVIRONMENT>`` file, or the default)."""
    given = {name.upper() for name in os.environ}
    env_file = Path("env") / f".env.{settings.environment}"
    in_file = {name.upper() for name in dotenv_values(env_file)} if env_file.is_file() else set()
    rows = []
    for field, info in Settings.model_fields.items():
        name = (info.alias or field).upper()
        source = "environment" if name in given else str(env_file) if name in in_file else "default"
        rows.append((name, _shown(field, getattr(settings, field)), source))
    redis = (
        f"embedded, 127.0.0.1:{settings.embedded_redis_port} (password in DATA_DIR/secrets unless REDIS_PASSWORD)"
        if settings.embedded
        else settings.redis_url_for_logs
    )
    rows += [
        ("(redis)", redis, "REDIS_*"),
        ("(local paths under)", ":".join(str(root) for root in settings.roots), "PATH_ROOTS"),
        ("(archives in)", str(settings.archive_dir), "ARCHIVE_DIR"),
    ]
    return rows
