"""Concepts and task sequences: image folders, sequence files, and the embedded synthetic sequence.

A concept = name, placeholder token (``<v1>``), prompt containing the token, optional class word,
train images and optional held-out images. A task sequence is an ordered list of concepts, read
from a JSON/YAML file (``--concepts``: fastcp's own entries, or diffusers' Custom Diffusion
``concepts_list``, told apart by their keys), one sub-folder per concept (``--concepts_dir``), a
single folder (``--instance_data_dir``), or the embedded synthetic world (the default demo).

Every loader validates everything before training starts and raises ``DataError`` with a
one-line message naming the file or folder.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
#: the keys of one entry of diffusers' Custom Diffusion / DreamBooth ``--concepts_list`` file
CONCEPTS_LIST_KEYS = ("instance_prompt", "class_prompt", "instance_data_dir", "class_data_dir")
#: a placeholder token: ``<v1>``, Custom Diffusion's ``<new1>`` (no space or angle bracket inside)
_PLACEHOLDER = re.compile(r"<[^<>\s]+>")


class DataError(ValueError):
    """Bad user data (missing/empty/unreadable folder, corrupt image, bad sequence file)."""


@dataclass
class Concept:
    """One personal concept. Images are float tensors [N, 3, H, W] in [-1, 1]."""

    name: str
    token: str
    prompt: str
    train_images: torch.Tensor
    holdout_images: torch.Tensor | None = None
    class_word: str | None = None
    source: str = "embedded"
    meta: dict = field(default_factory=dict)
    #: the training images resized so that their short side is the resolution, uncropped (for
    #: random crops, ``--center_crop`` off); None when every image is square already
    train_full: list[torch.Tensor] | None = None
    #: DreamBooth prior preservation: the class prompt (default ``prior_prompt``) and the folder
    #: of class images (default chosen by the trainer)
    class_prompt_override: str | None = None
    class_data_dir: str | None = None
    #: False when the method trains and prompts the token without its class word ("a photo of
    #: <v1>"; C-LoRA): evaluation prompts then name the token alone (``concept_phrase``)
    class_word_in_prompt: bool = True

    @property
    def prior_prompt(self) -> str:
        """c_0 for this concept: the prompt without the concept token ("a photo of a star")."""
        return f"a photo of a {self.class_word}" if self.class_word else "a photo"

    @property
    def class_prompt(self) -> str:
        """Prompt of this concept's prior-preservation class images (``--class_prompt``)."""
        return self.class_prompt_override or self.prior_prompt

    @property
    def eval_images(self) -> torch.Tensor:
        """Held-out images if there are any, else the training images (said in the report)."""
        return self.holdout_images if self.holdout_images is not None else self.train_images


