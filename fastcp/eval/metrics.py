"""The continual evaluation matrix and its summaries (DESIGN.md section 7).

M[n][j] = metric of concept j evaluated after task n, for j <= n (T×T; the entries j > n, a
concept before its own task, are not measured and stay NaN / null in results.json: no summary
uses them, and a run extended later with more concepts could not know them for its earlier
rows). Summaries:

    average    = mean_j M[T-1][j]                                   (the last row)
    forgetting = 1/D · sum_{j<T-1} ( max_{n>=j} M[n][j] − M[T-1][j] )  (higher-is-better metrics)
    forgetting = 1/D · sum_{j<T-1} ( M[T-1][j] − min_{n>=j} M[n][j] )  (losses: sign flipped)
    learned    = mean_j M[j][j]                                     (the diagonal: each concept right
                                                                     after its own task, i.e. plasticity)

D (``--forgetting_norm``): ``t_minus_1`` (default) divides by T−1, the concepts that can have
been forgotten (the last one cannot: it was just learned); ``t`` divides by T, as the released
code of the low-rank CP paper (GitHub luk-st/continual-lora) does, so its numbers are (T−1)/T
of ours. ``learned`` is reported next to forgetting because a method that stops learning
forgets nothing.

Metrics: ``fidelity`` (the judge, tiny model), ``dc_acc``, ``holdout_loss``, and with local models
``clip_i``/``clip_t`` (``--clip_model``) and ``dino`` (``--dino_model``), see fastcp.eval.features.
Every metric is computed on fixed inputs (held-out images, noises, timesteps, sampling seeds),
each drawn from a generator of (seed, concept): a change in M is a change of the model, not of
the draw, and concept j's numbers do not depend on how many concepts the sequence has.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastcp.models.noise import noisy_input_and_target

#: metric name -> True if higher is better
METRICS = {"fidelity": True, "clip_i": True, "clip_t": True, "dino": True, "dc_acc": True, "holdout_loss": False}
#: --forgetting_norm: the divisor of the summed drops
FORGETTING_NORMS = ("t_minus_1", "t")


def concept_generator(seed: int, j: int, salt: int) -> torch.Generator:
    """The generator of one fixed evaluation draw (``salt``) of concept j."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919 * j + salt) % (2**62))


def _square(matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"matrix: expected a non-empty square T×T matrix, got shape {m.shape}")
    return m


