"""Extra ms-swift flags by their reviewed kind, through the gateway as users send them: flags that
load code are refused (an admin's pass only where ALLOW_CODE_FLAGS is on), path-valued flags are
held to the roots like model_path, the service's own flags are refused; and every flag the
installed ms-swift accepts has been classified."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from events.bus import Bus
from services.config import load_settings
from services.gateway.app import create_app
from services.gateway.projection import Projection
from services.gateway.submit import SwiftFlags
from services.swift import SwiftField, accepted_flags, swift_fields
from services.swift_flags import PLAIN_DESPITE_LOOKS, Kind, kind_of, looks_risky

ALICE, ROOT = "alice-key-0123456789", "root-key-0123456789ab"
KEYS = f"alice:user:{ALICE},root:admin:{ROOT}"
USER, ADMIN = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {ROOT}"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("swift-args")  # importing ms-swift is slow: once per module


@pytest.fixture(scope="module")
def fields(cache: Path) -> dict[str, SwiftField]:
    found = swift_fields(cache)
    assert found is not None, "ms-swift is not installed"
    return found


def test_every_flag_the_installed_ms_swift_accepts_has_been_classified(cache: Path) -> None:
    flags = accepted_flags(cache)
    assert flags is not None, "ms-swift is not installed"
    accepted = set().union(*flags.values())
    unclassified = sorted(flag for flag in accepted if kind_of(flag) is None)
    assert not unclassified, f"read what these do in ms-swift and list them in services/swift_flags.py: {unclassified}"


def test_no_flag_that_looks_like_a_path_or_code_is_filed_as_plain_unexplained(fields: dict[str, SwiftField]) -> None:
    suspicious = {
        name: why
        for name, field in fields.items()
        if kind_of(name) is Kind.plain
        and name not in PLAIN_DESPITE_LOOKS
        and (why := looks_risky(name, field.type, field.help))
    }
    assert not suspicious, f"classify these again, or say in PLAIN_DESPITE_LOOKS why they are plain: {suspicious}"
    # and the flags known to load code are among those the declarations give away
    assert looks_risky("external_plugins", fields["external_plugins"].type, fields["external_plugins"].help)
    assert looks_risky("custom_register_path", fields["custom_register_path"].type, "")


Gateway = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def gateway(bus: Bus, tmp_path: Path, cache: Path) -> Gateway:
    """The real gateway app with API keys, PATH_ROOTS the test's folder, DATA_DIR inside it."""

    @asynccontextmanager
    async def open_gateway(**settings: Any) -> AsyncIterator[httpx.AsyncClient]:
        config = load_settings(
            namespace=bus.keys.namespace,
            data_dir=tmp_path / "data",
            path_roots=str(tmp_path / "data"),
            api_keys=KEYS,
            **settings,
        )
        app = create_app(config, bus, Projection(bus, bus.redis), SwiftFlags(cache))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost/api/v1/training") as client:
            yield client

    return open_gateway


