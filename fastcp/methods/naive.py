"""``naive``: one LoRA carried across every task, trained with plain L_diff.

Task n minimises L_diff on D_n with the same adapter (slot 0) that earlier tasks trained, plus
task n's own token embedding. Nothing protects earlier concepts: this is the forgetting baseline.
"""
from fastcp.methods.base import Method, register


@register
class Naive(Method):
    name = "naive"

