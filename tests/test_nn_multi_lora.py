"""MultiLoRALinear and UNet injection: slots, per-slot rank/alpha, routing, merges."""
import pytest
import torch
from torch import nn

from fastcp.nn import ATTENTION_TARGETS, FEEDFORWARD_TARGETS, MultiLoRALinear, inject_multi_lora, lora_layers, lora_routing


def test_layer_equals_explicit_lora_per_sample():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = MultiLoRALinear(base, num_adapters=3, rank=4)
    layer.reset_adapter(1, rank=2, alpha=6.0)  # slot 1: rank 2, scale 3
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 5, 12)
    ids = torch.tensor([1, -1, 2])
    y = layer(x, adapter_ids=ids)
    for b, k in enumerate(ids.tolist()):
        want = base(x[b])
        if k >= 0:
            want = want + x[b] @ layer.delta_weight(k).T
        torch.testing.assert_close(y[b], want, rtol=1e-5, atol=1e-5)
    assert float(layer.scaling[1]) == 3.0 and int(layer.ranks[1]) == 2
    assert layer.lora_a[1, 2:].abs().sum() == 0  # padding rows of A: the padded rank contributes nothing


def test_padded_rank_stays_zero_under_training():
    layer = MultiLoRALinear(nn.Linear(6, 5), num_adapters=2, rank=4)
    layer.reset_adapter(0, rank=2)
    opt = torch.optim.Adam([layer.lora_a, layer.lora_b], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 6), adapter_ids=torch.tensor([0, 0, 1, 0])).square().sum().backward()
        opt.step()
    assert layer.lora_a[0, 2:].abs().sum() == 0 and layer.lora_b[0, :, 2:].abs().sum() == 0
    assert layer.lora_b[0, :, :2].abs().sum() > 0


def test_injection_into_a_diffusers_unet_and_routing_context():
    from fastcp.models.tiny import build_unet

    unet = build_unet()
    attn_only = inject_multi_lora(unet, num_adapters=2, rank=2)
    assert attn_only and all(n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in attn_only)
    with pytest.raises(ValueError, match="targets"):
        inject_multi_lora(nn.Sequential(nn.Linear(2, 2)), targets=("nope",))
    unet2 = build_unet()
    both = inject_multi_lora(unet2, num_adapters=2, rank=2, targets=ATTENTION_TARGETS + FEEDFORWARD_TARGETS)
    assert len(both) > len(attn_only)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if ".base." in n)
    with torch.no_grad():
        for l in lora_layers(unet).values():
            l.lora_b.normal_()
    x, t, c = torch.randn(2, 3, 32, 32), torch.tensor([3, 400]), torch.randn(2, 10, 64)
    with torch.no_grad():
        with lora_routing(unet, enabled=False):
            base = unet(x, t, encoder_hidden_states=c).sample
        with lora_routing(unet, adapter_ids=torch.tensor([-1, 0])):
            routed = unet(x, t, encoder_hidden_states=c).sample
        with lora_routing(unet, coef=torch.tensor([[0.0, 0.0], [1.0, 0.0]])):
            coefed = unet(x, t, encoder_hidden_states=c).sample
    torch.testing.assert_close(routed[0], base[0])
    assert (routed[1] - base[1]).abs().max() > 1e-4
    torch.testing.assert_close(coefed, routed, rtol=1e-5, atol=1e-5)
    assert all(l.adapter_ids is None and l.coef is None and l.enabled for l in lora_layers(unet).values())


def test_merge_adapter_folds_the_delta():
    torch.manual_seed(1)
    layer = MultiLoRALinear(nn.Linear(8, 6), num_adapters=1, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 8)
    before = layer(x)
    layer.merge_adapter_(0)
    assert layer.lora_b.abs().sum() == 0  # fresh slot
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpoint_fn", ["default", "routing_safe"])
def test_gradient_checkpointing_recomputes_under_the_forward_routing(checkpoint_fn):
    """Backward after lora_routing exited: the recompute must use the forward's routing. The default
    checkpoint function does not (wrong LoRA gradients); routing_safe_checkpoint does."""
    from fastcp.models.tiny import build_unet
    from fastcp.nn import routing_safe_checkpoint

    def grads(checkpointing):
        torch.manual_seed(0)
        unet = build_unet()
        layers = inject_multi_lora(unet, num_adapters=2, rank=2)
        with torch.no_grad():
            for l in layers.values():
                l.lora_b.normal_(std=0.1)
        if checkpointing == "default":
            unet.enable_gradient_checkpointing()
        elif checkpointing == "routing_safe":
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=routing_safe_checkpoint)
        unet.train()
        g = torch.Generator().manual_seed(1)
        x, t, c = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 400]), torch.randn(2, 10, 64, generator=g)
        with lora_routing(unet, coef=torch.tensor([[1.0, 0.0], [0.0, 0.5]])):
            loss = unet(x, t, encoder_hidden_states=c).sample.square().mean()
        loss.backward()  # outside the routing context, as training loops do
        return torch.cat([l.lora_a.grad.flatten() for l in layers.values()])

    want, got = grads(None), grads(checkpoint_fn)
    if checkpoint_fn == "routing_safe":
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    else:
        assert not torch.allclose(got, want, rtol=1e-3, atol=1e-5)  # the bug this function exists for
