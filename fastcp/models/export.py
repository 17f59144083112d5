"""The personalized model of a run as one folder that diffusers loads: ``RUN/model/``.

After every task the main process writes the model as it stands (``ContinualTrainer.save_task``,
after the method's ``end_task``), filled under a temporary name and swapped into place
(``fastcp.files.atomic_dir``), so a crash leaves the previous model or the new one, never half::

    model/
      fastcp_model.json                     the index fastcp.generate reads (method, base model,
                                            concepts with token / prompt / class word / files, form)
      model_card.md                         the concepts, their prompts, the diffusers code to load them
      embeddings/<name>.safetensors         each concept's token, textual-inversion format (SD: {token: [D]};
                                            SDXL: {"clip_l": [1, D1], "clip_g": [1, D2]}, token in the metadata)
      pytorch_lora_weights.safetensors      single-model methods: the whole model as ONE exact LoRA
      rank_<N>/pytorch_lora_weights.safetensors + svd_error.json
                                            --export_rank N: the SVD-truncated LoRA and its relative error
      adapters/<name>/pytorch_lora_weights.safetensors
                                            one-adapter-per-concept methods (separate, fl2t): concept j's
                                            model as one exact LoRA

The model is W = W0 + ΔW per targeted linear (W0 pretrained, [out, in]); how ΔW is made is the
method's ``export_form`` (``fastcp.methods.base.Method``), and each is written as a LoRA
ΔW = (alpha_l / r_l) · B A with alpha_l = r_l (scale 1: any scale is folded into B):

- ``carried`` (naive, joint): ΔW = s·B A of the live slot 0: that LoRA itself (rank r).
- ``merged`` (merge, ortho, clora, ewc_dc, dsc): ΔW = Σ_n s_n B_n A_n, each task's slot folded into
  W at its end. Exact as one LoRA of rank R = Σ_n r_n::

      A = [A_1; …; A_n]  [R, in]      B = [s_1 B_1, …, s_n B_n]  [out, R]      B A = Σ_n s_n B_n A_n

  The factors come from the per-task files ``RUN/task_NN_<name>/pytorch_lora_weights.safetensors``
  (each task's slot, saved before it was folded): they are the only place the factors live once
  folded, and they stay in RUN when a run is resumed or extended with more tasks.
- ``dense`` (magmax: an elementwise max of deltas, of full rank in general): ΔW = D [out, in].
  Exact as a full-rank LoRA of rank m = min(out, in): A = I_in, B = D when in ≤ out, else A = D,
  B = I_out (a product with an identity only adds zeros, so x Aᵀ Bᵀ = x Dᵀ up to the rounding of
  one matmul). The layers' ranks differ, so the file carries peft's ``rank_pattern``; diffusers'
  ``load_lora_weights`` reads it from the metadata. It costs at most twice the targeted weights;
  the alternative, the targeted weights themselves, is not something ``load_lora_weights`` loads
  (it would need ``unet.load_state_dict(strict=False)`` and a note on which keys). With
  ``--export_rank N`` a truncated SVD D_N = U_N S_N V_Nᵀ is written beside it, with the relative
  error ‖D − D_N‖_F / ‖D‖_F per layer and over all layers (√(Σ_l ‖D_l − D_l,N‖²) / √(Σ_l ‖D_l‖²)).
- ``per_concept`` (separate, fl2t): concept j's model is ΔW_j = Σ_k g_j[k] s_k B_k A_k with the
  method's gates g_j (``concept_gates``: one_hot(j) for separate, the set module's per-layer
  coefficients for fl2t), written like ``merged`` with B_k scaled by g_j[k] s_k and slots of gate
  0 left out. Select one in diffusers with ``load_lora_weights(dir, adapter_name=name)`` +
  ``set_adapters(name)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastcp.files import atomic_dir, atomic_write_json, atomic_write_text
from fastcp.models.lora_io import (
    LORA_WEIGHTS_NAME, Factors, read_lora_file, save_concept_embeddings, save_lora_factors, slot_factors,
)

MODEL_DIR = "model"
INDEX_NAME = "fastcp_model.json"
CARD_NAME = "model_card.md"
FORMAT = "fastcp-model"
FORMS = ("carried", "merged", "dense", "per_concept", "terms")

#: one low-rank term of a layer's delta: (A [r, in], B [out, r], scale); ΔW = Σ scale · B A
Term = tuple[torch.Tensor, torch.Tensor, float]


def task_dir(run_dir: str | os.PathLike, n: int, name: str) -> Path:
    """Where task n's (0-based) adapter and token are saved: ``RUN/task_NN_<name>/``."""
    return Path(run_dir) / f"task_{n + 1:02d}_{name}"


