"""Public fused ops of fastcp (see DESIGN.md section 3).

``multi_lora_linear`` currently runs the plain-torch reference; the dispatch layer with the
cpp / triton / cuda backends plugs in here.
"""
from fastcp.ops.reference import multi_lora_linear_reference

multi_lora_linear = multi_lora_linear_reference

__all__ = ["multi_lora_linear"]
