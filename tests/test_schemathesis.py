"""Generated requests, good and bad, against every operation of the OpenAPI document of a real
gateway: no 5xx, every status documented, every body matching its schema."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import RedisServer
from tests.system import System, running

pytestmark = pytest.mark.e2e

KEY = "schemathesis-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    # No GPUs: any submitted job can never fit, so generated jobs are refused, not run
    data = tmp_path_factory.mktemp("schemathesis")
    with running(redis_server.url, data, SIMULATED_GPUS="0", API_KEYS=f"root:admin:{KEY}") as system:
        # The first job with extra flags has the gateway read ms-swift's flags, which takes seconds:
        # done here, it does not run into a generated request's timeout.
        job = {"model_path": "m", "data_path": "d", "train_params": {"extra_args": {"lora_dropout": 0.1}}}
        httpx.post(f"{system.base}/jobs", json=job, headers=AUTH, timeout=120)
        yield system


def test_every_operation_answers_within_its_schema(system: System) -> None:
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{system.port}/openapi.json")
    schema = schema.exclude(path_regex=r".*/stream$")  # endless by design
    # The key is sent with every call, and unknown query parameters are ignored, as servers do: a
    # request made "negative" only by leaving the key out or adding a parameter is not negative.
    schema.config.generation.update(with_security_parameters=False, allow_extra_parameters=False)
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 29  # all but the three streams
    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            # Schema-valid jobs are still refused when their paths do not exist or nothing fits
            case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Unsatisfiable:  # no input to make invalid (an operation without parameters)
            assert mode == GenerationMode.NEGATIVE
        except (Exception, BaseExceptionGroup) as exc:  # every operation's failures are shown
            failures[f"{operation.label} ({mode.value} data)"] = describe(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{why}" for label, why in failures.items())


def describe(exc: BaseException) -> str:
    """An error with those it groups (hypothesis reports a flaky failure as a group)."""
    inner = exc.exceptions if isinstance(exc, BaseExceptionGroup) else ()
    return "\n".join([str(exc), *(describe(sub) for sub in inner)])
