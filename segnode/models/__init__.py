"""Model folders: models/<name>/ with model.json, weights.safetensors and MODEL_CARD.md."""