# --------------------------------------------------------------------------- exact forms
def concat_lora(terms: dict[str, list[Term]]) -> Factors:
    """Sum of low-rank terms per layer as one LoRA of rank R = Σ r_i (scale 1, fp32):
    A = [A_1; …; A_n] [R, in], B = [c_1 B_1, …, c_n B_n] [out, R], so B A = Σ_i c_i B_i A_i."""
    out = {}
    for name, ts in terms.items():
        if not ts:
            raise ValueError(f"terms: layer {name} has no term")
        out[name] = (torch.cat([a.float() for a, _, _ in ts]),
                     torch.cat([b.float() * float(c) for _, b, c in ts], dim=1))
    return out


def dense_lora(deltas: dict[str, torch.Tensor]) -> Factors:
    """A dense delta D [out, in] per layer as an exact LoRA of rank min(out, in) (scale 1):
    A = I_in, B = D when in ≤ out, else A = D, B = I_out."""
    out = {}
    for name, d in deltas.items():
        d = d.detach().float()
        o, i = d.shape
        out[name] = (torch.eye(i, device=d.device), d) if i <= o else (d, torch.eye(o, device=d.device))
    return out


def truncate_lora(factors: Factors, rank: int) -> tuple[Factors, dict]:
    """The best rank-``rank`` LoRA (Eckart–Young) of each layer's D = B A, and its errors.

    Per layer: D = U S Vᵀ; D_N = U_N S_N V_Nᵀ with N = min(rank, rank of the factors), written as
    A_N = √S_N V_Nᵀ [N, in], B_N = U_N √S_N [out, N]. Low-rank factors (R < min(out, in)) are
    decomposed without forming D: B = Q_b R_b, Aᵀ = Q_a R_a (thin QR), R_b R_aᵀ = U' S Vᵀ',
    U = Q_b U', V = Q_a V'. Returns (factors, {"rank", "relative_error", "layers": {name:
    {"rank", "relative_error"}}}) with relative error ‖D − D_N‖_F / ‖D‖_F (0 for a zero delta) and
    the overall one √(Σ_l ‖D_l − D_l,N‖²_F) / √(Σ_l ‖D_l‖²_F).
    """
    if rank < 1:
        raise ValueError(f"rank: expected >= 1, got {rank}")
    out, layers, lost_total, norm_total = {}, {}, 0.0, 0.0
    for name, (a, b) in factors.items():
        a, b = a.float(), b.float()
        if a.shape[0] < min(b.shape[0], a.shape[1]):
            qb, rb = torch.linalg.qr(b)
            qa, ra = torch.linalg.qr(a.T)
            u, s, vh = torch.linalg.svd(rb @ ra.T)
            u, vh = qb @ u, vh @ qa.T
        else:
            u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
        n = min(rank, s.numel())
        root = s[:n].sqrt()
        out[name] = (root[:, None] * vh[:n], u[:, :n] * root[None])
        s2 = (s.double() ** 2)
        lost, norm = float(s2[n:].sum()), float(s2.sum())
        lost_total, norm_total = lost_total + lost, norm_total + norm
        layers[name] = {"rank": n, "relative_error": (lost / norm) ** 0.5 if norm > 0 else 0.0}
    overall = (lost_total / norm_total) ** 0.5 if norm_total > 0 else 0.0
    return out, {"rank": rank, "relative_error": overall, "layers": layers}


# --------------------------------------------------------------------------- the model of a run
def _task_terms(run_dir: Path, concepts: list) -> dict[str, list[Term]]:
    """Every finished task's LoRA terms from its per-task file (checked to be this run's task)."""
    terms: dict[str, list[Term]] = {}
    for n, c in enumerate(concepts):
        file = task_dir(run_dir, n, c.name) / LORA_WEIGHTS_NAME
        factors, scales, meta = read_lora_file(file)
        if meta.get("fastcp_concept", c.name) != c.name or meta.get("fastcp_task", str(n + 1)) != str(n + 1):
            raise ValueError(f"export: {file} holds task {meta.get('fastcp_task')} ({meta.get('fastcp_concept')}), "
                             f"expected task {n + 1} ({c.name})")
        if terms and set(factors) != set(terms):
            raise ValueError(f"export: {file} targets other layers than the earlier tasks' files")
        for name, (a, b) in factors.items():
            terms.setdefault(name, []).append((a, b, scales[name]))
    return terms


def _gated_terms(unet, gates) -> dict[str, list[Term]]:
    """{layer: [(A_k, B_k, g[k]·s_k) for every slot k with g[k] != 0]} of the live slots."""
    from fastcp.nn import lora_layers

    terms = {}
    for name, layer in lora_layers(unet).items():
        g = (gates[name] if isinstance(gates, dict) else gates).detach().float().cpu()  # one read per layer, not a hot path
        scaling, ranks = layer.scaling.detach().cpu(), layer.ranks.detach().cpu()
        terms[name] = [(layer.lora_a[k, : int(ranks[k])].detach().float().cpu(),
                        layer.lora_b[k, :, : int(ranks[k])].detach().float().cpu(), float(g[k] * scaling[k]))
                       for k in range(layer.num_adapters) if float(g[k]) != 0.0]
    return terms


