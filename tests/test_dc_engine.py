"""DiffusionClassifier against the plain per-(image, concept, timestep) loop."""
import pytest
import torch

from fastcp.dc import DiffusionClassifier, errors_loop
from fastcp.dc.engine import ACTIVATION_FACTOR_NO_GRAD
from fastcp.models import load_backbone
from fastcp.models.testing import make_tiny_sd_pipeline
from fastcp.nn import inject_multi_lora, lora_layers


def with_adapters(unet, K, seed=0, rank=4, **inject_kwargs):
    inject_multi_lora(unet, num_adapters=K, rank=rank, **inject_kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)
    return unet


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dc")
    return {p: make_tiny_sd_pipeline(root / p, prediction_type=p) for p in ("epsilon", "v_prediction")}


def inputs(bb, N=2, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = bb.encode_images(torch.rand(N, 3, bb.sample_size, bb.sample_size, generator=g) * 2 - 1)
    cond = bb.encode_prompt(["a photo of a dog", "a red star", "a blue mug", ""])
    return x, cond, torch.tensor([50, 400, 950][:T]), torch.randn(T, *x.shape[1:], generator=g)


@pytest.mark.parametrize("kv_cache,share_prefix", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("adapters", [False, True])
def test_tiny_errors_equal_loop_for_any_chunking(tiny, kv_cache, share_prefix, adapters):
    bb = load_backbone("tiny") if adapters else tiny
    ids = None
    if adapters:
        with_adapters(bb.unet, 3)
        ids = torch.tensor([2, -1, 0, 1])
    x, cond, ts, noise = inputs(bb, T=2)  # 16 rows: chunks of 7 leave a ragged last chunk
    with torch.no_grad():
        ref = errors_loop(bb.unet, bb.scheduler, x, cond, ts, noise, ids)
        clf = DiffusionClassifier(bb.unet, bb.scheduler, kv_cache=kv_cache, share_prefix=share_prefix)
        assert clf.share_prefix == share_prefix
        for bs in (None, 7) if adapters else (1, 7):
            torch.testing.assert_close(clf.errors(x, cond, ts, noise, ids, batch_size=bs), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_unet_errors_equal_loop(sd_dirs, prediction_type):
    bb = load_backbone(sd_dirs[prediction_type])
    with_adapters(bb.unet, 2, seed=1)
    ids = torch.tensor([0, 1, -1, 0])
    x, cond, ts, _ = inputs(bb, N=2, T=2)
    noise = torch.randn(2, 2, *x.shape[1:], generator=torch.Generator().manual_seed(3))  # per-image noise
    with torch.no_grad():
        ref = errors_loop(bb.unet, bb.scheduler, x, cond, ts, noise, ids)
        got = DiffusionClassifier(bb.unet, bb.scheduler).errors(x, cond, ts, noise, ids, batch_size=5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_gradients_to_lora_equal_the_loop(tiny):
    bb = load_backbone("tiny")
    with_adapters(bb.unet, 2)
    params = [p for l in lora_layers(bb.unet).values() for p in (l.lora_a, l.lora_b)]
    for p in params:
        p.requires_grad_(True)
    x, cond, ts, noise = inputs(bb, N=1, T=2)
    ids = torch.tensor([0, 1, -1, 1])
    clf = DiffusionClassifier(bb.unet, bb.scheduler, temperature=0.1)
    g_engine = torch.autograd.grad(torch.log_softmax(clf.logits(x, cond, ts, noise, ids, batch_size=3), 1)[:, 1].sum(), params)
    ref = errors_loop(bb.unet, bb.scheduler, x, cond, ts, noise, ids)
    g_loop = torch.autograd.grad(torch.log_softmax(-ref.mean(2) / 0.1, 1)[:, 1].sum(), params)
    for a, b in zip(g_engine, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(a.abs().sum() > 0 for a in g_engine)


def test_classify_with_stages_matches_exhaustive_and_is_deterministic(tiny):
    x, cond, _, _ = inputs(tiny, N=3)
    clf = DiffusionClassifier(tiny.unet, tiny.scheduler)
    full = clf.classify(x, cond, stages=[(6, None)], generator=torch.Generator().manual_seed(0))
    # keep=K never drops anything: same timesteps, same noise, same answer
    staged = clf.classify(x, cond, stages=[(2, 4), (4, 4)], generator=torch.Generator().manual_seed(0))
    assert torch.equal(staged.pred, full.pred)
    torch.testing.assert_close(staged.errors, full.errors)
    # pruning to the true winner's survivors still finds it
    pruned = clf.classify(x, cond, stages=[(3, 2), (3, 1)], generator=torch.Generator().manual_seed(0))
    assert pruned.errors[:, :, 3:].isnan().sum() > 0 and pruned.alive.sum(1).eq(1).all()
    # the surviving entries are the exhaustive ones (same timesteps, same noise per image)
    kept = ~pruned.errors.isnan()
    torch.testing.assert_close(pruned.errors[kept], full.errors[kept])
    again = clf.classify(x, cond, stages=[(3, 2), (3, 1)], generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.pred, pruned.pred) and torch.equal(again.errors.nan_to_num(), pruned.errors.nan_to_num())
    assert len(set(full.timesteps.tolist())) == 6  # distinct timesteps spread over the schedule


def test_bad_shapes_name_the_argument(tiny):
    x, cond, ts, noise = inputs(tiny)
    clf = DiffusionClassifier(tiny.unet, tiny.scheduler)
    with pytest.raises(ValueError, match="latents"):
        clf.errors(x[0], cond, ts, noise)
    with pytest.raises(ValueError, match="noise"):
        clf.errors(x, cond, ts, noise[:2])
    with pytest.raises(ValueError, match="timesteps"):
        clf.errors(x, cond, ts.float(), noise)
    with pytest.raises(ValueError, match="adapter_ids"):
        clf.errors(x, cond, ts, noise, adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="timesteps"):
        clf.errors(x, cond, torch.tensor([5, 1000, 2]), noise)
    with pytest.raises(ValueError, match="cond"):
        clf.errors(x, cond.encoder_hidden_states[0], ts, noise)
    with pytest.raises(ValueError, match="batch_size"):
        clf.errors(x, cond, ts, noise, batch_size=0)
    with pytest.raises(ValueError, match="max_batch_bytes"):
        clf.errors(x, cond, ts, noise, max_batch_bytes=-1)
    with pytest.raises(ValueError, match="stages"):
        clf.classify(x, cond, stages=[])
    with pytest.raises(ValueError, match="stages"):
        clf.classify(x, cond, stages=[(2, 0)])
    with pytest.raises(ValueError, match="latents"):
        clf.classify(x[0], cond)


def test_byte_budget_chunks_bare_tensor_cond_and_processors_restored(tiny):
    x, cond, ts, noise = inputs(tiny)
    clf = DiffusionClassifier(tiny.unet, tiny.scheduler)
    calls = []
    hook = tiny.unet.conv_out.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    before = {n: type(p) for n, p in tiny.unet.attn_processors.items()}
    try:
        with torch.no_grad():
            full = clf.errors(x, cond, ts, noise)
            assert calls == [24]
            calls.clear()
            per_row = x[0].numel() * x.element_size()
            budget = clf.errors(x, cond.encoder_hidden_states, ts, noise, max_batch_bytes=ACTIVATION_FACTOR_NO_GRAD * per_row * 10)
    finally:
        hook.remove()
    assert calls == [10, 10, 4]
    torch.testing.assert_close(budget, full, rtol=1e-5, atol=1e-6)
    assert {n: type(p) for n, p in tiny.unet.attn_processors.items()} == before
    def boom(*_):
        raise RuntimeError("boom")

    hook = tiny.unet.conv_out.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):  # an error inside the call still restores them
            clf.errors(x, cond, ts, noise)
    finally:
        hook.remove()
    assert {n: type(p) for n, p in tiny.unet.attn_processors.items()} == before


def test_lora_in_the_shared_prefix_stays_exact():
    # time_emb_proj of the full-resolution resnets and the time embedding sit before the first
    # cross-attention: with per-concept adapters there the prefix is concept-dependent.
    bb = load_backbone("tiny")
    with_adapters(bb.unet, 2, rank=2, targets=("time_emb_proj", "linear_1", "to_k"))
    x, cond, ts, noise = inputs(bb, N=1, T=2)
    ids = torch.tensor([0, 1, -1, 1])
    with torch.no_grad():
        ref = errors_loop(bb.unet, bb.scheduler, x, cond, ts, noise, ids)
        got = DiffusionClassifier(bb.unet, bb.scheduler).errors(x, cond, ts, noise, ids, batch_size=3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_errors_under_bf16_autocast_track_fp32(tiny):
    bb = load_backbone("tiny")
    with_adapters(bb.unet, 2)
    x, cond, ts, noise = inputs(bb)
    ids = torch.tensor([0, 1, -1, 0])
    clf = DiffusionClassifier(bb.unet, bb.scheduler)
    with torch.no_grad():
        ref = clf.errors(x, cond, ts, noise, ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = clf.errors(x, cond, ts, noise, ids, batch_size=5)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    rel = ((low - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel  # bf16 has 8 mantissa bits; the ranking of concepts is what matters


def test_channels_last_option_and_concept_major_rows_equal_loop():
    bb = load_backbone("tiny")
    with_adapters(bb.unet, 3, seed=4)
    ids = torch.tensor([2, -1, 0, 2])  # unsorted, a repeated slot and a base-only concept
    x, cond, ts, noise = inputs(bb, N=2, T=1)
    with torch.no_grad():
        ref = errors_loop(bb.unet, bb.scheduler, x, cond, ts, noise, ids)
        clf = DiffusionClassifier(bb.unet, bb.scheduler, channels_last=True)
        assert bb.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        for bs in (5, None):
            torch.testing.assert_close(clf.errors(x, cond, ts, noise, ids, batch_size=bs), ref, rtol=1e-5, atol=1e-6)


def test_compile_option_compiles_every_block_the_engine_calls():
    bb = load_backbone("tiny")
    DiffusionClassifier(bb.unet, bb.scheduler, compile=True)  # Module.compile is lazy: nothing runs here
    for m in (bb.unet.conv_in, *bb.unet.down_blocks, bb.unet.mid_block, *bb.unet.up_blocks, bb.unet.conv_out):
        assert m._compiled_call_impl is not None


def test_shared_prefix_only_where_it_saves_work(tiny, sd_dirs):
    from fastcp.dc import shared_prefix

    # tiny: two full-resolution down blocks before the first cross-attention: a real share
    assert shared_prefix.saves_work(tiny.unet) and DiffusionClassifier(tiny.unet, tiny.scheduler).share_prefix
    f = shared_prefix.prefix_flops(tiny.unet, (3, 32, 32), (8, 64))
    assert 0.05 < f["fraction"] < 1 and f["prefix"] < f["total"]
    # SD-1.x layout (cross-attention from down_blocks[0]): the prefix is conv_in + time embedding, ~0%
    sd = load_backbone(sd_dirs["epsilon"])
    assert not shared_prefix.saves_work(sd.unet) and not DiffusionClassifier(sd.unet, sd.scheduler).share_prefix
    f_sd = shared_prefix.prefix_flops(sd.unet, (4, 16, 16), (16, sd.unet.config.cross_attention_dim))
    assert f_sd["fraction"] < 0.05
