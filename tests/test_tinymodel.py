import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from events.params import JobSpec
from services.demo.tinymodel import MARKER, build_demo_assets
from services.demo.tinyvl import COLOURS, QUESTION, build_vision_assets


def test_build_demo_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assets = build_demo_assets(tmp_path / "demo", rows=10)

    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.model_dir)
    text = "What is 7 plus 35? Ünïcode ✓ text\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("<|im_start|>")) == 1

    rows = [json.loads(line) for line in assets.dataset_path.read_text().splitlines()]
    assert len(rows) == 10
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])

    prompt = tokenizer.apply_chat_template(rows[0]["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n{rows[0]['messages'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"

    model = transformers.AutoModelForCausalLM.from_pretrained(assets.model_dir)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))

    # Complete assets are returned as they are; a missing marker means a half-built dir, rebuilt.
    weights = assets.model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_demo_assets(tmp_path / "demo", rows=10) == assets
    assert weights.stat().st_mtime_ns == stamp
    (assets.root / MARKER).unlink()
    build_demo_assets(tmp_path / "demo", rows=10)
    assert weights.stat().st_mtime_ns != stamp


def test_build_vision_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assets = build_vision_assets(tmp_path / "vision", per_colour=2)

    # The rows ask the same question of each image; only the image tells the answer
    rows = [json.loads(line) for line in assets.dataset_path.read_text().splitlines()]
    assert len(rows) == 2 * len(COLOURS)
    assert {row["messages"][0]["content"] for row in rows} == {f"<image>{QUESTION}"}
    assert sorted(row["messages"][1]["content"] for row in rows) == sorted(list(COLOURS) * 2)
    for row in rows:
        path = Path(row["images"][0])
        assert path.is_absolute() and path.name.startswith(row["messages"][1]["content"])
        assert Image.open(path).size == (64, 64)

    # The processor loads as ms-swift loads it, and expands <image> into the model's 16 patches
    processor = transformers.AutoProcessor.from_pretrained(assets.model_dir)
    prompt = processor.apply_chat_template(rows[0]["messages"][:1], add_generation_prompt=True)
    assert prompt == f"USER: <image>{QUESTION}\nASSISTANT:"
    inputs = processor(images=Image.open(rows[0]["images"][0]), text=prompt, return_tensors="pt")
    model = transformers.AutoModelForImageTextToText.from_pretrained(assets.model_dir)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == len(processor.tokenizer)
    assert build_vision_assets(tmp_path / "vision", per_colour=2) == assets


def test_the_demo_prints_a_valid_job_for_each_model(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "DATA_DIR": str(tmp_path / "data")},
    )
    bodies = [json.loads(body) for body in re.findall(r"-d '(\{.*\})'", done.stdout)]
    specs = [TypeAdapter(JobSpec).validate_python(body) for body in bodies]
    assert [spec.task_type for spec in specs] == ["language_model", "multimodal"]
    assert all(Path(spec.model_path).is_dir() and Path(spec.data_path).is_file() for spec in specs)
