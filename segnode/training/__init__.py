"""Training: dataset fingerprint -> plan, losses, augmentation, loop, metrics, model folder."""