def model_factors(run_dir: str | os.PathLike, backbone, method, concepts: list) -> Factors | dict[str, Factors]:
    """The model after the last of ``concepts`` (the concepts learned so far, in order) as exact LoRA
    factors: one ``Factors`` for a single-model method, {concept name: Factors} for ``per_concept``."""
    form = method.export_form
    if form == "carried":
        factors, alphas = slot_factors(backbone.unet, 0)
        return concat_lora({n: [(a, b, alphas[n] / a.shape[0])] for n, (a, b) in factors.items()})
    if form == "merged":
        return concat_lora(_task_terms(Path(run_dir), concepts))
    if form == "dense":
        return dense_lora(method.dense_delta())
    if form == "terms":
        return concat_lora(method.lora_terms())
    if form == "per_concept":
        return {c.name: concat_lora(_gated_terms(backbone.unet, method.concept_gates(j))) for j, c in enumerate(concepts)}
    raise ValueError(f"export: method {method.name} has an unknown export_form {form!r}; expected one of {FORMS}")


def pipeline_class(backbone) -> str | None:
    """The diffusers pipeline class that loads the base model (None for the embedded tiny model)."""
    if backbone.name == "tiny":
        return None
    return "StableDiffusionXLPipeline" if backbone.is_sdxl else "StableDiffusionPipeline"


def write_model(dest: str | os.PathLike, backbone, *, method: str, form: str, concepts: list,
                single: Factors | None = None, adapters: dict[str, Factors] | None = None,
                export_rank: int | None = None, tasks: int | None = None, location: str | os.PathLike | None = None) -> Path:
    """Fill the folder ``dest`` (existing, empty) with a model: the LoRA file(s), every concept's
    embeddings (from the backbone's live tables), the index and the model card.

    single: the whole model's factors (single-model methods); adapters: {concept name: factors}
    (one adapter per concept). ``export_rank``: also an SVD-truncated LoRA of the single model.
    ``location``: where the folder will live (the model card's paths; default ``dest``).
    """
    if (single is None) == (adapters is None):
        raise ValueError("write_model: give exactly one of single= and adapters=")
    dest = Path(dest)
    meta = {"fastcp_method": method, "fastcp_export_form": form}
    index = {"format": FORMAT, "version": 1, "method": method, "base_model": backbone.name,
             "pipeline": pipeline_class(backbone), "is_sdxl": bool(backbone.is_sdxl), "form": form,
             "single_model": single is not None, "tasks": len(concepts) if tasks is None else tasks, "concepts": []}
    if single is not None:
        save_lora_factors(single, dest, metadata=meta)
        index["lora"] = {"file": LORA_WEIGHTS_NAME, "exact": True, "rank": _rank_summary(single)}
        if export_rank:
            low, errors = truncate_lora(single, int(export_rank))
            sub = dest / f"rank_{int(export_rank)}"
            save_lora_factors(low, sub, metadata={**meta, "fastcp_svd_rank": str(int(export_rank))})
            atomic_write_json(sub / "svd_error.json", errors)
            index["truncated"] = {"file": f"{sub.name}/{LORA_WEIGHTS_NAME}", "errors": f"{sub.name}/svd_error.json",
                                  "rank": int(export_rank), "relative_error": errors["relative_error"]}
    for c in concepts:
        entry = {"name": c.name, "token": c.token, "prompt": c.prompt, "class_word": getattr(c, "class_word", None),
                 "embeddings": f"embeddings/{c.name}.safetensors"}
        save_concept_embeddings(backbone, dest / entry["embeddings"], [c.token])
        if adapters is not None:
            entry["adapter"] = f"adapters/{c.name}/{LORA_WEIGHTS_NAME}"
            save_lora_factors(adapters[c.name], dest / entry["adapter"], metadata={**meta, "fastcp_concept": c.name})
            entry["adapter_rank"] = _rank_summary(adapters[c.name])
        index["concepts"].append(entry)
    atomic_write_json(dest / INDEX_NAME, index)
    atomic_write_text(dest / CARD_NAME, model_card(index, Path(location or dest)))
    return dest


def _rank_summary(factors: Factors) -> int:
    return max(int(a.shape[0]) for a, _ in factors.values())


