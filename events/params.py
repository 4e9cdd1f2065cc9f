"""What a user asks for: the job spec and the typed parameters of each task type."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TaskType(StrEnum):
    multimodal = "multimodal"  # vision-language fine-tuning (swift sft on a VL model)
    language_model = "language_model"  # text-only fine-tuning (swift sft)
    deploy = "deploy"  # an OpenAI-compatible server (swift deploy)


class ModelHub(StrEnum):
    """Where a hub id (`org/name`) is downloaded from: ms-swift's `--use_hf` / `USE_HF`."""

    modelscope = "modelscope"  # modelscope.cn, ms-swift's default
    huggingface = "huggingface"  # huggingface.co (or HF_ENDPOINT)


class Dependency(StrEnum):
    """When a job that depends on others may start (SLURM's meanings)."""

    afterok = "afterok"  # once each has completed
    afterany = "afterany"  # once each has ended, however
    afternotok = "afternotok"  # once each has failed or been cancelled


NotifyEvent = Literal["job.succeeded", "job.failed", "job.cancelled", "export.completed", "job.serving"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = (
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "export.completed",
    "job.serving",
)


class Notify(BaseModel):
    """A webhook of a job's own: POSTed to on the events named, signed like every delivery."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    url: str = Field(min_length=8, max_length=2048, description="http(s) URL the notifications are POSTed to")
    events: list[NotifyEvent] = Field(
        default_factory=lambda: list(NOTIFY_EVENTS), min_length=1, description="which of the job's events are sent"
    )
    format: Literal["json", "slack"] = Field("json", description='json: the event; slack: {"text": …}')


class TrainType(StrEnum):
    lora = "lora"  # adapters only; exported by merging into the base model
    full = "full"  # every weight trained; the checkpoint is the model


class _Strict(BaseModel):
    # Strict: a request's "5" or true is not taken for a number (JSON's own types only: an int
    # still stands for a float). Enums stay lax, as the log's entries are decoded from JSON text.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


DeepSpeedConfig = Literal["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]
TorchDtype = Literal["bfloat16", "float16", "float32"]

# An ms-swift model type, template or attention implementation name: a plain identifier.
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _identifier(value: str | None) -> str | None:
    if value is not None and not _IDENTIFIER.match(value):
        raise ValueError("must be a plain name (letters, digits, '_', '.', '-')")
    return value


_FLAG = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
ExtraValue = str | int | float | bool


def _extra_args(value: dict[str, ExtraValue]) -> dict[str, ExtraValue]:
    """Further ms-swift flags as ``{"flag": value}``. They are passed as ``--flag=value``, so a
    value can never become a flag of its own; the flag names are checked against the installed
    ms-swift where the gateway can see it."""
    for flag, item in value.items():
        if not _FLAG.match(flag):
            raise ValueError(f"{flag!r} is not an ms-swift flag name (lowercase letters, digits, '_')")
        if isinstance(item, str) and (len(item) > 4096 or any(c in item for c in "\x00\n\r")):
            raise ValueError(f"the value of {flag!r} must be one line of at most 4096 characters")
    return value


class TrainParams(_Strict):
    """Hyper-parameters shared by every training task type; names follow the original tool."""

    num_epochs: float = Field(1.0, gt=0, le=1000)
    batch_size: int = Field(1, ge=1, le=4096)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)
    logging_steps: int = Field(5, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    max_length: int = Field(2048, ge=16, le=1_048_576)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    dataloader_num_workers: int = Field(0, ge=0, le=64)
    dataset_num_proc: int = Field(1, ge=1, le=256)
    save_only_model: bool = False
    train_type: TrainType = Field(TrainType.lora, strict=False)  # from its JSON value, "lora"
    lora_rank: int = Field(8, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1, le=4096)
    torch_dtype: TorchDtype | None = None
    max_steps: int | None = Field(None, ge=1)
    model_type: str | None = None
    template: str | None = None
    deepspeed: DeepSpeedConfig | None = None
    attn_impl: Literal["flash_attn", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] | None = None
    extra_args: dict[str, ExtraValue] = Field(default_factory=dict, max_length=64)

    _check_names = field_validator("model_type", "template")(_identifier)
    _check_extra = field_validator("extra_args")(_extra_args)


class LanguageModelTrainParams(TrainParams):
    pass


class MultiModalTrainParams(TrainParams):
    vit_lr: float | None = Field(None, gt=0, le=1)
    aligner_lr: float | None = Field(None, gt=0, le=1)
    freeze_vit: bool = True
    freeze_aligner: bool = True
    freeze_llm: bool = False
    max_pixels: int | None = Field(None, ge=1)


class DeployParams(_Strict):
    infer_backend: Literal["vllm", "transformers"] = "transformers"
    served_model_name: str | None = None
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    tensor_parallel_size: int | None = Field(None, ge=1)
    port: int | None = Field(None, ge=1024, le=65535)
    model_type: str | None = None
    template: str | None = None

    extra_args: dict[str, ExtraValue] = Field(default_factory=dict, max_length=64)

    _check_names = field_validator("served_model_name", "model_type", "template")(_identifier)
    _check_extra = field_validator("extra_args")(_extra_args)


class JobBase(_Strict):
    model_path: str = Field(min_length=1, max_length=4096)
    output_dir: str | None = Field(None, max_length=4096)
    priority: int = Field(5, ge=0, le=10, description="0-10, higher starts first")
    gpu_count: int = Field(1, ge=1, le=64)
    name: str | None = Field(None, max_length=200)
    time_limit_s: int | None = Field(None, ge=1, description="stop the job (reason timeout) after this long")
    idle_timeout_s: int | None = Field(
        None,
        ge=1,
        description="stop the job (reason idle) once its GPUs have all stayed under IDLE_GPU_UTIL_PCT this long;"
        " a deploy: once it has served no request this long (default IDLE_TIMEOUT_S, off unless set)",
    )
    min_gpu_memory_mb: int | None = Field(None, ge=1, description="free memory each GPU must have")
    gpu_model: str | None = Field(None, min_length=1, max_length=100, description="a part of the GPU name, e.g. H100")
    node: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", max_length=200, description="run on this node only")
    gpu_ids: list[int] | None = Field(None, min_length=1, max_length=64, description="these GPUs of `node`")
    nodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="a gang job: this many nodes with gpu_count GPUs each, started together under torchrun",
    )
    max_retries: int = Field(
        0,
        ge=0,
        le=10,
        description="runs again after its node is lost (or a rank of a gang fails), from its last checkpoint",
    )
    hold: bool = Field(False, description="accept, but queue only once released by POST /jobs/{id}/start")
    depends_on: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]] = Field(
        default_factory=list,
        max_length=64,
        description="job ids this job waits for (status waiting) before it queues; see dependency",
    )
    dependency: Dependency = Field(
        Dependency.afterok,
        strict=False,
        description="afterok: start once they all completed; afterany: once they all ended;"
        " afternotok: once they all failed or were cancelled",
    )
    notify: Notify | None = Field(None, description="a webhook of the job's own (see also WEBHOOK_URLS)")
    hub: ModelHub | None = Field(
        None,
        strict=False,
        description="where hub ids in model_path and data_path come from: modelscope or huggingface;"
        " default the MODEL_HUB setting",
    )
    preemptible: bool = Field(
        True,
        description="with preemption on, may be stopped (checkpointed) for a more urgent job and resumed later;"
        " default true for training, false for deploy",
    )

    @field_validator("depends_on")
    @classmethod
    def _distinct(cls, ids: list[str]) -> list[str]:
        if len(set(ids)) != len(ids):
            raise ValueError("names a job twice")
        return ids

    @model_validator(mode="after")
    def _placement(self) -> JobBase:
        if self.gpu_ids is not None:
            if self.node is None:
                raise ValueError("gpu_ids needs node: GPU ids are per node")
            if len(set(self.gpu_ids)) != len(self.gpu_ids) or min(self.gpu_ids) < 0:
                raise ValueError("gpu_ids must be distinct indices")
            if len(self.gpu_ids) != self.gpu_count:
                raise ValueError(f"gpu_count is {self.gpu_count} but {len(self.gpu_ids)} gpu_ids are given")
        if self.nodes > 1 and self.node is not None:
            raise ValueError("nodes and node exclude each other: a gang job is placed on any nodes that fit")
        return self

    @property
    def total_gpus(self) -> int:
        """The GPUs the job holds while it runs: ``gpu_count`` on each of its nodes."""
        return self.gpu_count * self.nodes


class LanguageModelJob(JobBase):
    task_type: Literal[TaskType.language_model]
    data_path: str = Field(min_length=1, max_length=4096)
    train_params: LanguageModelTrainParams = LanguageModelTrainParams()
    auto_export: bool = Field(True, description="merge LoRA adapters when training completes")


class MultiModalJob(JobBase):
    task_type: Literal[TaskType.multimodal]
    data_path: str = Field(min_length=1, max_length=4096)
    train_params: MultiModalTrainParams = MultiModalTrainParams()
    auto_export: bool = True


class DeployJob(JobBase):
    task_type: Literal[TaskType.deploy]
    model_path: str = Field("", max_length=4096, description="the model to serve, or give source_job_id")
    source_job_id: str | None = Field(
        None, max_length=64, description="serve the exported (merged) model of this completed job"
    )
    deploy_params: DeployParams = DeployParams()
    preemptible: bool = Field(False, description="with preemption on, may be stopped for a more urgent job")

    @model_validator(mode="after")
    def _one_model(self) -> DeployJob:
        if not self.model_path and not self.source_job_id:
            raise ValueError("give model_path or source_job_id")
        if self.nodes != 1:
            raise ValueError("a deploy job runs on one node: nodes must be 1")
        return self


JobSpec = Annotated[LanguageModelJob | MultiModalJob | DeployJob, Field(discriminator="task_type")]
TrainingJob = LanguageModelJob | MultiModalJob
