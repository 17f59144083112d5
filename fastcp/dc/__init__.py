"""Batched diffusion-classifier engine: every concept × timestep in a few large UNet passes."""
from fastcp.dc.engine import DiffusionClassifier

__all__ = ["DiffusionClassifier"]