def export_model(run_dir: str | os.PathLike, backbone, method, concepts: list, *,
                 export_rank: int | None = None) -> Path:
    """Write ``RUN/model/`` for the state after the last of ``concepts`` (the concepts learned so
    far, in order), replacing the previous one in one step. Returns the folder."""
    run_dir = Path(run_dir)
    target = run_dir / MODEL_DIR
    factors = model_factors(run_dir, backbone, method, concepts)
    per_concept = method.export_form == "per_concept"
    with atomic_dir(target) as tmp:
        write_model(tmp, backbone, method=method.name, form=method.export_form, concepts=concepts,
                    single=None if per_concept else factors, adapters=factors if per_concept else None,
                    export_rank=export_rank, location=target.resolve())
    return target


# --------------------------------------------------------------------------- reading
def read_index(path: str | os.PathLike) -> tuple[Path, dict]:
    """(model folder, index) of a run folder or a ``model/`` folder; one-line ValueError otherwise."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"model: {path} does not exist")
    folder = path if (path / INDEX_NAME).is_file() else path / MODEL_DIR
    file = folder / INDEX_NAME
    if not file.is_file():
        raise ValueError(f"model: {path} holds no exported model ({INDEX_NAME} not found in it or in {MODEL_DIR}/); "
                         "a run writes one after its first task")
    try:
        index = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model: cannot read {file}: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("concepts"), list):
        raise ValueError(f"model: {file} is not a fastcp model index")
    return folder, index


# --------------------------------------------------------------------------- model card
def model_card(index: dict, folder: Path) -> str:
    """Markdown: the concepts and their prompts, and the diffusers code that loads the model from ``folder``."""
    lines = [f"# fastcp model: {index['method']} on {index['base_model']}", "",
             f"{len(index['concepts'])} concept(s) learned one after another with the `{index['method']}` method "
             f"(export form `{index['form']}`).", "",
             "| concept | token | prompt | class word |", "|---|---|---|---|"]
    for c in index["concepts"]:
        lines.append(f"| {c['name']} | `{c['token']}` | {c['prompt']} | {c['class_word'] or ''} |")
    lines += ["", "## Generate with fastcp", "", "```bash",
              f"python -m fastcp.generate --run {folder} --prompt \"{index['concepts'][0]['prompt']}\" "
              "--num_images 4 --output_dir samples", "```", "",
              "`--run` takes this folder or the run folder above it."]
    pipe = index.get("pipeline")
    if pipe is None:
        lines += ["", "The base model is fastcp's embedded `tiny` model (not a diffusers pipeline): load it with "
                  "`fastcp.models.load_backbone(\"tiny\")`, or use `fastcp.generate`."]
        return "\n".join(lines) + "\n"
    model = "MODEL_DIR"
    code = ["import torch", f"from diffusers import {pipe}", "", f'MODEL_DIR = "{folder}"  # this folder', "",
            f'pipe = {pipe}.from_pretrained("{index["base_model"]}")']
    if index["is_sdxl"]:
        code += ["from safetensors.torch import load_file", ""]
    if index["single_model"]:
        code += [f"pipe.load_lora_weights({model})  # the whole personalized model: one exact LoRA"]
    else:
        for c in index["concepts"]:
            code.append(f'pipe.load_lora_weights(f"{{{model}}}/adapters/{c["name"]}", adapter_name="{c["name"]}")')
    for c in index["concepts"]:
        if index["is_sdxl"]:
            code += [f'emb = load_file(f"{{{model}}}/{c["embeddings"]}")',
                     f'pipe.load_textual_inversion(emb["clip_l"], token="{c["token"]}", '
                     "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                     f'pipe.load_textual_inversion(emb["clip_g"], token="{c["token"]}", '
                     "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]
        else:
            code.append(f'pipe.load_textual_inversion(f"{{{model}}}/{c["embeddings"]}")')
    first = index["concepts"][0]
    if not index["single_model"]:
        code += ["", f'pipe.set_adapters("{first["name"]}")  # one concept\'s adapter at a time']
    code += [f'image = pipe("{first["prompt"]}").images[0]']
    lines += ["", "## Load in diffusers", "", "```python", *code, "```"]
    if not index["single_model"]:
        lines += ["", "This method keeps one adapter per concept: select a concept's adapter with "
                  "`set_adapters(name)` before generating its prompt (`fastcp.generate` runs a batch of mixed "
                  "concepts in one pass, each sample routed to its concept's adapter)."]
    if "truncated" in index:
        t = index["truncated"]
        lines += ["", f"`{t['file']}` is a rank-{t['rank']} SVD truncation of the model (relative error "
                  f"{t['relative_error']:.3g}, per layer in `{t['errors']}`): "
                  f"`pipe.load_lora_weights(f\"{{MODEL_DIR}}/{Path(t['file']).parent}\")` instead of the exact file."]
    return "\n".join(lines) + "\n"
