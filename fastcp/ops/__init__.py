"""Public fused ops of fastcp (see DESIGN.md section 3).

``multi_lora_linear`` currently runs the plain-torch reference; the dispatch layer with the
cpp / triton / cuda backends plugs in here.
"""
from fastcp.ops.reference import merge_lora_reference_, multi_lora_linear_reference

multi_lora_linear = multi_lora_linear_reference
merge_lora_ = merge_lora_reference_

__all__ = ["multi_lora_linear", "merge_lora_"]