def load_image_folder(folder: str | Path, size: int, *, role: str = "images",
                      full: list[torch.Tensor] | None = None) -> torch.Tensor:
    """All images of a folder as [N, 3, size, size] in [-1, 1]: EXIF orientation applied (phone
    photos), short side resized to ``size``, center crop. ``full``, if given, receives each image
    resized but uncropped [3, H, W] (for random crops).

    Unreadable or non-image files are skipped with a warning; no image left is a DataError.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{role} folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{role} folder {folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{role} folder {folder} is empty")
    out = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im).convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            warnings.warn(f"skipping {path}: not a readable image ({type(exc).__name__})", stacklevel=2)
            continue
        w, h = im.size
        s = min(w, h)
        if full is not None:
            rw, rh = round(w * size / s), round(h * size / s)
            full.append(_to_tensor(im.resize((max(rw, size), max(rh, size)), Image.BICUBIC)))
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.BICUBIC)
        out.append(_to_tensor(im))
    if not out:
        raise DataError(f"{role} folder {folder} has no readable image (of {len(files)} files)")
    return torch.stack(out)


def _to_tensor(im) -> torch.Tensor:
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def save_image_folder(images: torch.Tensor, folder: str | Path, prefix: str = "img") -> None:
    """Write images [N, 3, H, W] in [-1, 1] as PNGs (used to export the embedded concepts)."""
    from fastcp.files import atomic_write_png, images_to_uint8

    for i, a in enumerate(images_to_uint8(images)):
        atomic_write_png(Path(folder) / f"{prefix}_{i:03d}.png", a)


def placeholder_token(prompt: str, what: str) -> str:
    """The one placeholder token (``<v1>``, ``<new1>``) of ``prompt``; DataError naming ``what``
    when there is none or more than one (a task teaches exactly one concept)."""
    tokens = list(dict.fromkeys(_PLACEHOLDER.findall(prompt)))
    if not tokens:
        raise DataError(f"{what} {prompt!r} has no placeholder token like <v1> or <new1>")
    if len(tokens) > 1:
        raise DataError(f"{what} {prompt!r} has several placeholder tokens ({', '.join(tokens)}); "
                        "a task learns one concept")
    return tokens[0]


def _check_unique(concepts: list[Concept]) -> list[Concept]:
    names, tokens = set(), set()
    for c in concepts:
        if c.name in names:
            raise DataError(f"concept name {c.name!r} appears twice in the task sequence")
        if c.token in tokens:
            raise DataError(f"token {c.token!r} is used by two concepts in the task sequence")
        if c.token not in c.prompt:
            raise DataError(f"prompt of concept {c.name!r} does not contain its token {c.token!r}: {c.prompt!r}")
        names.add(c.name)
        tokens.add(c.token)
    if not concepts:
        raise DataError("the task sequence has no concept")
    return concepts


def embedded_sequence(num_concepts: int | None = None, seed: int = 0, num_train: int = 8, num_holdout: int = 8,
                      size: int = 32) -> list[Concept]:
    """The embedded synthetic personal concepts, in their fixed order, deterministic from ``seed``."""
    from fastcp.data import synthetic as world

    chosen = world.PERSONAL_CONCEPTS[: num_concepts or len(world.PERSONAL_CONCEPTS)]
    seq = []
    for i, pc in enumerate(chosen):
        token = f"<v{i + 1}>"
        seq.append(Concept(
            name=pc.name, token=token, prompt=f"a photo of {token} {pc.class_word}", class_word=pc.class_word,
            train_images=torch.from_numpy(world.render_concept(pc, num_train, seed, "train", size)),
            holdout_images=torch.from_numpy(world.render_concept(pc, num_holdout, seed, "holdout", size)),
            source="embedded",
        ))
    return _check_unique(seq)


def _concept_from_entry(entry: dict, index: int, base: Path, size: int, where: str) -> Concept:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry {index} must be a mapping, got {type(entry).__name__}")
    unknown = set(entry) - {"name", "token", "prompt", "class_word", "train_dir", "holdout_dir", "instance_data_dir",
                            "class_prompt", "class_data_dir"}
    if unknown:
        raise DataError(f"{where}: entry {index} has unknown key(s) {sorted(unknown)}")
    train_dir = entry.get("train_dir", entry.get("instance_data_dir"))
    if train_dir is None:
        raise DataError(f"{where}: entry {index} has no train_dir")
    train_dir = (base / train_dir) if not Path(train_dir).is_absolute() else Path(train_dir)
    name = str(entry.get("name", train_dir.name))
    token = str(entry.get("token", f"<v{index + 1}>"))
    class_word = entry.get("class_word")
    prompt = str(entry.get("prompt", f"a photo of {{token}} {class_word or 'object'}")).replace("{token}", token)
    holdout = None
    if entry.get("holdout_dir"):
        hd = Path(entry["holdout_dir"])
        holdout = load_image_folder(hd if hd.is_absolute() else base / hd, size, role=f"held-out images of {name!r}")
    full: list[torch.Tensor] = []
    images = load_image_folder(train_dir, size, role=f"images of {name!r}", full=full)
    class_dir = entry.get("class_data_dir")
    if class_dir is not None and not Path(class_dir).is_absolute():
        class_dir = str(base / class_dir)
    return Concept(name=name, token=token, prompt=prompt, class_word=class_word, train_images=images,
                   holdout_images=holdout, source=str(train_dir), train_full=_non_square(full),
                   class_prompt_override=entry.get("class_prompt"), class_data_dir=class_dir)


def _non_square(full: list[torch.Tensor]) -> list[torch.Tensor] | None:
    return full if any(f.shape[-1] != f.shape[-2] for f in full) else None


def is_concepts_list(entries: list) -> bool:
    """Whether a sequence file's entries are diffusers' ``concepts_list`` (they carry
    ``instance_prompt``, which fastcp's own entries never do)."""
    return any(isinstance(e, dict) and "instance_prompt" in e for e in entries)


def _class_word(instance_prompt: str, token: str, class_prompt: str | None) -> str | None:
    """The class word of a concepts_list entry: the last word of its class prompt (Custom
    Diffusion's class prompts are the class, "cat", or a photo of it, "photo of a cat"), else the
    word right after the token in the instance prompt ("photo of a <new1> cat"), else None."""
    words = re.findall(r"[^\W\d_][\w-]*", class_prompt or "")
    if words:
        return words[-1]
    after = re.match(r"\s+([^\W\d_][\w-]*)", instance_prompt.split(token, 1)[1])
    return after.group(1) if after else None


def concepts_list_entries(entries: list, where: str) -> list[dict]:
    """diffusers' Custom Diffusion ``concepts_list`` entries ({"instance_prompt", "class_prompt",
    "instance_data_dir", "class_data_dir"}) as fastcp sequence entries.

    token = the placeholder in instance_prompt (``<new1>``); prompt = instance_prompt as is;
    name = instance_data_dir's folder name, made unique with ``_2``, ``_3``... when two entries'
    folders share a name (``a/images``, ``b/images``); class word = ``_class_word``;
    class_prompt / class_data_dir feed prior preservation (``--with_prior_preservation``).
    A null value counts as absent, as in diffusers' single-concept default list.
    """
    out, seen = [], {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{where}: entry {i} must be a mapping, got {type(entry).__name__}")
        entry = {k: v for k, v in entry.items() if v is not None}
        unknown = set(entry) - set(CONCEPTS_LIST_KEYS)
        if unknown:
            raise DataError(f"{where}: concepts_list entry {i} has unknown key(s) {sorted(unknown)} "
                            f"(expected {', '.join(CONCEPTS_LIST_KEYS)})")
        for key in ("instance_prompt", "instance_data_dir"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise DataError(f"{where}: concepts_list entry {i} has no {key}")
        prompt = entry["instance_prompt"]
        token = placeholder_token(prompt, f"{where}: concepts_list entry {i}: instance_prompt")
        name = Path(entry["instance_data_dir"]).name or token.strip("<>")
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        native = {"name": name, "token": token, "prompt": prompt, "train_dir": entry["instance_data_dir"],
                  "class_word": _class_word(prompt, token, entry.get("class_prompt"))}
        native.update({k: entry[k] for k in ("class_prompt", "class_data_dir") if k in entry})
        out.append(native)
    return out


def load_sequence_file(path: str | Path, size: int) -> list[Concept]:
    """Read a task sequence (JSON or YAML): a list of concept entries, or {"concepts": [...]}.

    Entry keys: name, token (default <vN>), prompt (may contain "{token}"), class_word,
    train_dir (relative to the file), holdout_dir (optional), class_prompt and class_data_dir
    (prior preservation, optional). A list of diffusers ``concepts_list`` entries (keys
    ``instance_prompt``, ``instance_data_dir``, ``class_prompt``, ``class_data_dir``) is read
    too (``concepts_list_entries``). Relative paths are relative to the file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task sequence file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # any parse error of the user's file
        raise DataError(f"task sequence file {path} cannot be parsed: {str(exc).splitlines()[0]}") from exc
    entries = data.get("concepts") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise DataError(f"task sequence file {path} must hold a list of concepts (or {{'concepts': [...]}})")
    if is_concepts_list(entries):
        entries = concepts_list_entries(entries, str(path))
    return _check_unique([_concept_from_entry(e, i, path.parent, size, str(path)) for i, e in enumerate(entries)])


def load_concepts_dir(folder: str | Path, size: int, order_seed: int | None = None) -> list[Concept]:
    """One sub-folder per concept (sorted; ``order_seed`` shuffles). A sub-folder may hold
    ``train/`` and ``holdout/`` folders, else all its images are training images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"concepts folder {folder} does not exist")
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise DataError(f"concepts folder {folder} has no concept sub-folder")
    if order_seed is not None:
        rng = np.random.default_rng(order_seed)
        subs = [subs[i] for i in rng.permutation(len(subs))]
    entries = []
    for s in subs:
        e = {"name": s.name, "train_dir": str(s / "train") if (s / "train").is_dir() else str(s)}
        if (s / "holdout").is_dir():
            e["holdout_dir"] = str(s / "holdout")
        entries.append(e)
    return _check_unique([_concept_from_entry(e, i, folder, size, str(folder)) for i, e in enumerate(entries)])


def export_embedded_sequence(out_dir: str | Path, num_concepts: int | None = None, seed: int = 0) -> Path:
    """Write the embedded concepts as image folders plus ``sequence.json`` (a runnable example)."""
    out_dir = Path(out_dir)
    entries = []
    for c in embedded_sequence(num_concepts, seed):
        save_image_folder(c.train_images, out_dir / c.name / "train")
        save_image_folder(c.holdout_images, out_dir / c.name / "holdout")
        entries.append({"name": c.name, "token": c.token, "prompt": c.prompt.replace(c.token, "{token}"),
                        "class_word": c.class_word, "train_dir": f"{c.name}/train", "holdout_dir": f"{c.name}/holdout"})
    (out_dir / "sequence.json").write_text(json.dumps({"concepts": entries}, indent=2))
    return out_dir / "sequence.json"
