"""Smooth random fields: the deformations and textures that make every phantom different."""

from __future__ import annotations

import numpy as np


class SmoothField:
    """A sum of random low-frequency sinusoids: smooth, deterministic, evaluable anywhere.

    Unlike a noise volume it has no grid, so anatomy and texture are defined in patient space
    and sampled on any acquisition grid (spacing, obliquity, tilt) without resampling artefacts.
    """

    def __init__(self, rng: np.random.Generator, dims: int, amplitude: float, wavelength: float,
                 components: int = 6, outputs: int = 1) -> None:
        directions = rng.normal(size=(outputs, components, dims))
        directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
        lengths = wavelength * rng.uniform(0.6, 1.6, size=(outputs, components, 1))
        self.freqs = (2 * np.pi * directions / lengths).astype(np.float32)
        self.phases = rng.uniform(0, 2 * np.pi, size=(outputs, components)).astype(np.float32)
        self.amps = (amplitude * rng.uniform(0.5, 1.0, size=(outputs, components)) /
                     np.sqrt(components)).astype(np.float32)

    @property
    def bound(self) -> float:
        """No output's value ever exceeds this in magnitude."""
        return float(np.abs(self.amps).sum(axis=1).max())

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """points (..., dims) -> values (..., outputs)."""
        arg = np.einsum("...d,ocd->...oc", points, self.freqs) + self.phases
        return np.einsum("...oc,oc->...o", np.sin(arg), self.amps)


def rotation(rng: np.random.Generator, max_degrees: tuple[float, ...]) -> np.ndarray:
    """A random rotation: about x, y, z by at most the given angles (3D), or in-plane (2D)."""
    angles = np.radians([rng.uniform(-m, m) for m in max_degrees])
    if len(angles) == 1:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rx, ry, rz = angles
    x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return z @ y @ x
