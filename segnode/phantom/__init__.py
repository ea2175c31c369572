"""Synthetic phantoms: DICOM images with ground-truth label maps, deterministic by seed.

The same generators feed training, evaluation, the demo and the benchmarks; nothing is downloaded.
"""
