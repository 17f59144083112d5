"""A concept's training images as the trainer draws them, with diffusers' augmentations.

Few-shot concepts have a handful of images, so their latents are encoded once per task and
cached (both orientations with ``--random_flip``). ``--center_crop`` off (diffusers' default)
takes a random square crop of each image whose resized form is not square; such images are
kept as pixels and encoded at every draw (square images, e.g. the embedded concepts, have one
crop only and stay cached).

Every random choice (which image, flip, crop offset) comes from the generator passed to
``draw``, in a fixed order, for the whole global batch: N processes see the rows one process
with the N-times batch would see.
"""
from __future__ import annotations

import torch


class TrainImages:
    """Draws latents [B, C, h, w] of one concept's images.

    Args:
        backbone: encodes images to latents (``Backbone.encode_images``).
        images: [N, 3, S, S] center-cropped squares in [-1, 1] (``Concept.train_images``).
        full: optional list of N tensors [3, H, W] resized so that min(H, W) = S (``Concept.train_full``),
            used for random crops when ``center_crop`` is False.
        random_flip: flip each drawn image horizontally with probability 1/2.
    """

    def __init__(self, backbone, images: torch.Tensor, *, full: list[torch.Tensor] | None = None,
                 center_crop: bool = True, random_flip: bool = False):
        self.bb, self.random_flip = backbone, random_flip
        self.size = images.shape[-1]
        with torch.no_grad():
            self.latents = backbone.encode_images(images)
            self.flipped = backbone.encode_images(images.flip(-1)) if random_flip else None
        # Images whose resized form is not square: the only ones a random crop changes.
        self.full = None
        if not center_crop and full is not None and any(f.shape[-1] != f.shape[-2] for f in full):
            self.full = full

    def __len__(self) -> int:
        return self.latents.shape[0]

    @torch.no_grad()
    def draw(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents of images ``idx`` [B] (CPU long), flipped / cropped by draws from ``generator``."""
        flips = torch.rand(len(idx), generator=generator) < 0.5 if self.random_flip else None
        offsets = torch.rand(len(idx), generator=generator) if self.full is not None else None
        if offsets is None:
            out = self.latents[idx.to(self.latents.device)]
            if flips is not None:
                out = torch.where(flips.to(out.device).view(-1, 1, 1, 1), self.flipped[idx.to(out.device)], out)
            return out
        pixels = []
        for b, i in enumerate(idx.tolist()):
            img = self.full[i]
            h, w = img.shape[-2:]
            # one offset along the long side (the short side is exactly the crop size)
            o = int(round(float(offsets[b]) * (max(h, w) - self.size)))
            img = img[:, o:o + self.size, :] if h > w else img[:, :, o:o + self.size]
            if flips is not None and bool(flips[b]):
                img = img.flip(-1)
            pixels.append(img)
        return self.bb.encode_images(torch.stack(pixels))
