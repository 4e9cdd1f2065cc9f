"""Vision-language fine-tuning end to end, through REST and the real `swift` CLI: a tiny LLaVA built
offline trains with LoRA on images (its vision tower and aligner too), is merged, and a deploy of
the merged model answers a chat completion about an image."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.demo.tinyvl import QUESTION, VisionAssets
from tests.conftest import RedisServer
from tests.system import System, finish, running, steps

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running(redis_server.url, tmp_path_factory.mktemp("system"), clean_exits=True) as system:
        yield system


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(f"--{name}") + 1]


def test_a_multimodal_lora_job_trains_on_images_exports_and_its_deploy_reads_an_image(
    system: System, vision_assets: VisionAssets
) -> None:
    # Given a LoRA job on the tiny vision-language model, vision tower and aligner unfrozen
    body = vision_assets.job_request(max_steps=8, save_steps=8, logging_steps=1)
    # When it is submitted, it reports its progress live and its merged model is exported
    job_id, events = finish(system, body, until="export.completed")
    assert steps(events) == list(range(1, 9))
    progress = [json.loads(e.data)["payload"] for e in events if e.event == "job.progress"]
    assert all(p["loss"] is not None and p["max_steps"] == 8 for p in progress)

    # And its command carries the multimodal flags as given
    argv = httpx.get(f"{system.base}/jobs/{job_id}/command").json()["argv"]
    assert (flag(argv, "vit_lr"), flag(argv, "aligner_lr")) == ("0.002", "0.003")
    assert (flag(argv, "freeze_vit"), flag(argv, "freeze_aligner"), flag(argv, "model_type")) == (
        "false",
        "false",
        "llava1_5_hf",
    )
    # And ms-swift honoured them: the LoRA adapter holds vision-tower and aligner weights
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    from safetensors import safe_open

    with safe_open(Path(job["last_checkpoint"]) / "adapter_model.safetensors", "pt") as adapter:
        names = list(adapter.keys())
    assert any(".vision_tower." in name for name in names)
    assert any(".multi_modal_projector." in name for name in names)
    logs = httpx.get(f"{system.base}/jobs/{job_id}/logs", params={"tail": 2000}).json()["lines"]
    assert any("vit_lr: 0.002, aligner_lr: 0.003" in line["line"] for line in logs)
    merged = Path(job["export"]["path"])
    assert (merged / "processor_config.json").is_file() and any(merged.glob("*.safetensors"))

    # When the merged model is deployed
    deploy = {"task_type": "deploy", "source_job_id": job_id, "deploy_params": {"served_model_name": "tiny-vl"}}
    deploy_id, served = finish(system, deploy, until="job.serving")
    endpoint = json.loads(served[-1].data)["payload"]["endpoint"]
    try:
        # Then it answers a chat completion about an image, which it reads: the image's 16
        # patches are in the prompt
        picture = base64.b64encode(vision_assets.image("red").read_bytes()).decode()
        text = {"type": "text", "text": QUESTION}
        image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{picture}"}}

        def ask(content: list[dict[str, object]]) -> dict[str, object]:
            chat = {"model": "tiny-vl", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
            answer = httpx.post(f"{endpoint}/chat/completions", json=chat, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()["usage"]  # type: ignore[no-any-return]

        with_image, without = ask([image, text]), ask([text])
        assert with_image["prompt_tokens"] - without["prompt_tokens"] >= 16
        assert with_image["completion_tokens"] >= 1
    finally:
        assert httpx.post(f"{system.base}/jobs/{deploy_id}/cancel").status_code == 202