@pytest.fixture
def job(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    data = tmp_path / "data"
    (data / "model").mkdir(parents=True)
    (data / "train.jsonl").write_text("{}\n")
    (data / "escape").symlink_to("/etc", target_is_directory=True)  # a symlink out of the roots

    def make(**extra_args: Any) -> dict[str, Any]:
        return {
            "task_type": "language_model",
            "model_path": str(data / "model"),
            "data_path": str(data / "train.jsonl"),
            "train_params": {"extra_args": extra_args},
        }

    return make


def refused(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    return {d["field"]: d["message"] for d in response.json()["error"]["details"]}


@pytest.mark.parametrize(
    "flag",
    ["external_plugins", "custom_register_path", "model_kwargs", "deepspeed", "local_repo_path", "custom_dataset_info"],
)
async def test_a_flag_that_loads_code_is_refused_to_a_user_even_where_admins_may_pass_it(
    gateway: Gateway, job: Callable[..., dict[str, Any]], bus: Bus, tmp_path: Path, flag: str
) -> None:
    plugin = tmp_path / "data" / "plugin.py"
    plugin.write_text("open('/tmp/owned', 'w')\n")
    for allow in (False, True):
        async with gateway(allow_code_flags=allow) as api:
            response = await api.post("/jobs", json=job(**{flag: str(plugin)}), headers=USER)
        problems = refused(response)
        assert list(problems) == [f"train_params.extra_args.{flag}"]
        assert "only an admin may pass it, where ALLOW_CODE_FLAGS is on" in problems[f"train_params.extra_args.{flag}"]
    assert await bus.redis.xlen(bus.keys.commands) == 0


async def test_an_admin_passes_a_code_flag_only_where_allow_code_flags_is_on(
    gateway: Gateway, job: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    plugin = tmp_path / "data" / "plugin.py"
    plugin.write_text("")
    body = {**job(external_plugins=str(plugin)), "dry_run": True}
    async with gateway() as api:
        assert "train_params.extra_args.external_plugins" in refused(await api.post("/jobs", json=body, headers=ADMIN))
    async with gateway(allow_code_flags=True) as api:
        response = await api.post("/jobs", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert f"--external_plugins={plugin}" in response.json()["argv"]


async def test_with_access_control_off_everyone_is_admin_and_code_flags_stay_off_by_default(
    bus: Bus, tmp_path: Path, cache: Path, job: Callable[..., dict[str, Any]]
) -> None:
    config = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data", path_roots=str(tmp_path))
    app = create_app(config, bus, Projection(bus, bus.redis), SwiftFlags(cache))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost/api/v1/training"
    ) as api:
        response = await api.post("/jobs", json=job(external_plugins=str(tmp_path / "data" / "p.py")))
    assert "train_params.extra_args.external_plugins" in refused(response)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("val_dataset", "/etc/passwd"),
        ("val_dataset", "../../etc/passwd"),  # relative to DATA_DIR, then out
        ("val_dataset", "ms::/etc/passwd"),  # ms-swift drops a `hub::` prefix and opens the rest
        ("val_dataset", "train.jsonl:/etc/passwd"),  # and reads `path:subset`
        ("cached_dataset", "/etc"),
        ("cached_dataset", "escape#5"),  # no file is named so: ms-swift reads 5 rows of `escape`
        ("val_dataset", "escape#5"),
        ("resume_from_checkpoint", "/etc"),
        ("logging_dir", "/var/tmp/anywhere"),
        ("adapters", "/etc"),
        ("generation_config", "/etc/generation_config.json"),
        ("fsdp_config", "/etc/fsdp.json"),  # a JSON file, not inline JSON
        ("system", "/etc/motd.txt"),  # ms-swift reads a system prompt ending in .txt from that file
        ("new_special_tokens", "../../tokens.txt"),
    ],
)
async def test_a_path_valued_flag_is_held_to_the_roots_like_model_path(
    gateway: Gateway, job: Callable[..., dict[str, Any]], bus: Bus, flag: str, value: str
) -> None:
    async with gateway(allow_code_flags=True) as api:
        for who in (USER, ADMIN):
            problems = refused(await api.post("/jobs", json=job(**{flag: value}), headers=who))
            assert list(problems) == [f"train_params.extra_args.{flag}"], problems
    assert await bus.redis.xlen(bus.keys.commands) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"output_dir": "/tmp/x"}, "output_dir"),
        ({"report_to": "wandb"}, "report_to"),
        ({"add_version": False}, "add_version"),
        ({"use_ray": True}, "use_ray"),
        ({"no_such_flag": 1}, "no_such_flag"),
    ],
)
async def test_the_services_own_flags_and_unknown_ones_are_refused_even_to_an_admin(
    gateway: Gateway, job: Callable[..., dict[str, Any]], body: dict[str, Any], field: str
) -> None:
    async with gateway(allow_code_flags=True) as api:
        problems = refused(await api.post("/jobs", json=job(**body), headers=ADMIN))
    assert list(problems) == [f"train_params.extra_args.{field}"]


async def test_a_deploy_cannot_choose_its_own_address_nor_read_outside_the_roots(
    gateway: Gateway, tmp_path: Path
) -> None:
    (tmp_path / "data" / "merged").mkdir(parents=True)
    body = {
        "task_type": "deploy",
        "model_path": str(tmp_path / "data" / "merged"),
        "deploy_params": {
            "extra_args": {
                "host": "0.0.0.0",
                "ssl_keyfile": "/etc/ssl/private/key.pem",
                "adapters": f"mine={tmp_path / 'data' / 'x=/etc'}",  # deploy reads name=path: /etc
            }
        },
    }
    async with gateway() as api:
        problems = refused(await api.post("/jobs", json=body, headers=ADMIN))
    assert set(problems) == {
        "deploy_params.extra_args.host",
        "deploy_params.extra_args.ssl_keyfile",
        "deploy_params.extra_args.adapters",
    }
    assert problems["deploy_params.extra_args.host"].startswith("set by the service")


async def test_path_flags_inside_the_roots_are_passed_absolute_and_plain_ones_as_given(
    gateway: Gateway, job: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    (data / "val.jsonl").write_text("{}\n")
    body = job(
        val_dataset="val.jsonl#20",  # relative: under DATA_DIR
        logging_dir="./logs",
        device_map="auto",  # a name, not a file
        lr_scheduler_kwargs='{"min_lr": 1e-6}',  # inline JSON
        system="You answer in JSON/YAML.",  # text: it does not end in .txt
        lora_dropout=0.1,
    )
    async with gateway() as api:
        response = await api.post("/jobs", json={**body, "dry_run": True}, headers=USER)
    assert response.status_code == 200, response.text
    extra = [arg for arg in response.json()["argv"] if "=" in arg]
    assert extra == [
        "--device_map=auto",
        f"--logging_dir={data / 'logs'}",
        "--lora_dropout=0.1",
        '--lr_scheduler_kwargs={"min_lr": 1e-6}',
        "--system=You answer in JSON/YAML.",
        f"--val_dataset={data / 'val.jsonl'}#20",
    ]
