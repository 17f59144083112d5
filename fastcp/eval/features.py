"""Image and text features of local CLIP and DINO models, for the metrics the papers publish.

    clip_i(G, R) = mean_{g∈G, r∈R} cos(f_img(g), f_img(r))      generated vs the concept's images
    clip_t(G, p) = mean_{g∈G}      cos(f_img(g), f_txt(p_g))    p_g: g's prompt without its token
    dino(G, R)   = mean_{g∈G, r∈R} cos(h_cls(g), h_cls(r))      DINO ViT [CLS] features

(DreamBooth, Ruiz et al. 2023, section 4.1; the continual-personalization papers report the same
three.) Both models are local directories loaded with transformers (``save_pretrained`` layout):
fastcp never downloads. Preprocessing follows the directory's image-processor config (resize of
the shortest side, centre crop, mean/std normalisation) but runs in torch on the model's device,
so generated images never leave the GPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F


class FeatureModelError(ValueError):
    """A --clip_model / --dino_model directory that cannot be used (one-line message)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_model_dir(path, flag: str, kind: str) -> Path:
    """The directory of ``--clip_model``/``--dino_model`` if it looks loadable; else FeatureModelError."""
    path = Path(path)
    if not path.is_dir():
        raise FeatureModelError(f"{flag}: {path} is not a directory (a local {kind} model saved with save_pretrained)")
    cfg = _read_json(path / "config.json")
    if not cfg:
        raise FeatureModelError(f"{flag}: {path} has no readable config.json (a local {kind} model saved with save_pretrained)")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise FeatureModelError(f"{flag}: {path} has no weights (model.safetensors)")
    model_type = cfg.get("model_type", "")
    if kind == "CLIP" and model_type != "clip":
        raise FeatureModelError(f"{flag}: {path} is a {model_type or 'unknown'!s} model, not CLIP (model_type 'clip')")
    if kind != "CLIP":
        # DINO is read through AutoModel: the class it would build must take images, else a CLIP or
        # text model here would load and fail only at the first evaluation, after a task's training
        from transformers import MODEL_MAPPING, AutoConfig

        try:
            model_class = MODEL_MAPPING[type(AutoConfig.from_pretrained(str(path), local_files_only=True))]
        except Exception as exc:  # an unknown model_type, a config transformers cannot read
            raise FeatureModelError(f"{flag}: {path} is not a model transformers' AutoModel can build "
                                    f"({type(exc).__name__})") from None
        if model_class.main_input_name != "pixel_values":
            raise FeatureModelError(f"{flag}: {path} is a {model_type or 'unknown'!s} model ({model_class.__name__}), "
                                    f"not an image backbone (a DINO / DINOv2 ViT)")
    return path


class _Preprocess:
    """Resize (shortest side) → centre crop → normalise, from a transformers image-processor config."""

    def __init__(self, folder: Path, default_size: int):
        cfg = _read_json(folder / "preprocessor_config.json")
        size = cfg.get("size", default_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height", default_size))
        crop = cfg.get("crop_size", size)
        if isinstance(crop, dict):
            crop = crop.get("height", size)
        self.size, self.crop = int(size), int(crop)
        self.do_crop = bool(cfg.get("do_center_crop", True))
        self.mean = torch.tensor(cfg.get("image_mean", [0.48145466, 0.4578275, 0.40821073]))
        self.std = torch.tensor(cfg.get("image_std", [0.26862954, 0.26130258, 0.27577711]))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> model input [B, 3, crop, crop]."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * s)), max(self.size, round(w * s))), mode="bicubic",
                          align_corners=False, antialias=True)
        if self.do_crop:
            h, w = x.shape[-2:]
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            x = x[..., top: top + self.crop, left: left + self.crop]
        return (x - self.mean.to(x)[:, None, None]) / self.std.to(x)[:, None, None]


def cosine_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean over all pairs of cos(a_i, b_k): a [N, D], b [M, D]."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean().item()


class ClipScorer:
    """CLIP image and text features (transformers ``CLIPModel`` + tokenizer of the directory)."""

    def __init__(self, path, device="cpu"):
        from transformers import AutoTokenizer, CLIPModel

        path = check_model_dir(path, "--clip_model", "CLIP")
        try:
            self.model = CLIPModel.from_pretrained(str(path)).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # transformers' own messages are many lines
            raise FeatureModelError(f"--clip_model: {path} cannot be loaded ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.device = device
        self.pre = _Preprocess(path, self.model.config.vision_config.image_size)

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> projected image embeddings [B, D]."""
        out = self.model.get_image_features(pixel_values=self.pre(images.to(self.device)))
        return getattr(out, "pooler_output", out)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> projected text embeddings [B, D]."""
        max_len = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return getattr(out, "pooler_output", out)


class DinoScorer:
    """DINO / DINOv2 ViT [CLS] features (transformers ``AutoModel`` of the directory)."""

    def __init__(self, path, device="cpu"):
        from transformers import AutoModel

        path = check_model_dir(path, "--dino_model", "DINO ViT")
        try:
            self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        except Exception as exc:
            raise FeatureModelError(f"--dino_model: {path} cannot be loaded ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.device = device
        self.pre = _Preprocess(path, getattr(self.model.config, "image_size", 224))

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [CLS] features [B, D]."""
        return self.model(pixel_values=self.pre(images.to(self.device))).last_hidden_state[:, 0]
