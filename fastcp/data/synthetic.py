"""The embedded synthetic world: procedurally rendered 32x32 images, deterministic from a seed.

Base classes (for pretraining the tiny model and the judge): a shape in one colour with a texture
drawn in a darker shade of that colour, on a random muted background, with a caption such as
"a red striped circle".

Personal concepts (what users "teach"): one specific object each — a known shape painted in a
two-colour palette with a pattern that never occurs in the base data (base textures are always
one colour and its own shade) — rendered with random pose, scale, position and background. Its
prompt is "a photo of <vN> <shape>" (DreamBooth style, class word = the shape), so the pretrained
model draws a generic shape for it before the concept is learned, and the judge can tell the
specific object from its class.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "heart")
COLOURS = {
    "red": (0.90, 0.15, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.90),
}
TEXTURES = ("solid", "striped", "checkered", "dotted")
# How a caption says each texture; "solid" is left unsaid half of the time.
TEXTURE_WORDS = {"solid": "plain", "striped": "striped", "checkered": "checkered", "dotted": "dotted"}


@dataclass(frozen=True)
class PersonalConcept:
    """One embedded personal concept: a shape in a fixed two-colour palette and pattern."""

    name: str
    shape: str
    texture: str
    colour_a: tuple[float, float, float]
    colour_b: tuple[float, float, float]

    @property
    def class_word(self) -> str:
        return self.shape


PERSONAL_CONCEPTS = (
    PersonalConcept("checker_star", "star", "checkered", (1.00, 0.55, 0.05), (0.05, 0.55, 0.55)),
    PersonalConcept("striped_heart", "heart", "striped", (1.00, 0.45, 0.75), (0.10, 0.10, 0.50)),
    PersonalConcept("dotted_ring", "ring", "dotted", (0.65, 1.00, 0.10), (0.50, 0.05, 0.60)),
    PersonalConcept("checker_square", "square", "checkered", (0.95, 0.95, 0.95), (0.85, 0.10, 0.10)),
    PersonalConcept("dotted_triangle", "triangle", "dotted", (0.95, 0.85, 0.10), (0.10, 0.20, 0.80)),
    PersonalConcept("striped_diamond", "diamond", "striped", (0.10, 0.90, 0.90), (0.90, 0.10, 0.60)),
    PersonalConcept("checker_cross", "cross", "checkered", (0.15, 0.75, 0.20), (1.00, 0.90, 0.20)),
    PersonalConcept("striped_circle", "circle", "striped", (1.00, 0.55, 0.05), (0.45, 0.10, 0.55)),
)
CONCEPTS_BY_NAME = {c.name: c for c in PERSONAL_CONCEPTS}

# The judge's label space: base shapes first, then the personal concepts.
JUDGE_CLASSES = tuple(SHAPES) + tuple(c.name for c in PERSONAL_CONCEPTS)


def vocabulary() -> list[str]:
    """Every word the base captions and concept prompts use (the tiny tokenizer's vocabulary)."""
    words = ["a", "an", "photo", "of", "the", "picture", "object", "toy"]
    words += list(SHAPES) + list(COLOURS) + list(TEXTURE_WORDS.values())
    return sorted(set(words))


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape in normalised coordinates (u right, v up, unit radius ~0.85)."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r < 0.82
    if shape == "ring":
        return (r < 0.88) & (r > 0.48)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.68
    if shape == "diamond":
        return np.abs(u) * 0.8 + np.abs(v) * 0.62 < 0.62
    if shape == "triangle":
        return (v > -0.55) & (v < 0.85 - 1.75 * np.abs(u))
    if shape == "cross":
        return ((np.abs(u) < 0.27) & (np.abs(v) < 0.85)) | ((np.abs(v) < 0.27) & (np.abs(u) < 0.85))
    if shape == "star":
        theta = np.arctan2(v, u) + np.pi / 2
        rho = 0.42 + 0.48 * np.abs(np.cos(2.5 * theta)) ** 3
        return r < rho
    if shape == "heart":
        x, y = u * 1.25, v * 1.25 + 0.2
        return (x**2 + y**2 - 0.62) ** 3 - x**2 * y**3 < 0
    raise ValueError(f"shape: unknown shape {shape!r}")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray:
    """Where the second colour goes, in the shape's own (rotated) frame."""
    if texture == "solid":
        return np.zeros_like(u, dtype=bool)
    if texture == "striped":
        return np.floor((v + phase) * 3.2) % 2 == 1
    if texture == "checkered":
        return (np.floor((u + phase) * 3.0) + np.floor((v + phase) * 3.0)) % 2 == 1
    if texture == "dotted":
        fu, fv = (u + phase) * 2.6 % 1 - 0.5, (v + phase) * 2.6 % 1 - 0.5
        return np.hypot(fu, fv) < 0.28
    raise ValueError(f"texture: unknown texture {texture!r}")


def render(shape: str, texture: str, colour_a, colour_b, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render one image [3, size, size] float32 in [-1, 1] with random pose, scale, position, background."""
    ss = 2  # supersampling for anti-aliased edges
    n = size * ss
    scale = rng.uniform(0.62, 0.85)
    cx, cy = rng.uniform(-0.18, 0.18, size=2)
    angle = rng.uniform(-0.5, 0.5)
    phase = rng.uniform(0, 1)
    coords = (np.arange(n) + 0.5) / n * 2 - 1
    X, Y = np.meshgrid(coords, -coords)  # Y up
    X, Y = (X - cx) / scale, (Y - cy) / scale
    c, s = np.cos(angle), np.sin(angle)
    U, V = c * X + s * Y, -s * X + c * Y
    inside = _shape_mask(shape, U, V)
    second = _texture_mask(texture, U, V, phase)
    # Muted background with a soft gradient, far from the saturated object colours.
    base = rng.uniform(0.15, 0.55, size=3)
    grad = rng.uniform(-0.12, 0.12, size=3)
    bg = base[:, None, None] + grad[:, None, None] * Y[None]
    obj = np.where(second[None], np.asarray(colour_b)[:, None, None], np.asarray(colour_a)[:, None, None])
    img = np.where(inside[None], obj, bg)
    img = img.reshape(3, size, ss, size, ss).mean(axis=(2, 4))
    img = img + rng.normal(0, 0.02, size=img.shape)
    return (np.clip(img, 0, 1) * 2 - 1).astype(np.float32)


def base_caption(shape: str, colour: str, texture: str, rng: np.random.Generator) -> str:
    words = ["a", colour]
    if texture != "solid" or rng.random() < 0.5:
        words.append(TEXTURE_WORDS[texture])
    words.append(shape)
    caption = " ".join(words)
    # Concept prompts read "a photo of <v> star": teach the phrase so it is not out of distribution.
    return "a photo of " + caption if rng.random() < 0.3 else caption


def sample_base(n: int, seed: int, size: int = IMAGE_SIZE):
    """n random base-class images with captions and shape labels, deterministic from ``seed``.

    Returns (images [n, 3, size, size] float32 in [-1, 1], captions list[str], labels int64 [n]
    indexing SHAPES).
    """
    rng = np.random.default_rng([seed, 1])
    colour_names = list(COLOURS)
    images, captions, labels = [], [], []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colour_names[rng.integers(len(colour_names))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        rgb = np.asarray(COLOURS[colour])
        images.append(render(shape, texture, rgb, rgb * 0.45, rng, size))
        captions.append(base_caption(shape, colour, texture, rng))
        labels.append(SHAPES.index(shape))
    return np.stack(images), captions, np.asarray(labels, dtype=np.int64)


def render_concept(concept: PersonalConcept, n: int, seed: int, split: str = "train", size: int = IMAGE_SIZE) -> np.ndarray:
    """n images [n, 3, size, size] of a personal concept; ``split`` ('train'/'holdout'/...) picks a
    disjoint random stream, so held-out images are never training images."""
    idx = PERSONAL_CONCEPTS.index(concept)
    rng = np.random.default_rng([seed, 2, idx, sum(map(ord, split))])
    return np.stack([render(concept.shape, concept.texture, concept.colour_a, concept.colour_b, rng, size) for _ in range(n)])
