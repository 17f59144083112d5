"""One backbone object for every text-to-image model fastcp trains: the embedded ``tiny`` model
and diffusers pipeline directories (SD 1.x/2.x, SDXL with its two text encoders and added
conditions, see ``Conditioning``), given as a path or as a Hub model id already in the local
Hugging Face cache (``hub_snapshot``: offline, nothing is downloaded).

Everything downstream (training, the DC engine, the methods, sampling) talks to a ``Backbone``
and a ``Conditioning``, never to pipeline-specific code.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

TINY_DIR = Path(__file__).resolve().parent / "tiny"
REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
#: a Hub model id, ``org/name`` (what diffusers' ``from_pretrained`` takes for a non-directory)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Conditioning:
    """Text conditioning of a UNet call, kept as a structure so SDXL's extra inputs fit.

    encoder_hidden_states [B, L, D]; added_cond_kwargs: SDXL's {"text_embeds" [B, D2],
    "time_ids" [B, 6]} or None.
    """

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def select(self, index: torch.Tensor) -> "Conditioning":
        """Rows ``index`` (a LongTensor [M]) of every field: the batched gather the DC engine uses."""
        extra = None if self.added_cond_kwargs is None else {k: v[index] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states[index], extra)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Rows of several conditionings stacked (e.g. unconditional + conditional for CFG)."""
        extra = None
        if parts[0].added_cond_kwargs is not None:
            extra = {k: torch.cat([p.added_cond_kwargs[k] for p in parts]) for k in parts[0].added_cond_kwargs}
        return Conditioning(torch.cat([p.encoder_hidden_states for p in parts]), extra)

    def to(self, *args, **kwargs) -> "Conditioning":
        extra = None if self.added_cond_kwargs is None else {k: v.to(*args, **kwargs) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states.to(*args, **kwargs), extra)

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kw["added_cond_kwargs"] = self.added_cond_kwargs
        return kw


