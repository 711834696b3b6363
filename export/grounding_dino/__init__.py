"""Grounding DINO: config, checkpoints (Hugging Face and original layout), tokenizer, export."""
