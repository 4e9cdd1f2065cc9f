"""Build a tiny Qwen2 model, ChatML tokenizer and chat dataset offline, for demos and end-to-end tests."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load lazily: importing this module stays cheap.
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, as in Qwen2.5; swift's qwen2_5 template builds its own prompt, this one serves transformers users.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# swift's qwen2_5 template injects this system prompt; training the BPE on it keeps sequences short.
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2's pre-tokenizer split: AutoTokenizer loads any model_type=qwen2 dir as Qwen2Tokenizer, which
# rebuilds the normalizer and pre-tokenizer this way, so training with the same split keeps ids identical.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
VOCAB_SIZE = 384
MARKER = "assets.json"


@dataclass(frozen=True)
class DemoAssets:
    model_dir: Path
    dataset_path: Path
    root: Path

    def job_request(self, **train_params: object) -> dict[str, object]:
        """The body of a `POST /jobs` that fine-tunes the tiny model with LoRA on the CPU."""
        return {
            "task_type": "language_model",
            "model_path": str(self.model_dir),
            "data_path": str(self.dataset_path),
            "train_params": {
                "model_type": "qwen2",
                "template": "qwen2_5",
                "max_steps": 20,
                "logging_steps": 2,
                "save_steps": 10,
                "torch_dtype": "float32",
                "learning_rate": 0.005,  # the tiny model's loss visibly falls within 20 steps
                **train_params,
            },
        }


def build_demo_assets(root: Path, *, seed: int = 0, rows: int = 48) -> DemoAssets:
    """Idempotent: if root already has complete assets (a marker file written last), return them without rebuilding."""
    root = Path(root)
    assets = DemoAssets(model_dir=root / "model", dataset_path=root / "dataset.jsonl", root=root)
    marker = root / MARKER
    params = json.dumps({"seed": seed, "rows": rows})
    if marker.is_file() and marker.read_text() == params:
        return assets
    marker.unlink(missing_ok=True)
    shutil.rmtree(assets.model_dir, ignore_errors=True)
    assets.model_dir.mkdir(parents=True)

    messages = _make_rows(seed, rows)
    corpus = [QWEN_SYSTEM, "system user assistant"] + [m["content"] for row in messages for m in row]
    tokenizer = build_tokenizer(corpus, special_tokens=[PAD, IM_START, IM_END], eos=IM_END, pad=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(assets.model_dir)
    _build_model(tokenizer, seed).save_pretrained(assets.model_dir)
    with assets.dataset_path.open("w", encoding="utf-8") as f:
        for row in messages:
            f.write(json.dumps({"messages": row}) + "\n")
    marker.write_text(params)
    return assets


def _make_rows(seed: int, rows: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ra", "te", "su", "no", "vi", "da", "pe", "zo", "ru"]
    result = []
    for i in range(rows):
        if i % 2:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            question, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        else:
            country = "".join(rng.choices(syllables, k=3)).capitalize()
            city = "".join(rng.choices(syllables, k=2)).capitalize()
            question, answer = f"What is the capital of {country}?", f"The capital of {country} is {city}."
        result.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return result


def build_tokenizer(corpus: list[str], *, special_tokens: list[str], eos: str, pad: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus`` with Qwen2's split: any text round-trips, the corpus in few ids."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        # The full byte alphabet lets any text round-trip, not just the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, model_max_length=512)


def tiny_qwen2_config(vocab_size: int, *, bos: int, eos: int, pad: int) -> Qwen2Config:
    """Two layers of width 64: a language model small enough to train in seconds on a CPU."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def _build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen2ForCausalLM:
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    ids = tokenizer.convert_tokens_to_ids([PAD, IM_END])
    assert isinstance(ids, list)  # (a list of tokens: a list of ids)
    pad_id, eos_id = ids
    # Qwen2 has no real BOS; its config points at <|endoftext|> too.
    config = tiny_qwen2_config(len(tokenizer), bos=pad_id, eos=eos_id, pad=pad_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    return model