def summarize(matrix, higher_is_better: bool = True, forgetting_norm: str = "t_minus_1") -> dict[str, float]:
    """{"average", "forgetting"} of a T×T matrix (list of lists or array; NaN above the diagonal)."""
    m = _square(matrix)
    if forgetting_norm not in FORGETTING_NORMS:
        raise ValueError(f"forgetting_norm: expected one of {FORGETTING_NORMS}, got {forgetting_norm!r}")
    T = m.shape[0]
    average = float(np.mean(m[-1]))
    if T == 1:
        return {"average": average, "forgetting": 0.0}
    drops = []
    for j in range(T - 1):
        col = m[j:, j]
        drops.append(col.max() - m[-1, j] if higher_is_better else m[-1, j] - col.min())
    return {"average": average, "forgetting": float(np.sum(drops) / (T - 1 if forgetting_norm == "t_minus_1" else T))}


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
        num_images: images generated per concept (fidelity, CLIP, DINO, the sample grids).
        num_inference_steps, guidance_scale: sampling settings.
        dc_timesteps: timesteps per image for dc_acc; dc_images: held-out images per concept (0: no dc_acc).
        sample_batch_size: most samples per batched sampling pass (a row's concepts share passes).
        seed: fixes every noise, timestep and sampling seed of the evaluation (keyed by concept).
        clip, dino: a ``ClipScorer`` / ``DinoScorer`` (fastcp.eval.features) or None.
        eval_prompts: templates with ``{}`` for the CLIP/DINO images (fastcp.eval.prompts), or None
            for each concept's own prompt.
        forgetting_norm: ``t_minus_1`` or ``t`` (module docstring).
    """

    def __init__(self, backbone, concepts, method, judge=None, *, num_images: int = 8, num_inference_steps: int = 20,
                 guidance_scale: float = 3.0, dc_timesteps: int = 8, dc_images: int = 4, holdout_timesteps: int = 8,
                 sample_batch_size: int = 64,
                 seed: int = 0, clip=None, dino=None, eval_prompts=None, forgetting_norm: str = "t_minus_1"):
        self.bb, self.concepts, self.method = backbone, concepts, method
        self.judge, self.judge_classes = judge if judge is not None else (None, [])
        self.num_images, self.steps, self.cfg = num_images, num_inference_steps, guidance_scale
        self.dc_timesteps, self.dc_images, self.seed = dc_timesteps, dc_images, seed
        self.sample_batch_size = sample_batch_size
        self.clip, self.dino, self.eval_prompts, self.forgetting_norm = clip, dino, eval_prompts, forgetting_norm
        T = len(concepts)
        self.names = [c.name for c in concepts]
        self.metrics = ["holdout_loss", "dc_acc"] if dc_images > 0 else ["holdout_loss"]  # 0: dc_acc is off
        if dino is not None:
            self.metrics.insert(0, "dino")
        if clip is not None:
            self.metrics[:0] = ["clip_i", "clip_t"]
        if self.judge is not None and all(c.name in self.judge_classes for c in concepts):
            self.metrics.insert(0, "fidelity")
        self.matrix = {m: [[math.nan] * T for _ in range(T)] for m in self.metrics}
        self.last_samples: dict[int, torch.Tensor] = {}
        self._reference_features: dict[tuple[str, int], torch.Tensor] = {}
        n_train = backbone.scheduler.config.num_train_timesteps
        # the training resolution (``--resolution``), which may differ from the model's sample size
        shape = backbone.latent_shape_at(concepts[0].eval_images.shape[-1])
        # Fixed (t, ε) for the held-out loss: evenly spread timesteps, one noise per (image, t);
        # and for dc_acc: one noise per timestep shared by the candidates. Each from concept j's
        # own generators, so j's numbers do not depend on the rest of the sequence.
        self.holdout_t = torch.linspace(50, n_train - 50, holdout_timesteps).long()
        self.holdout_noise = [torch.randn(len(c.eval_images), holdout_timesteps, *shape,
                                          generator=concept_generator(seed, j, 101)) for j, c in enumerate(concepts)]
        self.dc_t = torch.linspace(100, n_train - 100, dc_timesteps).long()
        self.dc_noise = [torch.randn(dc_timesteps, *shape, generator=concept_generator(seed, j, 202))
                         for j in range(T)]

    # ------------------------------------------------------------------ metrics of one concept
    @property
    def batch_concepts(self) -> bool:
        """True when one pass can serve every concept of a row: the method keeps one model for all
        concepts (its ``generation_routing`` is the base no-op). Routed methods (``separate``,
        ``fl2t``) set their adapters up per concept, so their concepts are evaluated one by one."""
        from fastcp.methods.base import Method

        return type(self.method).generation_routing is Method.generation_routing

    @torch.no_grad()
    def holdout_losses(self, js: list[int]) -> dict[int, float]:
        """{j: denoising MSE of concept j's held-out images under its prompt at the fixed (t, ε)},
        all of ``js`` in one UNet pass (their routing must be the same: ``batch_concepts``, or one j)."""
        bb = self.bb
        xs, ts, targets, conds, rows = [], [], [], [], []
        for j in js:
            c = self.concepts[j]
            x0 = bb.encode_images(c.eval_images)
            N, T = x0.shape[0], len(self.holdout_t)
            noise = self.holdout_noise[j].to(x0).reshape(N * T, *x0.shape[1:])
            t = self.holdout_t.repeat(N).to(x0.device)
            x_t, target = noisy_input_and_target(bb.scheduler, x0.repeat_interleave(T, dim=0), noise, t, bb.prediction_type)
            xs.append(x_t), ts.append(t), targets.append(target), conds.append(c.prompt), rows.append(N * T)
        cond = bb.encode_prompt(conds)
        cond = cond.select(torch.repeat_interleave(torch.arange(len(js)), torch.tensor(rows)).to(bb.device))
        with self.method.generation_routing(js[0]):
            pred = bb.unet(torch.cat(xs), torch.cat(ts), **cond.unet_kwargs()).sample
        err = ((pred.float() - torch.cat(targets).float()) ** 2).flatten(1).mean(dim=1)
        means = torch.stack([e.mean() for e in err.split(rows)]).tolist()  # one device->host copy per row
        return dict(zip(js, means))

    def holdout_loss(self, j: int) -> float:
        """Denoising MSE of concept j's held-out images under its prompt at the fixed (t, ε)."""
        return self.holdout_losses([j])[j]

    @torch.no_grad()
    def dc_accuracy(self, j: int, n: int) -> float:
        """DC top-1 on concept j's held-out images among {c_0, concepts learned up to task n}
        (j <= n); c_0 is j's prior prompt ("a photo of a <class word>")."""
        from fastcp.dc import DiffusionClassifier

        bb, c = self.bb, self.concepts[j]
        cand = sorted(set(range(n + 1)) | {j})
        prompts = [c.prior_prompt] + [self.concepts[k].prompt for k in cand]
        true = 1 + cand.index(j)
        x0 = bb.encode_images(c.eval_images[: self.dc_images])
        clf = DiffusionClassifier(bb.unet, bb.scheduler)
        with self.method.generation_routing(j):
            err = clf.errors(x0, bb.encode_prompt(prompts), self.dc_t.to(bb.device), self.dc_noise[j].to(x0))
        pred = err.mean(dim=2).argmin(dim=1)
        return (pred == true).float().mean().item()

    def initial_latents(self, j: int, count: int) -> torch.Tensor:
        """Concept j's fixed sampling noise [count, C, h, w] (its own generator: a sample does not
        depend on the batch or row it is generated in)."""
        return torch.randn((count, *self.bb.latent_shape), generator=concept_generator(self.seed, j, 303))

    @torch.no_grad()
    def generate(self, j: int, prompts: list[str] | None = None) -> torch.Tensor:
        """Samples [G, 3, H, W] of concept j (its prompt num_images times, or ``prompts``), from
        concept j's own sampling seed."""
        prompts = prompts or [self.concepts[j].prompt] * self.num_images
        with self.method.generation_routing(j):
            return self.bb.generate(prompts, self.steps, self.cfg, latents=self.initial_latents(j, len(prompts)),
                                    batch_size=self.sample_batch_size)

    @torch.no_grad()
    def generate_many(self, js: list[int]) -> dict[int, torch.Tensor]:
        """{j: concept j's samples [num_images, 3, H, W]}, every concept of ``js`` in one batched
        sampling pass (same prompts and noise as ``generate(j)``; needs ``batch_concepts`` or one j)."""
        G = self.num_images
        prompts = [self.concepts[j].prompt for j in js for _ in range(G)]
        latents = torch.cat([self.initial_latents(j, G) for j in js])
        with self.method.generation_routing(js[0]):
            images = self.bb.generate(prompts, self.steps, self.cfg, latents=latents, batch_size=self.sample_batch_size)
        return dict(zip(js, images.split(G)))

    @torch.no_grad()
    def fidelity(self, images: torch.Tensor, j: int) -> float:
        label = self.judge_classes.index(self.concepts[j].name)
        return (self.judge.predict(images) == label).float().mean().item()

    def _reference(self, scorer_name: str, scorer, j: int) -> torch.Tensor:
        """Features of concept j's own images (its training images, as the papers), computed once."""
        key = (scorer_name, j)
        if key not in self._reference_features:
            self._reference_features[key] = scorer.images(self.concepts[j].train_images)
        return self._reference_features[key]

    @torch.no_grad()
    def feature_metrics(self, images: torch.Tensor, plain_prompts: list[str], j: int) -> dict[str, float]:
        """clip_i, clip_t and dino of concept j's generated ``images`` (fastcp.eval.features)."""
        from fastcp.eval.features import cosine_mean

        out = {}
        if self.clip is not None:
            feats = self.clip.images(images)
            out["clip_i"] = cosine_mean(feats, self._reference("clip", self.clip, j))
            text = self.clip.texts(plain_prompts)
            out["clip_t"] = torch.nn.functional.cosine_similarity(feats.float(), text.float(), dim=-1).mean().item()
        if self.dino is not None:
            out["dino"] = cosine_mean(self.dino.images(images), self._reference("dino", self.dino, j))
        return out

    # ------------------------------------------------------------------ one row
    @torch.no_grad()
    def evaluate_concepts(self, n: int, concepts, progress=None) -> dict[int, dict]:
        """Every metric of each learned concept j <= n in ``concepts`` after task n: {j: {"values":
        {metric: float}, "samples": images or None}}. Each concept's numbers depend only on the
        model and its fixed draws, so any split of the concepts over processes gives the same row."""
        from fastcp.eval.prompts import concept_eval_prompts

        unet_mode = self.bb.unet.training
        self.bb.unet.eval()
        js = [j for j in concepts if j <= n]  # concepts not learned yet are not measured
        # One model for every concept: the row's held-out losses and judge samples in one batched
        # pass each (on a GPU the row costs about one concept's passes; each concept keeps its own
        # fixed noise, so its numbers are those of the one-by-one path). Routed methods: one by one.
        groups = [js] if self.batch_concepts and js else [[j] for j in js]
        holdout, judged = {}, {}
        for group in groups:
            holdout.update(self.holdout_losses(group))
            if "fidelity" in self.metrics:
                judged.update(self.generate_many(group))
        out = {}
        for j in js:
            values = {"holdout_loss": holdout[j]}
            if "dc_acc" in self.metrics:
                values["dc_acc"] = self.dc_accuracy(j, n)
            samples = judged.get(j)
            if samples is not None:
                values["fidelity"] = self.fidelity(samples, j)
            if self.clip is not None or self.dino is not None:
                prompts, plain = concept_eval_prompts(self.concepts[j], self.eval_prompts, self.num_images)
                # the judge's samples are these very images when the prompts are the concept's own
                images = samples if samples is not None and self.eval_prompts is None else self.generate(j, prompts)
                values.update(self.feature_metrics(images, plain, j))
                samples = samples if samples is not None else images
            out[j] = {"values": values, "samples": samples}
            if progress is not None:
                progress.update(1)
        self.bb.unet.train(unet_mode)
        return out

    def fill_row(self, n: int, results: dict[int, dict]) -> dict[str, list[float]]:
        """Write ``evaluate_concepts`` results (of every learned concept) into row n; returns the row."""
        self.last_samples = {}  # this row's samples only: older ones show an older model
        for j, r in results.items():
            for m, v in r["values"].items():
                self.matrix[m][n][j] = v
            if r["samples"] is not None:
                self.last_samples[j] = r["samples"]
        return {m: self.matrix[m][n] for m in self.metrics}

    def evaluate_row(self, n: int, progress=None) -> dict[str, list[float]]:
        """Evaluate every concept after task n in this process; fills row n of each matrix and returns it."""
        return self.fill_row(n, self.evaluate_concepts(n, range(n + 1), progress))

    def samples_for_grid(self, upto: int | None = None) -> dict[int, torch.Tensor]:
        """Samples of concepts 0..upto (default all) from the latest row, generated now where
        the row made none (no judge, CLIP or DINO)."""
        upto = len(self.concepts) - 1 if upto is None else upto
        for j in range(upto + 1):
            if j not in self.last_samples:
                self.last_samples[j] = self.generate(j)
        return {j: self.last_samples[j] for j in range(upto + 1)}

    def summary(self) -> dict:
        return {m: {"matrix": self.matrix[m], **summarize(self.matrix[m], METRICS[m], self.forgetting_norm)}
                for m in self.metrics}
