"""The exporter: merges LoRA adapters into their base model with `swift export`."""
