"""Public fused ops of fastcp (DESIGN.md section 3).

- ``multi_lora_linear``: linear + K LoRA adapters mixed per sample (coef / adapter_ids), autograd.
- ``merge_lora_`` / ``unmerge_lora_``: fold a LoRA delta into a weight in place (fp32, optional mask).
- ``magmax_merge``: elementwise max-magnitude merge of task vectors.
- ``routing_plan`` / ``RoutingPlan``: per-sample routing built once per model forward, shared by every layer.
- ``available_backends()``: the backends that can run here; ``backend=`` or ``FASTCP_BACKEND`` forces one.
"""
from fastcp.ops.dispatch import available_backends
from fastcp.ops.merge import magmax_merge, merge_lora_, unmerge_lora_
from fastcp.ops.multi_lora import multi_lora_linear
from fastcp.ops.routing import RoutingPlan, routing_plan

__all__ = ["multi_lora_linear", "RoutingPlan", "routing_plan", "merge_lora_", "unmerge_lora_", "magmax_merge", "available_backends"]
