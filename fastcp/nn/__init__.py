"""Modules built on the fused ops: MultiLoRALinear, UNet injection, routing."""
from fastcp.nn.multi_lora import (
    ATTENTION_TARGETS,
    CROSS_KV_TARGETS,
    FEEDFORWARD_TARGETS,
    MultiLoRALinear,
    inject_multi_lora,
    lora_layers,
    lora_routing,
)
from fastcp.nn.checkpointing import routing_safe_checkpoint

__all__ = [
    "ATTENTION_TARGETS", "CROSS_KV_TARGETS", "FEEDFORWARD_TARGETS",
    "MultiLoRALinear", "inject_multi_lora", "lora_layers", "lora_routing", "routing_safe_checkpoint",
]
