"""The exact argument list and environment of a job's `swift` process, built from its spec.

Always an argument list, never a shell string: a value can never become another flag.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

from events.params import DeployJob, JobSpec, ModelHub, MultiModalJob, TrainParams

TAG_VARIABLE = "SWIFT_TRAINER_JOB"


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]  # set on top of the runner's own environment
    run_dir: Path  # the runner's files for this attempt: stdout.log, stderr.log
    output_dir: Path  # where swift writes (a vN-* run directory inside it, for training)
    port: int | None = None
    time_limit_s: int | None = None


def _text(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _flag(name: str, value: object) -> list[str]:
    return [] if value is None else [f"--{name}", _text(value)]


def extra_flags(extra: dict[str, object]) -> list[str]:
    """User flags as ``--flag=value``: one token each, so a value is never read as a flag."""
    return [f"--{name}={_text(value)}" for name, value in sorted(extra.items())]


def flags_in(argv: list[str]) -> set[str]:
    """The flag names an argument list sets."""
    return {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}


def train_args(params: TrainParams) -> list[str]:
    """ms-swift 4 flags for the shared training parameters."""
    args = [
        *_flag("tuner_type", params.train_type.value),  # `--train_type` no longer exists in 4.x
        *_flag("num_train_epochs", params.num_epochs),
        *_flag("per_device_train_batch_size", params.batch_size),
        *_flag("per_device_eval_batch_size", params.batch_size),
        *_flag("learning_rate", params.learning_rate),
        *_flag("gradient_accumulation_steps", params.gradient_accumulation_steps),
        *_flag("logging_steps", params.logging_steps),
        *_flag("eval_steps", params.eval_steps),
        *_flag("save_steps", params.save_steps),
        *_flag("save_total_limit", params.save_total_limit),
        *_flag("max_length", params.max_length),
        *_flag("warmup_ratio", params.warmup_ratio),
        *_flag("dataloader_num_workers", params.dataloader_num_workers),
        *_flag("dataset_num_proc", params.dataset_num_proc),
        *_flag("save_only_model", params.save_only_model),
        *_flag("torch_dtype", params.torch_dtype),
        *_flag("max_steps", params.max_steps),
        *_flag("model_type", params.model_type),
        *_flag("template", params.template),
        *_flag("deepspeed", params.deepspeed),
        *_flag("attn_impl", params.attn_impl),
    ]
    if params.train_type.value == "lora":
        args += [*_flag("lora_rank", params.lora_rank), *_flag("lora_alpha", params.lora_alpha)]
    return args


def build_launch(
    spec: JobSpec,
    *,
    swift: str,
    job_id: str,
    attempt: int,
    gpu_ids: list[int],
    runs_dir: Path,
    omp_num_threads: int,
    port: int | None = None,
    resume_from: str | None = None,
    rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    cpu_only: bool = False,
) -> Launch:
    job_dir = runs_dir.resolve() / job_id
    run_dir = job_dir / (f"attempt-{attempt}" + (f"-rank{rank}" if rank else ""))
    env = {
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_ids),
        # CUDA numbers GPUs fastest first unless told otherwise; NVML (and so the scheduler)
        # numbers them by PCI bus id.
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "OMP_NUM_THREADS": str(omp_num_threads),
        "PYTHONUNBUFFERED": "1",
        TAG_VARIABLE: job_tag(job_id, attempt, rank),  # tags every process of the attempt
        **hub_env(spec.hub),
    }
    if isinstance(spec, DeployJob):
        deploy_params = spec.deploy_params
        output_dir = Path(spec.output_dir).resolve() if spec.output_dir else job_dir / "deploy"
        argv = [
            swift,
            "deploy",
            "--model",
            spec.model_path,
            *_flag("infer_backend", deploy_params.infer_backend),
            "--host",
            "127.0.0.1",
            *_flag("port", port),
            *_flag("served_model_name", deploy_params.served_model_name),
            *_flag("model_type", deploy_params.model_type),
            *_flag("template", deploy_params.template),
        ]
        if deploy_params.infer_backend == "vllm":
            argv += [
                *_flag("vllm_max_model_len", deploy_params.max_model_len),
                *_flag("vllm_gpu_memory_utilization", deploy_params.gpu_memory_utilization),
                *_flag("vllm_tensor_parallel_size", deploy_params.tensor_parallel_size),
            ]
        else:
            argv += _flag("max_model_len", deploy_params.max_model_len)
        argv += extra_flags(dict(deploy_params.extra_args))
        return Launch(argv, env, run_dir, output_dir, port, spec.time_limit_s)

    params = spec.train_params
    output_dir = Path(spec.output_dir).resolve() if spec.output_dir else job_dir / "output"
    env.update(torchrun_env(spec.nodes, rank, len(gpu_ids), master_addr, master_port))
    argv = [
        swift,
        "sft",
        "--model",
        spec.model_path,
        "--dataset",
        spec.data_path,
        "--output_dir",
        str(output_dir),
        *train_args(params),
        *_flag("check_model", False),  # no hub round trips for a local model
        *_flag("enable_jit_checkpoint", True),  # SIGTERM saves a checkpoint before exiting
        *_flag("report_to", "none"),
        *_flag("resume_from_checkpoint", resume_from),  # an earlier attempt's, when retried
    ]
    if cpu_only and (spec.nodes > 1 or len(gpu_ids) > 1) and "ddp_backend" not in params.extra_args:
        # Without CUDA the trainer's ranks do not form a process group of their own (each takes
        # itself for rank 0: every rank trains alone, and all of them write its checkpoints), unless
        # told to use gloo. With CUDA they use NCCL unasked.
        argv += _flag("ddp_backend", "gloo")
    if isinstance(spec, MultiModalJob):
        mm = spec.train_params
        argv += [
            *_flag("vit_lr", mm.vit_lr),
            *_flag("aligner_lr", mm.aligner_lr),
            *_flag("freeze_vit", mm.freeze_vit),
            *_flag("freeze_aligner", mm.freeze_aligner),
            *_flag("freeze_llm", mm.freeze_llm),
            *_flag("max_pixels", mm.max_pixels),
        ]
    argv += extra_flags(dict(params.extra_args))
    return Launch(argv, env, run_dir, output_dir, time_limit_s=spec.time_limit_s)


def hub_env(hub: ModelHub | None) -> dict[str, str]:
    """ms-swift's choice of hub, as its `USE_HF` variable: set either way, so that a `USE_HF` in
    the runner's own environment does not choose for the job. None (a job from before hubs were
    chosen): left to that environment."""
    return {} if hub is None else {"USE_HF": "1" if hub is ModelHub.huggingface else "0"}


def job_tag(job_id: str, attempt: int, rank: int = 0) -> str:
    """Set in the environment of every process of an attempt (of one rank of a gang job, whose
    other ranks may run on the same host), to find them again."""
    return f"{job_id}:{attempt}" + (f":{rank}" if rank else "")


def torchrun_env(
    nodes: int, rank: int, processes: int, master_addr: str | None, master_port: int | None
) -> dict[str, str]:
    """What makes `swift` launch its trainer through torchrun, as ms-swift reads it: one process
    per GPU, and for a gang job its node's rank and rank 0's rendezvous address. None for one
    process on one node."""
    if nodes == 1 and processes == 1:
        return {}
    env = {"NPROC_PER_NODE": str(processes)}
    if master_port is not None:
        env["MASTER_PORT"] = str(master_port)  # torchrun's default, 29500, is one per host
    if nodes > 1:
        env.update(NNODES=str(nodes), NODE_RANK=str(rank), MASTER_ADDR=master_addr or "127.0.0.1")
    return env


def socket_env(node_addr: str | None, environ: dict[str, str]) -> dict[str, str]:
    """For a gang job's rank: the network interface that holds the node's NODE_ADDR, for gloo
    and NCCL to talk to the other ranks through (unless set already). Left to themselves they
    take the interface of the host's name, which often resolves to loopback."""
    if not node_addr or {"GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"} & set(environ):
        return {}
    try:
        address = socket.gethostbyname(node_addr)
    except OSError:
        return {}
    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.family == socket.AF_INET and entry.address == address for entry in addresses):
            return {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name}
    return {}


# The service's own secrets: a job runs what its user chose (a dataset's loader, a model's code),
# so it inherits none of them.
SECRET_VARIABLES = frozenset(
    {"REDIS_URL", "REDIS_PASSWORD", "REDISCLI_AUTH", "AUTH_SECRET", "API_KEYS", "SWIFT_TRAINER_API_KEY"}
)


def job_environ(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a process run for a job: the service's own, less its secrets, plus
    ``extra``."""
    inherited = {name: value for name, value in os.environ.items() if name.upper() not in SECRET_VARIABLES}
    return {**inherited, **extra}


def merged_env(launch: Launch) -> dict[str, str]:
    return job_environ(launch.env)
