"""Pretrain the embedded ``tiny`` backbone and its judge on the synthetic world.

    python -m fastcp.models.pretrain_tiny [--steps 3000] [--batch_size 48] [--out fastcp/models/tiny]

Seeded and deterministic up to thread scheduling. Writes a diffusers-layout directory (unet/,
text_encoder/, tokenizer/, scheduler/, judge/) plus ``pretrain_report.json`` (settings, seconds,
judge accuracies, base-class generation accuracy). The output is first written to a temporary
sibling folder and then renamed, so an interrupted run never leaves half a model behind.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastcp.data import synthetic as world
from fastcp.eval.judge import Judge
from fastcp.models.backbone import TINY_DIR
from fastcp.models.noise import noisy_input_and_target
from fastcp.models.tiny import build_tiny_backbone


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise and small colour shifts: generated images are less crisp than renders."""
    b = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(b, 1, 1, 1, generator=gen) * 0.7
    images = (1 - w) * images + w * blur
    images = images + torch.randn(images.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.15
    images = images + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.15
    return images.clamp(-1, 1)


def train_judge(seed: int, epochs: int = 8, log=print) -> tuple[Judge, dict]:
    """Train the judge on base shapes + every personal concept; returns it and held-out accuracies."""
    torch.manual_seed(seed)
    n_concepts = len(world.PERSONAL_CONCEPTS)
    base_x, _, base_y = world.sample_base(6000, seed + 11)
    con_x = np.concatenate([world.render_concept(c, 400, seed, split="judge") for c in world.PERSONAL_CONCEPTS])
    con_y = np.repeat(np.arange(n_concepts) + len(world.SHAPES), 400)
    x = torch.from_numpy(np.concatenate([base_x, con_x]))
    y = torch.from_numpy(np.concatenate([base_y, con_y]))
    judge = Judge(len(world.JUDGE_CLASSES))
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    judge.train()
    for _ in tqdm(range(epochs), desc="judge", disable=None):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 127, 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(judge(_augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    # Held-out accuracy on fresh renders (different seeds/splits from training).
    tb_x, _, tb_y = world.sample_base(800, seed + 12)
    base_acc = (judge.predict(torch.from_numpy(tb_x)) == torch.from_numpy(tb_y)).float().mean().item()
    con_acc = []
    for j, c in enumerate(world.PERSONAL_CONCEPTS):
        pred = judge.predict(torch.from_numpy(world.render_concept(c, 100, seed, split="judge_eval")))
        con_acc.append((pred == j + len(world.SHAPES)).float().mean().item())
    report = {"base_shape_accuracy": base_acc, "concept_accuracy": con_acc}
    log(f"judge: base-shape accuracy {base_acc:.3f}, concept accuracy {np.mean(con_acc):.3f}")
    return judge.eval(), report


def base_prompts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """n base-class prompts ("a <colour> <shape>") with their shape labels."""
    rng = np.random.default_rng([seed, 3])
    colours = list(world.COLOURS)
    prompts, labels = [], []
    for i in range(n):
        shape = world.SHAPES[i % len(world.SHAPES)]
        prompts.append(f"a {colours[rng.integers(len(colours))]} {shape}")
        labels.append(i % len(world.SHAPES))
    return prompts, labels


def pretrain_backbone(steps: int, batch_size: int, lr: float, seed: int, pool: int = 20000, log=print):
    """Joint text-encoder + UNet training on captioned base images (10% empty captions for CFG)."""
    bb = build_tiny_backbone(seed)
    unet, te = bb.unet, bb.text_encoder
    unet.train(), te.train()
    params = list(unet.parameters()) + list(te.parameters())
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    images, captions, _ = world.sample_base(pool, seed)
    images = torch.from_numpy(images)
    rng = np.random.default_rng([seed, 4])
    gen = torch.Generator().manual_seed(seed)
    n_train = bb.scheduler.config.num_train_timesteps
    bar = tqdm(range(steps), desc="pretrain", disable=None)
    for step in bar:
        idx = rng.integers(pool, size=batch_size)
        x0 = images[idx]
        caps = ["" if rng.random() < 0.1 else captions[i] for i in idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, n_train, (batch_size,), generator=gen)
        xt, target = noisy_input_and_target(bb.scheduler, x0, noise, t, bb.prediction_type)
        cond = bb.encode_prompt(caps)
        pred = unet(xt, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
            p.requires_grad_(False)
    unet.eval(), te.eval()
    return bb


def base_generation_accuracy(bb, judge, seed: int) -> float:
    """Judge accuracy (shape) on 64 images generated from base-class prompts."""
    prompts, labels = base_prompts(64, seed)
    imgs = bb.generate(prompts, num_inference_steps=20, generator=torch.Generator().manual_seed(seed))
    return (judge.predict(imgs) == torch.tensor(labels)).float().mean().item()


def evaluate_existing(path: Path, seed: int) -> int:
    from fastcp.eval.judge import load_judge
    from fastcp.models.backbone import load_backbone

    bb = load_backbone(path)
    judge, _ = load_judge(path / "judge")
    acc = base_generation_accuracy(bb, judge, seed)
    report_path = path / "pretrain_report.json"
    report = json.loads(report_path.read_text())
    report["base_generation_judge_accuracy"] = acc
    report["base_generation_sampler"] = "DPM-Solver++ 20 steps, guidance 3.0"
    report_path.write_text(json.dumps(report, indent=2))
    print(f"base-class generation: judge accuracy {acc:.3f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch_size", type=int, default=48)
    ap.add_argument("--learning_rate", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=TINY_DIR)
    ap.add_argument("--judge_epochs", type=int, default=8)
    ap.add_argument("--eval_only", action="store_true",
                    help="only re-measure base-class generation of the model in --out and update its report")
    args = ap.parse_args(argv)
    if args.eval_only:
        return evaluate_existing(args.out, args.seed)

    t0 = time.time()
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    judge, judge_report = train_judge(args.seed, epochs=args.judge_epochs)
    t_judge = time.time() - t0
    bb = pretrain_backbone(args.steps, args.batch_size, args.learning_rate, args.seed)
    t_unet = time.time() - t0 - t_judge

    bb.save_pretrained(tmp)
    judge.save(tmp / "judge", list(world.JUDGE_CLASSES))
    # Measured on the model as saved and loaded, i.e. as every user gets it: the in-memory
    # scheduler config lists its unset keys as defaults, which DPM-Solver's from_config then
    # replaces with its own (timestep_spacing "linspace" instead of the saved "leading").
    from fastcp.models.backbone import load_backbone

    gen_acc = base_generation_accuracy(load_backbone(tmp), judge, args.seed)
    print(f"base-class generation: judge accuracy {gen_acc:.3f} on 64 prompts")
    report = {
        "command": "python -m fastcp.models.pretrain_tiny " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds_judge": round(t_judge, 1), "seconds_backbone": round(t_unet, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "judge": judge_report, "base_generation_judge_accuracy": gen_acc,
        "base_generation_sampler": "DPM-Solver++ 20 steps, guidance 3.0",
    }
    (tmp / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
