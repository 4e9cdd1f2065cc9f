"""Build a tiny vision-language model (LLaVA-1.5 in the Hugging Face layout) and a small image
dataset offline, for demos and end-to-end tests of `multimodal` jobs.

ms-swift trains it as `--model_type llava1_5_hf --template llava1_5_hf` with nothing installed
beyond what text training needs (no torchvision). The images are coloured squares and every
question is the same, so only the picture tells the answer.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.demo.tinymodel import build_tokenizer, tiny_qwen2_config

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
IMAGE_SIZE, PATCH_SIZE = 64, 16
QUESTION = "What colour is this?"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}
# As the llava1_5_hf template writes a conversation, for transformers users of the model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MARKER = "assets.json"


@dataclass(frozen=True)
class VisionAssets:
    model_dir: Path
    dataset_path: Path
    images_dir: Path
    root: Path

    def job_request(self, **train_params: object) -> dict[str, object]:
        """The body of a `POST /jobs` that fine-tunes the tiny VL model with LoRA on the CPU,
        its vision tower and aligner trained too, each at its own learning rate."""
        return {
            "task_type": "multimodal",
            "model_path": str(self.model_dir),
            "data_path": str(self.dataset_path),
            "train_params": {
                "model_type": "llava1_5_hf",
                "template": "llava1_5_hf",
                "max_steps": 20,
                "logging_steps": 2,
                "save_steps": 10,
                "batch_size": 2,
                "gradient_accumulation_steps": 1,
                "torch_dtype": "float32",
                "learning_rate": 0.005,
                "vit_lr": 0.002,
                "aligner_lr": 0.003,
                "freeze_vit": False,
                "freeze_aligner": False,
                **train_params,
            },
        }

    def image(self, colour: str) -> Path:
        return self.images_dir / f"{colour}_0.png"


def build_vision_assets(root: Path, *, seed: int = 0, per_colour: int = 4) -> VisionAssets:
    """Idempotent like `build_demo_assets`: complete assets (marker written last) are returned as they are."""
    root = Path(root)
    assets = VisionAssets(
        model_dir=root / "model", dataset_path=root / "dataset.jsonl", images_dir=root / "images", root=root
    )
    marker = root / MARKER
    params = json.dumps({"seed": seed, "per_colour": per_colour})
    if marker.is_file() and marker.read_text() == params:
        return assets
    marker.unlink(missing_ok=True)
    for folder in (assets.model_dir, assets.images_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    rows = _make_images(assets.images_dir, seed, per_colour)
    tokenizer = build_tokenizer(
        ["USER: ASSISTANT:", QUESTION, *COLOURS], special_tokens=[PAD, BOS, EOS, IMAGE], eos=EOS, pad=PAD
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    _build_processor(tokenizer).save_pretrained(assets.model_dir)
    _build_model(tokenizer, seed).save_pretrained(assets.model_dir)
    with assets.dataset_path.open("w", encoding="utf-8") as f:
        for path, colour in rows:
            messages = [{"role": "user", "content": f"{IMAGE}{QUESTION}"}, {"role": "assistant", "content": colour}]
            f.write(json.dumps({"messages": messages, "images": [str(path.resolve())]}) + "\n")
    marker.write_text(params)
    return assets


def _make_images(folder: Path, seed: int, per_colour: int) -> list[tuple[Path, str]]:
    """Squares of each colour, each shade a little different; rows interleaved by colour."""
    from PIL import Image

    rng = random.Random(seed)
    rows = []
    for i in range(per_colour):
        for name, rgb in COLOURS.items():
            shade = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in rgb)
            path = folder / f"{name}_{i}.png"
            Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), shade).save(path)
            rows.append((path, name))
    return rows


def _build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    from transformers import BaseImageProcessor, LlavaProcessor

    image_processor: type[BaseImageProcessor]
    try:  # Pillow's own backend; the default one wants torchvision, which stays out of the install
        from transformers import CLIPImageProcessorPil

        image_processor = CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        image_processor = CLIPImageProcessor
    images = image_processor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",  # drops CLIP's class token: 16 image tokens
        num_additional_image_tokens=1,
        image_token=IMAGE,
        chat_template=CHAT_TEMPLATE,
    )


def _build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaForConditionalGeneration:
    import torch
    from transformers import CLIPVisionConfig, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids([PAD, BOS, EOS, IMAGE])
    assert isinstance(ids, list)  # (a list of tokens: a list of ids)
    pad_id, bos_id, eos_id, image_id = ids
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = tiny_qwen2_config(len(tokenizer), bos=bos_id, eos=eos_id, pad=pad_id)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return model
