"""Backbones: the embedded tiny model and diffusers pipeline directories."""
from fastcp.models.backbone import Backbone, Conditioning, load_backbone

__all__ = ["Backbone", "Conditioning", "load_backbone"]