@dataclass
class Backbone:
    """A text-to-image diffusion model as fastcp sees it.

    ``vae`` is None for pixel-space models (the tiny one): then ``encode_images`` is the identity.
    Images are float tensors in [-1, 1], shape [B, 3, H, W].
    """

    name: str
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    vae: nn.Module | None = None
    #: SDXL's second text encoder (CLIPTextModelWithProjection) and its tokenizer, else None
    text_encoder_2: nn.Module | None = None
    tokenizer_2: object = None
    concept_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def text_pairs(self) -> list[tuple[object, nn.Module]]:
        """(tokenizer, text encoder) pairs: one for SD 1.x/2.x and tiny, two for SDXL."""
        pairs = [(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            pairs.append((self.tokenizer_2, self.text_encoder_2))
        return pairs

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def sample_size(self) -> int:
        """Image side in pixels."""
        s = self.unet.config.sample_size
        s = s[0] if isinstance(s, (tuple, list)) else s
        return s * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> "Backbone":
        for m in (self.unet, self.text_encoder, self.text_encoder_2, self.vae):
            if m is not None:
                m.to(device) if dtype is None else m.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        tokenizer = tokenizer or self.tokenizer
        tok = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        return tok.input_ids.to(self.device)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Prompts -> Conditioning.

        SD 1.x/2.x and tiny: encoder_hidden_states [B, L, D] = the text encoder's last hidden state.
        SDXL: the penultimate hidden states of both encoders concatenated [B, L, D1 + D2], plus
        added_cond_kwargs {"text_embeds": pooled projection of encoder 2 [B, P], "time_ids" [B, 6]
        = (size, crop (0, 0), size)} as diffusers' SDXL pipeline builds them.
        """
        if not self.is_sdxl:
            hidden = self.text_encoder(self.tokenize(prompts))[0]
            return Conditioning(hidden.to(self.dtype))
        hidden, pooled = [], None
        for tokenizer, encoder in self.text_pairs():
            out = encoder(self.tokenize(prompts, tokenizer), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (the last encoder)
        size = self.sample_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=self.dtype)
        return Conditioning(torch.cat(hidden, dim=-1).to(self.dtype),
                            {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.expand(len(prompts), -1)})

    @torch.no_grad()
    def add_concept_token(self, token: str, init_word: str | None = None, generator: torch.Generator | None = None) -> int:
        """Add a new token (e.g. ``<v1>``) with its own input embedding (in every text encoder);
        returns its id in the first tokenizer.

        The embedding starts from ``init_word``'s embedding if given (textual-inversion style),
        else random with the mean norm of the table (no class word, as C-LoRA does).
        Re-adding an existing token returns its id unchanged.
        """
        if token in self.concept_tokens:
            return self.concept_tokens[token]
        for tokenizer, _ in self.text_pairs():
            if tokenizer.convert_tokens_to_ids(token) not in (None, tokenizer.unk_token_id):
                raise ValueError(f"token: {token!r} is already a word of the tokenizer; pick an unused placeholder")
        ids = []
        for tokenizer, encoder in self.text_pairs():
            tokenizer.add_tokens([token])
            token_id = tokenizer.convert_tokens_to_ids(token)
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            table = encoder.get_input_embeddings().weight
            init_id = None
            if init_word is not None:
                word_ids = tokenizer(init_word, add_special_tokens=False).input_ids
                if len(word_ids) == 1 and word_ids[0] != tokenizer.unk_token_id:
                    init_id = word_ids[0]
            if init_id is not None:
                table[token_id] = table[init_id]
            else:
                v = torch.randn(table.shape[1], generator=generator, device="cpu").to(table)
                table[token_id] = v / v.norm() * table[:token_id].norm(dim=1).mean()
            ids.append(token_id)
        self.concept_tokens[token] = ids[0]
        return ids[0]

    def concept_token_ids(self, token: str) -> list[int]:
        """The token's id in each tokenizer (one for SD/tiny, two for SDXL)."""
        return [tokenizer.convert_tokens_to_ids(token) for tokenizer, _ in self.text_pairs()]

    # ------------------------------------------------------------------ images
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents [B, C, h, w] (identity for pixel space).

        Uses the posterior mean (not a sample) so DC scores and held-out losses are deterministic.
        """
        images = images.to(device=self.device, dtype=self.dtype)
        if self.vae is None:
            return images
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return images.clamp(-1, 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        s = s[0] if isinstance(s, (tuple, list)) else s
        return (self.unet.config.in_channels, s, s)

    def latent_shape_at(self, pixels: int) -> tuple[int, int, int]:
        """Latent shape of a square image of ``pixels`` per side (``--resolution``)."""
        s = pixels // self.vae_scale_factor
        return (self.unet.config.in_channels, s, s)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompts: list[str], num_inference_steps: int = 25, guidance_scale: float = 3.0,
                 generator: torch.Generator | None = None, batch_size: int = 64,
                 latents: torch.Tensor | None = None) -> torch.Tensor:
        """Sample images [B, 3, H, W] in [-1, 1] with DPM-Solver++ and classifier-free guidance.

        DPM-Solver++ (not DDIM with the training config's ``clip_sample``): clipping the x0
        estimate at the first, noisiest steps saturates colours of small models.
        ``latents``: the initial noise [B, C, h, w] (standard normal, one per prompt) instead of
        drawing it from ``generator`` (per-sample seeds: a sample's image then does not depend on
        the batch it is in). Each UNet call holds the unconditional rows first, then the
        conditional ones: rows b and n + b are sample b of a chunk of n.
        """
        if latents is not None and tuple(latents.shape) != (len(prompts), *self.latent_shape):
            raise ValueError(f"latents: expected [{len(prompts)}, {', '.join(map(str, self.latent_shape))}], "
                             f"got {list(latents.shape)}")
        from diffusers import DPMSolverMultistepScheduler

        sched = DPMSolverMultistepScheduler.from_config(self.scheduler.config)
        out = []
        uncond_one = self.encode_prompt([""])
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            cond = self.encode_prompt(chunk)
            n = len(chunk)
            both = Conditioning.cat([uncond_one.select(torch.zeros(n, dtype=torch.long, device=self.device)), cond])
            if latents is None:
                x = torch.randn((n, *self.latent_shape), generator=generator, device="cpu").to(self.device, self.dtype)
            else:
                x = latents[start : start + n].to(self.device, self.dtype)
            x = x * sched.init_noise_sigma
            sched.set_timesteps(num_inference_steps)
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([x, x]), t)
                pred = self.unet(inp, t, **both.unet_kwargs()).sample
                pu, pc = pred.chunk(2)
                pred = pu + guidance_scale * (pc - pu)
                x = sched.step(pred, t, x).prev_sample
            out.append(self.decode_latents(x).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a diffusers-style directory (unet/, text_encoder/, tokenizer/, scheduler/[, vae/])."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.scheduler.save_pretrained(path / "scheduler")
        if self.text_encoder_2 is not None:
            self.text_encoder_2.save_pretrained(path / "text_encoder_2")
            self.tokenizer_2.save_pretrained(path / "tokenizer_2")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")
        index = {"_class_name": "FastcpBackbone", "name": self.name}
        (path / "fastcp_backbone.json").write_text(json.dumps(index, indent=2))


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The folder of a Hub model id's snapshot in the local Hugging Face cache, without network.

    As diffusers' ``from_pretrained(repo_id, local_files_only=True)``: huggingface_hub's
    ``snapshot_download(local_files_only=True)`` looks only at the cache (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; ``models--org--name/refs/<revision>`` ->
    ``snapshots/<commit>/``). fastcp never downloads at run time, so a model that is not there is
    a one-line ValueError that says how to get it.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as exc:
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(
            f"backbone: {repo_id!r} is not a local directory and not in the Hugging Face cache{at} "
            f"({constants.HF_HUB_CACHE}); fastcp does not download: get it with `hf download {repo_id}"
            f"{f' --revision {revision}' if revision else ''}` (older huggingface_hub: `huggingface-cli download "
            f"{repo_id}`) or set HF_HUB_CACHE/HF_HOME to the cache that holds it") from exc


def load_backbone(path_or_name: str | os.PathLike = "tiny", device="cpu", dtype=torch.float32, *,
                  revision: str | None = None) -> Backbone:
    """Load ``tiny`` (the embedded model), a diffusers pipeline directory, or a Hub model id
    (``org/name``, e.g. ``runwayml/stable-diffusion-v1-5``) from the local Hugging Face cache
    (``hub_snapshot``; ``revision`` picks the cached branch, tag or commit) into a Backbone.
    A local directory wins over a Hub id of the same spelling, as in diffusers.

    Raises ValueError with a one-line message for a missing directory or model, or missing components.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    name = str(path_or_name)
    path = TINY_DIR if name == "tiny" else Path(name)
    from_hub = not path.is_dir()
    if from_hub:
        if not HUB_ID.fullmatch(name):
            raise ValueError(f"backbone: {name!r} is neither 'tiny' nor an existing directory")
        path = hub_snapshot(name, revision)
    missing = [c for c in REQUIRED_COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ValueError(f"backbone: {path} lacks the component folder(s) {', '.join(missing)}")
    sdxl = (path / "text_encoder_2").is_dir()
    if sdxl and not (path / "tokenizer_2").is_dir():
        raise ValueError(f"backbone: {path} lacks the component folder(s) tokenizer_2")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per component is noise, not progress
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        text_encoder_2 = tokenizer_2 = None
        if sdxl:
            from transformers import CLIPTextModelWithProjection

            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", torch_dtype=dtype)
            tokenizer_2 = AutoTokenizer.from_pretrained(path / "tokenizer_2")
        vae = None
        if (path / "vae").is_dir():
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"backbone: cannot load {path}: {str(exc).splitlines()[0]}") from exc
    for m in (unet, text_encoder, text_encoder_2, vae):
        if m is not None:
            m.requires_grad_(False).eval()
    # a Hub id keeps its id as the name (results.json), not the cache's snapshot folder
    bb = Backbone(name=name if name == "tiny" or from_hub else str(path), unet=unet, text_encoder=text_encoder,
                  tokenizer=tokenizer, scheduler=scheduler, vae=vae, text_encoder_2=text_encoder_2,
                  tokenizer_2=tokenizer_2)
    return bb.to(device=device)
