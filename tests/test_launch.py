"""The command builder: the exact argument list and environment per task type, and every flag it
writes is one the installed ms-swift accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from events.params import DeployJob, LanguageModelJob, MultiModalJob
from services.launch import Launch, build_launch, flags_in
from services.swift import accepted_flags

RUNS = Path("/runs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, frozenset[str]]:
    flags = accepted_flags(tmp_path_factory.mktemp("flags"))
    assert flags is not None, "ms-swift is not installed"
    return flags


def launch(spec: object, gpus: list[int], port: int | None = None, cpu_only: bool = False) -> Launch:
    return build_launch(
        spec,  # type: ignore[arg-type]
        swift="swift",
        job_id="j1",
        attempt=2,
        gpu_ids=gpus,
        runs_dir=RUNS,
        omp_num_threads=3,
        port=port,
        cpu_only=cpu_only,
    )


def pairs(argv: list[str]) -> dict[str, str]:
    return {argv[i][2:]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--") and "=" not in argv[i]}


def test_a_language_model_lora_job() -> None:
    spec = LanguageModelJob(
        task_type="language_model",
        model_path="Qwen/Qwen2.5-7B-Instruct",
        data_path="AI-ModelScope/alpaca-gpt4-data-en#500",
        train_params={"num_epochs": 3, "batch_size": 4, "learning_rate": 2e-4, "lora_rank": 16, "max_steps": 100},
    )
    result = launch(spec, [3])
    assert result.argv[:2] == ["swift", "sft"]
    flags = pairs(result.argv)
    assert flags["model"] == "Qwen/Qwen2.5-7B-Instruct" and flags["dataset"] == "AI-ModelScope/alpaca-gpt4-data-en#500"
    assert flags["tuner_type"] == "lora" and flags["lora_rank"] == "16" and flags["num_train_epochs"] == "3.0"
    assert flags["output_dir"] == "/runs/j1/output" and flags["enable_jit_checkpoint"] == "true"
    assert result.env["CUDA_VISIBLE_DEVICES"] == "3" and "NPROC_PER_NODE" not in result.env
    assert result.env["OMP_NUM_THREADS"] == "3" and result.env["SWIFT_TRAINER_JOB"] == "j1:2"
    assert result.run_dir == RUNS / "j1" / "attempt-2"


def test_a_multimodal_full_job_with_deepspeed_on_four_gpus() -> None:
    spec = MultiModalJob(
        task_type="multimodal",
        model_path="Qwen/Qwen2.5-VL-7B-Instruct",
        data_path="AI-ModelScope/coco#20000",
        gpu_count=4,
        train_params={
            "train_type": "full",
            "deepspeed": "zero3",
            "attn_impl": "flash_attn",
            "vit_lr": 1e-5,
            "aligner_lr": 1e-5,
            "freeze_vit": False,
            "max_pixels": 1003520,
            "torch_dtype": "bfloat16",
        },
    )
    result = launch(spec, [0, 1, 2, 3])
    flags = pairs(result.argv)
    assert flags["tuner_type"] == "full" and "lora_rank" not in flags
    assert (flags["deepspeed"], flags["attn_impl"], flags["torch_dtype"]) == ("zero3", "flash_attn", "bfloat16")
    assert (flags["vit_lr"], flags["freeze_vit"], flags["freeze_aligner"], flags["max_pixels"]) == (
        "1e-05",
        "false",
        "true",
        "1003520",
    )
    assert result.env["NPROC_PER_NODE"] == "4" and result.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_the_ranks_of_a_job_on_simulated_gpus_form_a_gloo_process_group_unless_told_otherwise() -> None:
    # Without CUDA each rank would take itself for rank 0: all train alone and write the same
    # checkpoints (and race on the link to the last one)
    def job(gpu_count: int, nodes: int = 1, **extra: object) -> LanguageModelJob:
        params = {"extra_args": extra}
        return LanguageModelJob(
            task_type="language_model",
            model_path="/m",
            data_path="/d",
            gpu_count=gpu_count,
            nodes=nodes,
            train_params=params,
        )

    assert pairs(launch(job(2), [0, 1], cpu_only=True).argv)["ddp_backend"] == "gloo"
    assert pairs(launch(job(1, nodes=2), [0], cpu_only=True).argv)["ddp_backend"] == "gloo"
    assert "ddp_backend" not in flags_in(launch(job(1), [0], cpu_only=True).argv)  # one process: no group
    assert "ddp_backend" not in flags_in(launch(job(2), [0, 1]).argv)  # CUDA: NCCL, unasked
    told = launch(job(2, ddp_backend="mpi"), [0, 1], cpu_only=True).argv
    assert [arg for arg in told if "ddp_backend" in arg] == ["--ddp_backend=mpi"]


def test_a_vllm_deploy_job() -> None:
    spec = DeployJob(
        task_type="deploy",
        model_path="/models/merged",
        gpu_count=2,
        deploy_params={
            "infer_backend": "vllm",
            "served_model_name": "assistant",
            "max_model_len": 8192,
            "gpu_memory_utilization": 0.9,
            "tensor_parallel_size": 2,
        },
    )
    result = launch(spec, [4, 5], port=20001)
    assert result.argv[:2] == ["swift", "deploy"]
    flags = pairs(result.argv)
    assert (flags["model"], flags["infer_backend"], flags["host"], flags["port"]) == (
        "/models/merged",
        "vllm",
        "127.0.0.1",
        "20001",
    )
    assert (flags["vllm_max_model_len"], flags["vllm_gpu_memory_utilization"], flags["vllm_tensor_parallel_size"]) == (
        "8192",
        "0.9",
        "2",
    )
    assert "NPROC_PER_NODE" not in result.env and result.env["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert result.port == 20001


def test_extra_flags_are_single_tokens_after_the_typed_ones() -> None:
    spec = LanguageModelJob(
        task_type="language_model",
        model_path="/m",
        data_path="/d",
        train_params={"extra_args": {"seed": 3, "lora_dropout": "0.05", "use_liger_kernel": True}},
    )
    argv = launch(spec, [0]).argv
    assert argv[-3:] == ["--lora_dropout=0.05", "--seed=3", "--use_liger_kernel=true"]


def test_every_flag_the_builder_writes_is_accepted_by_the_installed_ms_swift(
    installed: dict[str, frozenset[str]],
) -> None:
    specs = [
        LanguageModelJob(
            task_type="language_model",
            model_path="/m",
            data_path="/d",
            train_params={
                "eval_steps": 5,
                "save_steps": 5,
                "max_steps": 9,
                "torch_dtype": "float32",
                "model_type": "qwen2",
                "template": "qwen2_5",
                "deepspeed": "zero2",
                "attn_impl": "sdpa",
            },
        ),
        MultiModalJob(
            task_type="multimodal",
            model_path="/m",
            data_path="/d",
            train_params={"vit_lr": 1e-5, "aligner_lr": 1e-5, "max_pixels": 100},
        ),
        DeployJob(
            task_type="deploy",
            model_path="/m",
            deploy_params={
                "infer_backend": "vllm",
                "max_model_len": 1024,
                "gpu_memory_utilization": 0.5,
                "tensor_parallel_size": 1,
                "served_model_name": "x",
            },
        ),
        DeployJob(
            task_type="deploy",
            model_path="/m",
            deploy_params={"max_model_len": 1024, "model_type": "qwen2", "template": "qwen2_5"},
        ),
    ]
    for spec in specs:
        result = launch(spec, [0], port=9000)
        command = result.argv[1]
        assert flags_in(result.argv) <= installed[command], flags_in(result.argv) - installed[command]


def test_a_gang_rank_talks_through_the_interface_of_its_node_address_unless_told_otherwise() -> None:
    from services.launch import socket_env

    assert socket_env("127.0.0.1", {}) == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert socket_env("127.0.0.1", {"NCCL_SOCKET_IFNAME": "ib0"}) == {}  # the operator's choice stands
    assert socket_env("192.0.2.77", {}) == {} and socket_env(None, {}) == {}  # an address of no interface here
