"""Inference: label maps from images with a model folder."""
