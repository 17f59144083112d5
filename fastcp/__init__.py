"""fastcp: fast continual personalization of text-to-image diffusion models.

Entry points: ``python -m fastcp.train`` (the continual training job), ``fastcp.ops`` (fused
multi-adapter LoRA ops), ``fastcp.dc`` (batched diffusion classifier), ``fastcp.methods``.
"""
__version__ = "0.1.0"
