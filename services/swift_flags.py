"""What each ms-swift flag may do when a user passes it in ``extra_args``: the one reviewed list.

Every flag that `swift sft`, `swift deploy` and `swift export` accept is listed below under one
kind. A flag not listed is refused until someone reads what it does in ms-swift and lists it
(a test fails when the installed ms-swift has a flag nobody listed). The kinds:

- ``plain``: a number, a switch, a name from one of ms-swift's own registries, or text.
- ``path``: a local file or directory: it must lie inside the allowed roots, like ``output_dir``.
- ``source``: a model or dataset: a hub id (``org/name``), or a local path inside the roots,
  by the same rule as ``model_path`` and ``data_path``.
- ``json``: inline JSON or a bare name (``auto``), else a JSON file: a local path inside the roots.
- ``text``: text, or a file when it ends in ``.txt`` (ms-swift's rule): inside the roots.
- ``code``: imports Python files, or hands ms-swift something these checks cannot see into (a
  config naming further files, environment variables, the runner's credentials). Refused, except
  for an admin where ``ALLOW_CODE_FLAGS`` is on.
- ``reserved``: the service sets it (``--model``, ``--output_dir``, ``--port`` ...), or it would
  undo what the service relies on. Always refused.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Kind(StrEnum):
    plain = "plain"  # nothing outside the job
    path = "path"  # a local path: inside the roots
    source = "source"  # a hub id, or a local path inside the roots
    json = "json"  # inline JSON or a name, else a JSON file inside the roots
    text = "text"  # text, or a .txt file inside the roots
    code = "code"  # runs code or escapes these checks: admins only, behind ALLOW_CODE_FLAGS
    reserved = "reserved"  # the service's own: never from a user


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Kinds whose value may name a local file or directory.
PATH_KINDS = frozenset({Kind.path, Kind.source, Kind.json, Kind.text})

PATH = _names(
    """
    cached_dataset cached_val_dataset logging_dir mcore_adapter mcore_model result_path
    resume_from_checkpoint ssl_certfile ssl_keyfile
    """
)

# `swift deploy` also reads `name=path` in adapters: a local value with '=' is refused rather
# than half-checked (services.paths).
SOURCE = _names("adapters generation_config val_dataset")

JSON = _names(
    """
    accelerator_config columns device_map eval_generation_config fsdp fsdp_config
    gradient_checkpointing_kwargs liger_kernel_config lr_scheduler_kwargs max_memory mrl_dims
    rope_scaling vllm_limit_mm_per_prompt
    """
)

TEXT = _names("new_special_tokens system")

# Why each is refused; the message a user gets.
CODE = {
    "custom_dataset_info": "registers datasets from a JSON file whose entries name further files",
    "custom_register_path": "imports Python files",
    "deepspeed": "a DeepSpeed config, which can name files (offload paths); use train_params.deepspeed",
    "eval_dataset_args": "evalscope dataset settings, which can name local files",
    "external_plugins": "imports Python files",
    "extra_eval_args": "evalscope settings, which can name files, models and endpoints",
    "load_args": "reads args.json from the model or checkpoint, which can list plugins to import",
    "load_data_args": "reads dataset paths from a checkpoint's args.json",
    "local_repo_path": "puts a directory on the trainer's Python import path",
    "model_kwargs": "sets environment variables of the trainer",
    "push_to_hub": "uploads with the hub credentials of the runner's environment",
    "vllm_engine_kwargs": "arbitrary vLLM engine settings (model loaders, extension classes, paths)",
    "vllm_speculative_config": "loads a draft model, which may carry its own code",
}

RESERVED = {
    "add_version": "the runner finds the run's vN-* directory",
    "check_model": "set for every job",
    "dataset": "give data_path",
    "device_groups": "the scheduler places jobs on GPUs, not Ray",
    "enable_jit_checkpoint": "cancel and preemption rely on it",
    "host": "the runner serves a deploy on its own address",
    "local_rank": "set by the launcher",
    "model": "give model_path",
    "output_dir": "give output_dir",
    "parallelism_config": "not a command-line value",
    "port": "a deploy gets a port from DEPLOY_PORT_RANGE",
    "ray_exp_name": "the scheduler places jobs on GPUs, not Ray",
    "report_to": "set for every job",
    "use_hf": "give the job's hub (default MODEL_HUB)",
    "use_ray": "the scheduler places jobs on GPUs, not Ray",
}

PLAIN = _names(
    """
    acc_strategy adalora_beta1 adalora_beta2 adalora_deltaT adalora_init_r adalora_orth_reg_weight
    adalora_target_r adalora_tfinal adalora_tinit adam_beta1 adam_beta2 adam_epsilon adapter_act
    adapter_length add_non_thinking_prefix agent_template aligner_lr api_key attn_impl
    auto_find_batch_size average_tokens_across_devices batch_eval_metrics bf16 bf16_full_eval
    bnb_4bit_compute_dtype bnb_4bit_quant_storage bnb_4bit_quant_type bnb_4bit_use_double_quant
    boft_block_num boft_block_size boft_dropout boft_n_butterfly_factor callbacks commit_message
    create_checkpoint_symlink data_seed dataloader_drop_last dataloader_in_order
    dataloader_multiprocessing_context dataloader_num_workers dataloader_persistent_workers
    dataloader_pin_memory dataloader_prefetch_factor dataset_num_proc dataset_shuffle ddp_backend
    ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout
    debug decision_drop_instructions decision_shuffle_fields decision_state_as_text
    decision_subsample_options deepspeed_autotp_size disable_auto_column_mapping
    disable_ignore_empty_think disable_tqdm do_eval do_predict do_train download_mode
    ds3_gather_for_generation early_stop_interval enable_channel_loss enable_dft_loss
    enable_npu_model_patch enable_thinking eval_accumulation_steps eval_dataset eval_delay
    eval_do_concat_batches eval_limit eval_metric eval_on_start eval_steps eval_strategy
    eval_use_evalscope eval_use_gather_object exist_ok experts_impl fourier_n_frequency
    fourier_scaling fp16 fp16_full_eval freeze_aligner freeze_llm freeze_parameters
    freeze_parameters_ratio freeze_parameters_regex freeze_vit full_determinism galore_cos_threshold
    galore_gamma_proj galore_optim_per_parameter galore_proj_bits galore_proj_group_size
    galore_proj_quant galore_proj_type galore_quantization galore_queue_size galore_rank
    galore_scale galore_target_modules galore_update_proj_gap galore_with_embedding
    generation_max_length generation_num_beams gradient_accumulation_steps gradient_checkpointing
    greater_is_better group_by_length group_size hqq_axis hub_always_push hub_model_id
    hub_private_repo hub_revision hub_strategy hub_token ignore_args_error ignore_data_skip
    include_for_metrics include_num_input_tokens_seen infer_backend init_strategy init_weights
    interleave_prob is_binary_loss_scale label_names label_smoothing_factor lazy_tokenize
    learning_rate length_column_name lisa_activated_layers lisa_step_interval llamapro_num_groups
    llamapro_num_new_blocks lmdeploy_cache_max_entry_count lmdeploy_quant_policy
    lmdeploy_session_len lmdeploy_tp lmdeploy_vision_batch_size load_best_model_at_end
    load_from_cache_file log_interval log_level log_level_replica log_on_each_node
    logging_first_step logging_nan_inf_filter logging_steps logging_strategy logprobs lora_alpha
    lora_bias lora_dropout lora_dtype lora_ga_batch_size lora_ga_direction lora_ga_iters
    lora_ga_max_length lora_ga_scale lora_ga_stable_gamma lora_rank lorap_lr_ratio loss_scale
    loss_type lr_scheduler_type max_batch_size max_epochs max_grad_norm max_length max_logprobs
    max_model_len max_new_tokens max_pixels max_shard_size max_steps merge_lora metric
    metric_for_best_model model_author model_name model_revision model_type modules_to_save
    neftune_noise_alpha norm_bbox num_beams num_labels num_train_epochs optim optim_args
    optim_target_modules optimizer owned_by packing packing_length packing_num_proc
    packing_strategy padding_free padding_side per_device_eval_batch_size
    per_device_train_batch_size predict_with_generate prediction_loss_only preserve_thinking
    problem_type project quant_batch_size quant_bits quant_method quant_n_samples reft_args
    reft_intervention_type reft_layer_key reft_layers reft_rank remove_unused_columns
    repetition_penalty reranker_use_activation response_prefix
    restore_callback_states_from_checkpoint resume_only_model router_aux_loss_coef run_name
    safe_serialization save_missing_weights save_on_each_node save_only_model save_steps
    save_strategy save_total_limit seed sequence_parallel_size served_model_name
    sglang_context_length sglang_disable_cuda_graph sglang_disable_custom_all_reduce
    sglang_dp_size sglang_enable_dp_attention sglang_enable_ep_moe sglang_ep_size
    sglang_kv_cache_dtype sglang_mem_fraction_static sglang_pp_size sglang_quantization
    sglang_speculative_algorithm sglang_speculative_eagle_topk sglang_speculative_num_draft_tokens
    sglang_speculative_num_steps sglang_tp_size shuffle_buffer_size skip_memory_metrics
    sortish_sampler split_dataset_ratio stop_words stopping_strategy stream streaming strict
    structured_outputs_regex swanlab_email_language swanlab_exp_name swanlab_mode
    swanlab_notification_method swanlab_project swanlab_receiver_email swanlab_secret
    swanlab_sender_email swanlab_smtp_port swanlab_smtp_server swanlab_token swanlab_webhook_url
    swanlab_workspace target_modules target_parameters target_regex task_type temperature template
    template_backend template_mode test_convert_dtype test_convert_precision tf32 thread_count
    to_cached_dataset to_hf to_mcore to_ollama to_peft_format top_k top_logprobs top_p
    torch_compile torch_compile_backend torch_compile_mode torch_dtype torch_empty_cache_steps
    trackio_bucket_id trackio_space_id trackio_static_space_id train_dataloader_shuffle
    train_sampling_strategy trainable_parameters trainable_parameters_regex truncation_strategy
    tuner_backend tuner_type use_cache use_chat_template use_cpu use_dora use_flash_ckpt use_galore
    use_hf use_liger_kernel use_logits_to_keep use_rslora use_swift_lora val_dataset_sample
    val_dataset_shuffle vera_d_initial vera_dropout vera_projection_prng_key vera_rank verbose
    vit_gradient_checkpointing vit_lr vllm_data_parallel_size vllm_disable_cascade_attn
    vllm_disable_custom_all_reduce vllm_enable_expert_parallel vllm_enable_prefix_caching
    vllm_enforce_eager vllm_gpu_memory_utilization vllm_max_lora_rank vllm_max_model_len
    vllm_max_num_seqs vllm_mm_processor_cache_gb vllm_pipeline_parallel_size vllm_quantization
    vllm_reasoning_parser vllm_tensor_parallel_size vllm_use_async_engine warmup_ratio warmup_steps
    weight_decay write_batch_size zero_hpz_partition_size
    """
)

# Plain flags whose declaration looks like a path or code (see `looks_risky`), and why they are not.
PLAIN_DESPITE_LOOKS = {
    "adapter_act": "an activation function name",
    "attn_impl": "an attention implementation name",
    "commit_message": "text of a hub commit",
    "eval_dataset": "names of evalscope benchmarks (their files come from eval_dataset_args)",
    "lora_ga_direction": "one of ArBr, A2rBr, ArB2r, random",
    "model_type": "a name from ms-swift's model registry",
    "optimizer": "a name from ms-swift's optimizer registry (plugins add to it only through code flags)",
    "swanlab_notification_method": "a name; SwanLab runs only with report_to, which is reserved",
    "swanlab_webhook_url": "SwanLab runs only with report_to, which is reserved",
    "trackio_space_id": "Trackio runs only with report_to, which is reserved",
}

_KINDS: dict[str, Kind] = {
    **dict.fromkeys(PLAIN, Kind.plain),
    **dict.fromkeys(PATH, Kind.path),
    **dict.fromkeys(SOURCE, Kind.source),
    **dict.fromkeys(JSON, Kind.json),
    **dict.fromkeys(TEXT, Kind.text),
    **dict.fromkeys(CODE, Kind.code),
    **dict.fromkeys(RESERVED, Kind.reserved),
}


def kind_of(flag: str) -> Kind | None:
    """The reviewed kind of a flag; None for a flag nobody has reviewed."""
    return _KINDS.get(flag)


def refusal(flag: str, *, code_allowed: bool) -> str | None:
    """Why a user may not pass this flag in extra_args, or None when they may."""
    kind = kind_of(flag)
    if kind is None:
        return "not a flag this service knows what it does with; it is refused until reviewed"
    if kind is Kind.reserved:
        return f"set by the service ({RESERVED[flag]})"
    if kind is Kind.code and not code_allowed:
        return f"{CODE[flag]}: only an admin may pass it, where ALLOW_CODE_FLAGS is on"
    return None


_RISKY_NAME = re.compile(r"path|dir|file|dataset|checkpoint|plugin|regist|repo|config|kwargs|adapter|url|ssl")
_RISKY_HELP = re.compile(r"\b(paths?|files?|director(y|ies)|folders?|urls?|json|plugins?|import\w*)\b", re.I)


def looks_risky(name: str, type_text: str, help_text: str) -> str | None:
    """What in an ms-swift field's declaration suggests it takes a path or loads code, or None.
    Only a review can tell; this catches a flag filed as plain by mistake (see the tests)."""
    if "dict" in type_text.lower() or "Path" in type_text:
        return f"its type admits a dict or a path ({type_text})"
    # A number, a switch or a closed set of names cannot be a path.
    if "Literal" in type_text or not any(word in type_text for word in ("str", "List", "list")):
        return None
    if found := _RISKY_NAME.search(name):
        return f"its name says {found.group(0)!r}"
    if found := _RISKY_HELP.search(help_text):
        return f"its help says {found.group(0)!r}"
    return None
