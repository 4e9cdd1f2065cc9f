import json
from pathlib import Path

import pytest

from services.demo.tinymodel import MARKER, build_demo_assets


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
