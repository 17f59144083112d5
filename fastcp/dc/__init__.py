"""Batched diffusion-classifier engine: every concept × timestep in a few large UNet passes."""
from fastcp.dc.engine import ClassifyResult, DiffusionClassifier, errors_loop
from fastcp.dc.kv_cache import CachedCrossAttnProcessor, cached_cross_attention

__all__ = ["ClassifyResult", "DiffusionClassifier", "errors_loop", "CachedCrossAttnProcessor", "cached_cross_attention"]
