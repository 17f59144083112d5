"""``merge``: after each task merge ΔW_n into the base weights (fp32) and start a fresh LoRA.

    W ← W + s·B_n A_n   after task n;   task n+1 starts from A ~ Kaiming-uniform, B = 0.

Earlier concepts live in the merged weights; the new adapter still overwrites them where the
tasks overlap, but cannot undo them by moving the shared adapter back.
"""
from fastcp.methods.base import Method, register


@register
class Merge(Method):
    name = "merge"
    export_form = "merged"

    def end_task(self, n: int) -> None:
        self.release_hooks()
        for layer in self.ctx.layers.values():
            layer.merge_adapter_(0)
