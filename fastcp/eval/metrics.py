"""The continual evaluation matrix and its summaries (DESIGN.md section 7).

M[n][j] = metric of concept j evaluated after task n (T×T; entries j > n show the concept before
its task). Summaries:

    average    = mean_j M[T-1][j]                                   (the last row)
    forgetting = mean_{j<T-1} ( max_{n>=j} M[n][j] − M[T-1][j] )    (higher-is-better metrics)
    forgetting = mean_{j<T-1} ( M[T-1][j] − min_{n>=j} M[n][j] )    (losses: sign flipped)
    learned    = mean_j M[j][j]                                     (the diagonal: each concept right
                                                                     after its own task, i.e. plasticity)

``learned`` is reported next to forgetting because a method that stops learning forgets nothing.

Every metric is computed on fixed inputs (held-out images, noises, timesteps, sampling seeds), so
a change in M is a change of the model, not of the draw.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastcp.models.noise import noisy_input_and_target

#: metric name -> True if higher is better
METRICS = {"fidelity": True, "dc_acc": True, "holdout_loss": False, "text_align": True}


def _square(matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"matrix: expected a non-empty square T×T matrix, got shape {m.shape}")
    return m


def summarize(matrix, higher_is_better: bool = True) -> dict[str, float]:
    """{"average", "forgetting"} of a T×T matrix (list of lists or array)."""
    m = _square(matrix)
    T = m.shape[0]
    average = float(np.mean(m[-1]))
    if T == 1:
        return {"average": average, "forgetting": 0.0}
    drops = []
    for j in range(T - 1):
        col = m[j:, j]
        drops.append(col.max() - m[-1, j] if higher_is_better else m[-1, j] - col.min())
    return {"average": average, "forgetting": float(np.mean(drops))}


def learned(matrix) -> float:
    """Mean of the diagonal of a T×T matrix: each concept measured right after its own task."""
    m = _square(matrix)
    return float(np.mean(np.diag(m)))


class ContinualEvaluator:
    """Fills the T×T matrices of every metric, one row per finished task.

    Args:
        backbone: the Backbone being trained.
        concepts: the task sequence (list of Concept).
        method: the Method (its ``generation_routing(j)`` sets up the model for concept j).
        judge: (Judge, class names) or None — fidelity is computed for concepts the judge knows.
        num_images: images generated per concept for fidelity.
        num_inference_steps, guidance_scale: DDIM sampling settings.
        dc_timesteps: timesteps per image for dc_acc; dc_images: held-out images per concept.
        seed: fixes every noise, timestep and sampling seed of the evaluation.
    """

    def __init__(self, backbone, concepts, method, judge=None, *, num_images: int = 8, num_inference_steps: int = 20,
                 guidance_scale: float = 3.0, dc_timesteps: int = 8, dc_images: int = 4, holdout_timesteps: int = 8,
                 seed: int = 0):
        self.bb, self.concepts, self.method = backbone, concepts, method
        self.judge, self.judge_classes = judge if judge is not None else (None, [])
        self.num_images, self.steps, self.cfg = num_images, num_inference_steps, guidance_scale
        self.dc_timesteps, self.dc_images, self.seed = dc_timesteps, dc_images, seed
        T = len(concepts)
        self.names = [c.name for c in concepts]
        self.metrics = ["holdout_loss", "dc_acc"]
        if self.judge is not None and all(c.name in self.judge_classes for c in concepts):
            self.metrics.insert(0, "fidelity")
        self.matrix = {m: [[math.nan] * T for _ in range(T)] for m in self.metrics}
        self.last_samples: dict[int, torch.Tensor] = {}
        n_train = backbone.scheduler.config.num_train_timesteps
        g = torch.Generator().manual_seed(seed + 101)
        # the training resolution (``--resolution``), which may differ from the model's sample size
        shape = backbone.latent_shape_at(concepts[0].eval_images.shape[-1])
        # Fixed (t, ε) for the held-out loss: evenly spread timesteps, one noise per (image, t).
        self.holdout_t = torch.linspace(50, n_train - 50, holdout_timesteps).long()
        self.holdout_noise = [torch.randn(len(c.eval_images), holdout_timesteps, *shape, generator=g) for c in concepts]
        self.dc_t = torch.linspace(100, n_train - 100, dc_timesteps).long()
        self.dc_noise = torch.randn(dc_timesteps, *shape, generator=g)

    # ------------------------------------------------------------------ metrics of one concept
    @torch.no_grad()
    def holdout_loss(self, j: int) -> float:
        """Denoising MSE of concept j's held-out images under its prompt at the fixed (t, ε)."""
        bb, c = self.bb, self.concepts[j]
        x0 = bb.encode_images(c.eval_images)
        N, T = x0.shape[0], len(self.holdout_t)
        noise = self.holdout_noise[j].to(x0).reshape(N * T, *x0.shape[1:])
        t = self.holdout_t.repeat(N).to(x0.device)
        x0r = x0.repeat_interleave(T, dim=0)
        x_t, target = noisy_input_and_target(bb.scheduler, x0r, noise, t, bb.prediction_type)
        cond = bb.encode_prompt([c.prompt])
        cond = cond.select(torch.zeros(N * T, dtype=torch.long, device=x0.device))
        with self.method.generation_routing(j):
            pred = bb.unet(x_t, t, **cond.unet_kwargs()).sample
        return torch.mean((pred.float() - target.float()) ** 2).item()

    @torch.no_grad()
    def dc_accuracy(self, j: int, n: int) -> float:
        """DC top-1 on concept j's held-out images among {c_0, concepts learned up to task n, j}.

        c_0 is j's prior prompt ("a photo of a <class word>"). Before its own task j is still a
        candidate (with its untrained token), so the upper triangle shows chance-level guessing.
        """
        from fastcp.dc import DiffusionClassifier

        bb, c = self.bb, self.concepts[j]
        cand = sorted(set(range(n + 1)) | {j})
        prompts = [c.prior_prompt] + [self.concepts[k].prompt for k in cand]
        true = 1 + cand.index(j)
        x0 = bb.encode_images(c.eval_images[: self.dc_images])
        clf = DiffusionClassifier(bb.unet, bb.scheduler)
        with self.method.generation_routing(j):
            err = clf.errors(x0, bb.encode_prompt(prompts), self.dc_t.to(bb.device), self.dc_noise.to(x0))
        pred = err.mean(dim=2).argmin(dim=1)
        return (pred == true).float().mean().item()

    @torch.no_grad()
    def generate(self, j: int) -> torch.Tensor:
        """num_images samples [G, 3, H, W] of concept j's prompt, fixed seed per concept."""
        g = torch.Generator().manual_seed(self.seed * 1000 + j)
        with self.method.generation_routing(j):
            return self.bb.generate([self.concepts[j].prompt] * self.num_images, self.steps, self.cfg, generator=g)

    @torch.no_grad()
    def fidelity(self, images: torch.Tensor, j: int) -> float:
        label = self.judge_classes.index(self.concepts[j].name)
        return (self.judge.predict(images) == label).float().mean().item()

    # ------------------------------------------------------------------ one row
    @torch.no_grad()
    def evaluate_concepts(self, n: int, concepts, progress=None) -> dict[int, dict]:
        """Every metric of each concept j in ``concepts`` after task n: {j: {"values": {metric:
        float}, "samples": images or None}}. Each concept's numbers depend only on the model and
        the fixed draws, so any split of the concepts over processes gives the same row."""
        unet_mode = self.bb.unet.training
        self.bb.unet.eval()
        out = {}
        for j in concepts:
            values = {"holdout_loss": self.holdout_loss(j), "dc_acc": self.dc_accuracy(j, n)}
            samples = None
            if "fidelity" in self.metrics:
                samples = self.generate(j)
                values["fidelity"] = self.fidelity(samples, j)
            out[j] = {"values": values, "samples": samples}
            if progress is not None:
                progress.update(1)
        self.bb.unet.train(unet_mode)
        return out

    def fill_row(self, n: int, results: dict[int, dict]) -> dict[str, list[float]]:
        """Write ``evaluate_concepts`` results (of every concept) into row n; returns the row."""
        for j, r in results.items():
            for m, v in r["values"].items():
                self.matrix[m][n][j] = v
            if r["samples"] is not None:
                self.last_samples[j] = r["samples"]
        return {m: self.matrix[m][n] for m in self.metrics}

    def evaluate_row(self, n: int, progress=None) -> dict[str, list[float]]:
        """Evaluate every concept after task n in this process; fills row n of each matrix and returns it."""
        return self.fill_row(n, self.evaluate_concepts(n, range(len(self.concepts)), progress))

    def samples_for_grid(self) -> dict[int, torch.Tensor]:
        """Samples of every concept from the latest row (generated now if fidelity is off)."""
        if len(self.last_samples) < len(self.concepts):
            for j in range(len(self.concepts)):
                self.last_samples[j] = self.generate(j)
        return self.last_samples

    def summary(self) -> dict:
        return {m: {"matrix": self.matrix[m], **summarize(self.matrix[m], METRICS[m])} for m in self.metrics}
