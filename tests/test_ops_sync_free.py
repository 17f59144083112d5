"""The hot path never makes the host wait for the device: no syncing op in any per-layer call.

A ``TorchDispatchMode`` sees every aten op of a routed / dense / all-adapter UNet forward+backward on
the Triton path (the interpreter on CPU: the same launchers and the same plan code as on a GPU) and
counts the ops that stall a CUDA stream: ``_local_scalar_dense`` (``.item()``, ``bool(t)``,
``.tolist()``), ``bincount``, ``nonzero``, ``unique``, ``masked_select``, ``repeat_interleave``
without ``output_size``, and copies to the CPU. Ops inside fastcp's Python custom ops are counted
too (the mode re-enters their implementations).

The one value check of the ids (a CPU read here; a device-side assert on CUDA) happens once per
routing plan, so it may show up once per forward — never once per layer.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch._library.custom_ops import _maybe_get_opdef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fastcp.nn import lora_layers, lora_routing  # noqa: E402
from fastcp.ops.dispatch import get_backend  # noqa: E402

pytestmark = pytest.mark.skipif(get_backend("triton").unavailable_reason() is not None,
                                reason="triton backend unavailable")

SYNCING = {"aten::_local_scalar_dense", "aten::item", "aten::bincount", "aten::nonzero", "aten::unique",
           "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select"}


class SyncCounter(TorchDispatchMode):
    """Counts syncing aten ops (see module docstring), descending into fastcp's Python custom ops."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.fastcp_calls = 0

    def _hit(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNCING:
            self._hit(name)
        if name == "aten::repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
                and kwargs.get("output_size") is None:
            self._hit("aten::repeat_interleave(no output_size)")
        if name in ("aten::_to_copy", "aten::copy_") and any(
                torch.is_tensor(a) and a.device.type != "cpu" for a in args) and \
                kwargs.get("device", None) is not None and torch.device(kwargs["device"]).type == "cpu":
            self._hit("device->cpu copy")
        if name.startswith("fastcp::"):
            self.fastcp_calls += 1
            opdef = _maybe_get_opdef(name)
            if opdef is not None:  # a Python custom op: count what its implementation runs
                with self:
                    return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def _unet(K=3):
    from fastcp.models.testing import random_lora_unet

    return random_lora_unet(K)


@pytest.fixture(scope="module")
def unet():
    return _unet()


def test_the_counter_sees_syncs():
    """A control: the counter must catch what it looks for, also inside a fastcp custom op."""
    ids = torch.tensor([0, 2, 1])
    with SyncCounter() as c:
        int(ids.max())
        torch.bincount(ids)
        ids.repeat_interleave(torch.tensor([1, 2, 1]))
        ids.repeat_interleave(2)  # the int form: its output size is known, no sync
    assert c.counts == {"aten::_local_scalar_dense": 1, "aten::bincount": 1,
                        "aten::repeat_interleave(no output_size)": 1}, c.counts


@pytest.mark.parametrize("routing", ["routed", "dense", "all"])
def test_unet_forward_backward_has_no_sync_per_layer(unet, monkeypatch, routing):
    monkeypatch.setenv("FASTCP_BACKEND", "triton")
    layers = lora_layers(unet)
    assert len(layers) >= 16
    for p in unet.parameters():
        p.requires_grad_(False)
    for l in layers.values():
        l.lora_a.requires_grad_(True)
        l.lora_b.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 400])
    c = torch.randn(2, 10, unet.config.cross_attention_dim, generator=g)
    kw = {"routed": dict(adapter_ids=torch.tensor([2, -1])),
          "dense": dict(coef=torch.rand(2, 3, generator=g).requires_grad_()),
          "all": {}}[routing]
    with SyncCounter() as counter:
        with lora_routing(unet, **kw):
            unet(x, t, encoder_hidden_states=c).sample.square().mean().backward()
    # forward and backward of every layer went through the fused Triton ops
    assert counter.fastcp_calls >= 2 * len(layers), counter.fastcp_calls
    allowed = {"aten::_local_scalar_dense": 1} if routing == "routed" else {}  # the plan's one id check
    for name, n in counter.counts.items():
        assert n <= allowed.get(name, 0), f"{name} ran {n} times in a forward+backward of {len(layers)} LoRA layers"
    assert all(l.lora_a.grad is not None and l.lora_a.grad.abs().sum() > 0 for l in layers.values())
    if routing == "dense":
        assert kw["coef"].grad is not None and kw["coef"].grad.abs().sum() > 0
    for l in layers.values():
        l.lora_a.grad = l.lora_b.grad = None
