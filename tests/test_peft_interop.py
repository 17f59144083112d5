"""fuse_peft_model: peft's own outputs and gradients, through fastcp's fused op."""
import pytest
import torch
from torch import nn

from fastcp.nn.peft_interop import fuse_peft_model, unfuse_peft_model


def make_model(seed=0):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(31, 40), nn.GELU(), nn.Linear(40, 25))
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]), model, adapter_name="a")
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"]), model, adapter_name="b")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
    return model


def outputs_and_grads(model, x, **kw):
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    xx = x.clone().requires_grad_()
    y = model[2](model[1](model[0](xx, **kw)), **kw)
    grads = torch.autograd.grad(y.square().sum(), [xx] + params, allow_unused=True)
    return y, grads


def set_active(model, names):
    from peft.tuners.lora.layer import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_adapter(names)


@pytest.mark.parametrize("active", [["a"], ["a", "b"]])
def test_active_adapters_match_peft(active):
    model = make_model()
    set_active(model, active)
    x = torch.randn(5, 7, 31)
    y_ref, g_ref = outputs_and_grads(model, x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_peft_model(model) == 2
    y, g = outputs_and_grads(model, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        assert (a is None) == (b is None)  # inactive adapters get no gradient either way
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_mixed_adapter_batch_matches_peft():
    model = make_model(1)
    x = torch.randn(4, 6, 31)
    names = ["a", "__base__", "b", "a"]
    y_ref, g_ref = outputs_and_grads(model, x, adapter_names=names)
    fuse_peft_model(model)
    y, g = outputs_and_grads(model, x, adapter_names=names)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    unfuse_peft_model(model)
    y2, _ = outputs_and_grads(model, x, adapter_names=names)
    torch.testing.assert_close(y2, y_ref)


def test_not_a_peft_model():
    with pytest.raises(ValueError, match="no peft LoRA"):
        fuse_peft_model(nn.Linear(3, 3))
